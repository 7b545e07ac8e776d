"""Generate from a merged directory, a training run (NF4 base + adapter) or a plain base directory."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from qlora_pipe import UserError, model
from qlora_pipe.config import recipe_from_dict
from qlora_pipe.manifest import MANIFEST, read_manifest
from qlora_pipe.train import load_run


def load(path: str | Path) -> tuple[torch.nn.Module, object, str]:
    """Return (model, tokenizer, description) for a run dir, a run's adapter dir, or a standalone checkpoint."""
    path = Path(path)
    if (path / "adapter_config.json").exists() and (path.parent / MANIFEST).exists():
        path = path.parent  # the adapter of a run: load it the way it was trained
    if (path / MANIFEST).exists() and read_manifest(path).get("stage") == "train":
        manifest, adapter = load_run(path)
        recipe = recipe_from_dict(manifest["recipe"])
        base = model.load_run_base(manifest, model.resolve_compute_dtype(recipe.model.compute_dtype))
        if manifest["quantization"]["method"] == "nf4":
            model.set_cpu_bf16_fastpath(base, False)  # compute as training did, in the recipe's compute dtype
        return PeftModel.from_pretrained(base, adapter), model.load_tokenizer(str(adapter)), f"{path} (base + adapter)"
    if (path / "config.json").exists():
        config = AutoConfig.from_pretrained(path)
        classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
        auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
        net = auto.from_pretrained(path, dtype="auto", device_map=model.device_map(), use_safetensors=True)
        return net, model.load_tokenizer(str(path)), str(path)
    raise UserError(f"{path}: not a merged model, a training run or a model directory (no config.json or manifest)")


def generate(path: str | Path, prompt: str, max_new_tokens: int = 64) -> str:
    """Greedy completion of `prompt` (wrapped in the chat template when the tokenizer has one), stopping at eos."""
    net, tokenizer, _ = load(path)
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
