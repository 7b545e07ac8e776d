"""Generate stage: greedy completion from a merged directory, a training run (NF4 base + adapter) or a plain base
directory."""

from __future__ import annotations

from pathlib import Path

import torch

from qlora_pipe.model import load_for_inference


def generate(path: str | Path, prompt: str, *, max_new_tokens: int = 64) -> str:
    """Greedy completion of `prompt` (wrapped in the chat template when the tokenizer has one), stopping at eos."""
    net, tokenizer, _ = load_for_inference(path)
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=tokenizer.chat_template is None).to(net.device)
    eos = net.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    net.eval()
    with torch.no_grad():
        output = net.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=[tokenizer.eos_token_id, *eos],
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
