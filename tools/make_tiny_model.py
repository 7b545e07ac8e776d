"""Build a tiny random decoder-only model with an in-process trained BPE tokenizer and a chat template.

Deterministic from a seed; nothing is downloaded. Used by the demo (Llama, a few million parameters) and by the tests
(Llama, Mistral, Qwen2 with tied embeddings, GPT-2 with Conv1D layers).

    python tools/make_tiny_model.py OUT_DIR [--arch llama] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    PreTrainedTokenizerFast,
)

SPECIAL = {"bos": "<|bos|>", "eos": "<|im_end|>", "pad": "<|pad|>", "start": "<|im_start|>"}
# ChatML with {% generation %} markers, so TRL can mask the loss to assistant tokens. The end-of-turn token (the eos)
# sits inside the marked span: it is trained, and the model learns to stop.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
DEFAULT_CORPUS = Path(__file__).resolve().parent.parent / "data" / "tiny" / "train.jsonl"

# init_std 0.1 rather than transformers' 0.02: with a frozen random lm_head of std 0.02 the largest logit margin a
# LoRA can reach is ~5 nats, which caps the demo's loss near 2.3; at 0.1 it falls by ~95 % in half a minute.
# Widths divisible by 32 so bitsandbytes' avx512-bf16 CPU path can repack them.
ARCHS = {
    "llama": dict(
        model_type="llama",
        hidden_size=256,
        intermediate_size=768,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
    "mistral": dict(
        model_type="mistral",
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=64,
        tie_word_embeddings=False,
    ),
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "gpt2": dict(model_type="gpt2", n_embd=128, n_head=4, n_inner=256, tie_word_embeddings=True),
}


def corpus_lines(path: Path) -> list[str]:
    """Text to train the tokenizer on: every string value of a JSONL file, plus a fixed fallback sentence."""
    lines = ["The quick brown fox jumps over the lazy dog. 0123456789"]
    if path.exists():
        for row in map(json.loads, path.read_text().splitlines()):
            stack = [row]
            while stack:
                item = stack.pop()
                if isinstance(item, str):
                    lines.append(item)
                elif isinstance(item, dict):
                    stack.extend(item.values())
                elif isinstance(item, list):
                    stack.extend(item)
    return lines


def build_tokenizer(lines: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"],
        pad_token=SPECIAL["pad"],
        additional_special_tokens=[SPECIAL["start"]],
        chat_template=CHAT_TEMPLATE,
    )


def build(
    out_dir: str | Path,
    arch: str = "llama",
    seed: int = 0,
    num_layers: int = 4,
    vocab_size: int = 1024,
    corpus: Path = DEFAULT_CORPUS,
    dtype: torch.dtype = torch.float32,
    init_std: float = 0.1,
) -> Path:
    """Write a tiny random model of `arch` with tokenizer and chat template to `out_dir`; return the directory."""
    out = Path(out_dir)
    tokenizer = build_tokenizer(corpus_lines(corpus), vocab_size)
    spec = dict(ARCHS[arch])
    model_type = spec.pop("model_type")
    ids = {f"{k}_token_id": tokenizer.convert_tokens_to_ids(SPECIAL[k]) for k in ("bos", "eos", "pad")}
    layers = {"n_layer": num_layers} if model_type == "gpt2" else {"num_hidden_layers": num_layers}
    positions = {"n_positions": 512} if model_type == "gpt2" else {"max_position_embeddings": 512}
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), initializer_range=init_std, **layers, **positions, **spec, **ids
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="llama")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--init-std", type=float, default=0.1, help="std of the random weights")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="JSONL whose strings train the tokenizer")
    args = parser.parse_args()
    out = build(args.out_dir, args.arch, args.seed, args.layers, args.vocab_size, args.corpus, init_std=args.init_std)
    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(out).parameters())
    print(f"tiny {args.arch} model ({n / 1e6:.1f}M parameters) written to {out}")


if __name__ == "__main__":
    main()
