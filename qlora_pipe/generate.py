"""Generate stage: one greedy completion (`qlora-pipe generate`) or an interactive chat (`qlora-pipe chat`), from a
merged directory, a training run (NF4 base + adapter) or a plain base directory; for image runs and diffusers
pipelines, one image (`qlora-pipe generate PIPELINE_OR_RUN --prompt TEXT --out image.png`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import torch
from PIL import Image
from transformers import TextStreamer

from qlora_pipe import UserError, diffusion
from qlora_pipe.model import load_for_inference, load_with_adapters, resolve_compute_dtype

CHAT_HELP = "/reset clears the conversation, /exit (or Ctrl-D) ends it"


def prompt_ids(tokenizer, messages: list[dict]) -> torch.Tensor:
    """The conversation as the model was trained to read it, ending where the assistant's reply begins: the chat
    template where the tokenizer has one, else the turns as plain text."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    if len(messages) == 1:
        return tokenizer(messages[0]["content"], return_tensors="pt").input_ids
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer(text, return_tensors="pt").input_ids


def reply(net, tokenizer, messages: list[dict], max_new_tokens: int, streamer=None) -> str:
    """The model's greedy reply to `messages`, stopping at eos (streamed to `streamer` as it is generated)."""
    ids = prompt_ids(tokenizer, messages).to(net.device)
    eos = net.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    with torch.no_grad():
        output = net.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=[tokenizer.eos_token_id, *eos],
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
        )
    return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)


def generate(path: str | Path, prompt: str, *, max_new_tokens: int = 64) -> str:
    """Greedy completion of `prompt` (wrapped in the chat template when the tokenizer has one), stopping at eos."""
    net, tokenizer, _ = load_for_inference(path)
    net.eval()
    return reply(net, tokenizer, [{"role": "user", "content": prompt}], max_new_tokens)


def generate_with_adapters(
    path: str | Path, adapters: dict[str, Path], prompt: str, *, max_new_tokens: int = 64
) -> dict[str, str]:
    """The reply of the base of `path` alone and with each adapter (the run's own included), the base loaded once."""
    net, tokenizer, names = load_with_adapters(path, adapters)
    net.eval()
    turns = [{"role": "user", "content": prompt}]
    with net.disable_adapter():
        replies = {"base": reply(net, tokenizer, turns, max_new_tokens)}
    for name in names:
        net.set_adapter(name)
        replies[name] = reply(net, tokenizer, turns, max_new_tokens)
    return replies


class _Streamer(TextStreamer):
    """transformers' streamer, writing to `out` instead of printing."""

    def __init__(self, tokenizer, out: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


def fit_context(net, tokenizer, history: list[dict], max_new_tokens: int) -> list[dict]:
    """The most recent turns that leave room for the reply in the model's context (the oldest exchanges go first;
    a leading system turn stays)."""
    limit = getattr(net.config.get_text_config(), "max_position_embeddings", None)
    system = history[:1] if history and history[0]["role"] == "system" else []
    turns = history[len(system) :]
    while limit and len(turns) > 1 and prompt_ids(tokenizer, system + turns).shape[1] + max_new_tokens > limit:
        turns = turns[2:]
    return system + turns


def chat(
    path: str | Path,
    *,
    max_new_tokens: int = 256,
    system: str | None = None,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
) -> None:
    """Talk with a model turn by turn: each reply streamed as it is generated, the conversation kept as history."""
    net, tokenizer, description = load_for_inference(path)
    net.eval()
    stdout.write(f"chatting with {description}; {CHAT_HELP}\n")
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            stdout.write("\n" if not line else "")
            return
        text = line.strip()
        if text == "/reset":
            history = list(start)
            stdout.write("(conversation cleared)\n")
            continue
        if not text:
            continue
        history = fit_context(net, tokenizer, [*history, {"role": "user", "content": text}], max_new_tokens)
        stdout.write("model> ")
        answer = reply(net, tokenizer, history, max_new_tokens, _Streamer(tokenizer, stdout))
        history.append({"role": "assistant", "content": answer})


def generate_image(
    path: str | Path, prompt: str, out: str | Path, *, steps: int = 30, seed: int = 0, guidance: float = 7.5
) -> Path:
    """One image of `prompt` from an image run (base + LoRA) or a pipeline directory, written to `out` (PNG unless its
    suffix names another format PIL writes)."""
    out = Path(out)
    if steps <= 0:
        raise UserError(f"--steps {steps}: give a positive number of denoising steps (e.g. 30)")
    if out.suffix.lower() not in Image.registered_extensions():
        raise UserError(f"--out {out}: name an image file, e.g. image.png")
    pipe = diffusion.load_for_generation(path, resolve_compute_dtype("auto"))
    if torch.cuda.is_available():
        pipe.to("cuda")
    with torch.no_grad():
        image = diffusion.render(pipe, prompt, 1, steps, guidance, seed)[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out
