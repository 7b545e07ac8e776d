"""Merge stage: fold the trained LoRA into a standalone checkpoint that plain transformers loads, and prove it.

Why our own: PEFT's `merge_and_unload` on a 4-bit model re-quantizes the merged weight to NF4 (lossy), and merging
into the original full-precision weights gives a model that differs from the one trained, whose base was the NF4
dequantization. Mode `dequantized` (default) rebuilds the model exactly as training saw it — NF4 weights dequantized
bit for bit by bitsandbytes, every other tensor as loaded for training — and lets PEFT merge the adapter into that
full-precision copy. Mode `original` merges into the original weights instead. Both are scored against the NF4 base
+ adapter in `merge_report.json`. This merge holds the model in memory; a streaming one is a later stage.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import bitsandbytes as bnb
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
from transformers.pytorch_utils import Conv1D

from qlora_pipe import UserError, data, model
from qlora_pipe.config import recipe_from_dict
from qlora_pipe.manifest import atomic_dir, fingerprint_weights, write_manifest
from qlora_pipe.train import load_run

logger = logging.getLogger(__name__)

MODES = ("dequantized", "original")
OUT_DTYPES = ("auto", "float32", "bfloat16", "float16")
REPORT = "merge_report.json"
REPORT_PROMPTS = 8


def dequantize_fp32(param: bnb.nn.Params4bit) -> torch.Tensor:
    """The NF4 weight as bitsandbytes' matmul sees it. Its gemm_4bit dequantizes straight into the compute dtype: code
    × block scale computed in fp32, cast once. In fp32 that product is exact, and casting it to bf16 gives, bit for
    bit, the weight a bf16 run multiplied by (dequantizing via the stored dtype first would round twice)."""
    state = copy.copy(param.quant_state)
    state.dtype = torch.float32
    return bnb.functional.dequantize_4bit(param.data, state)


def trained_weights(nf4_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as training saw it, in fp32: NF4 weights dequantized as bitsandbytes' matmul does, the rest as
    loaded (fp32 holds every bf16/fp16 value exactly)."""
    weights = {}
    for name, param in nf4_model.named_parameters(remove_duplicate=False):
        if isinstance(param, bnb.nn.Params4bit):
            weights[name] = dequantize_fp32(param)
        else:
            weights[name] = param.detach().float()
    return weights


def build_dequantized(base: str, weights: dict[str, torch.Tensor], trust_remote_code: bool) -> torch.nn.Module:
    """A full-precision model of the base's architecture holding the trained (dequantized) weights."""
    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    fp32 = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    modules = dict(fp32.named_modules())
    for name, tensor in weights.items():
        owner = modules[name.rpartition(".")[0]]
        # transformers transposes GPT-2 style Conv1D weights to (out, in) before quantizing; undo it.
        if isinstance(owner, Conv1D) and name.endswith(".weight"):
            weights[name] = tensor.t().contiguous()
    missing, unexpected = fp32.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"dequantized weights do not fit the architecture: missing {missing}, extra {unexpected}")
    return fp32


@torch.no_grad()
def logits_on(net: torch.nn.Module, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    net.eval()
    return [net(input_ids=ids[None].to(net.device)).logits[0].float().cpu() for ids in prompts]


def compare(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> dict[str, float]:
    ref, got = torch.cat(reference), torch.cat(candidate)
    diff = (got - ref).abs()
    return {
        "max_abs_logit_diff": diff.max().item(),
        "mean_abs_logit_diff": diff.mean().item(),
        "relative_error": (diff.norm() / ref.norm()).item(),
        "top1_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        "positions": ref.shape[0],
    }


def report_prompts(recipe, tokenizer) -> list[torch.Tensor]:
    """Held-out examples (the eval split, else the first training rows), tokenized as training saw them."""
    prepared = data.load_data(recipe.data, tokenizer, recipe.train.seed)
    rows = prepared.eval if prepared.eval is not None else prepared.train
    rows = rows.select(range(min(REPORT_PROMPTS, len(rows))))
    return [
        tokenizer(
            data.render(row, tokenizer),
            return_tensors="pt",
            add_special_tokens=False,
            truncation=True,
            max_length=recipe.data.max_seq_length,
        ).input_ids[0]
        for row in rows
    ]


def resolve_out_dtype(name: str, base: str, trust_remote_code: bool) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    dtype = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code).dtype or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def check_base_unchanged(manifest: dict, force: bool) -> str:
    base = manifest["base"]["path"]
    recorded = manifest["base"].get("weights_fingerprint")
    if not Path(base).is_dir():
        if recorded:
            raise UserError(f"the base this run was trained on is gone: {base}")
        return base
    if recorded and fingerprint_weights(model.weight_files(base)) != recorded and not force:
        raise UserError(
            f"the weights in {base} differ from those this adapter was trained on (fingerprint mismatch); "
            "merge onto the original base, or pass --force to merge anyway"
        )
    return base


def merge(
    run_dir: str | Path,
    mode: str = "dequantized",
    dtype: str = "auto",
    out: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Write RUN_DIR/merged (or `out`): the standalone merged checkpoint, merge_report.json and manifest.json."""
    manifest, adapter_dir = load_run(run_dir)
    recipe = recipe_from_dict(manifest["recipe"])
    base = check_base_unchanged(manifest, force)
    q = manifest["quantization"]
    if q["method"] == "nf4" and q["device_kind"] != model.device_kind():
        logger.warning(
            "the base was quantized on %s during training and is re-quantized on %s now; "
            "the two quantizers may round differently",
            q["device_kind"],
            model.device_kind(),
        )
    out = Path(out) if out else Path(run_dir) / "merged"
    out_dtype = resolve_out_dtype(dtype, base, recipe.model.trust_remote_code)
    tokenizer = model.load_tokenizer(str(adapter_dir), recipe.model.trust_remote_code)
    prompts = report_prompts(recipe, tokenizer)

    # The model that was trained, with exact fp32 matmuls: same NF4 load dtype (it sets the block scales).
    trained = model.load_base(recipe.model, torch.float32, q["method"] == "nf4", getattr(torch, q["load_dtype"]))
    model.set_cpu_bf16_fastpath(trained, False)
    weights = trained_weights(trained)
    for param in trained.parameters():
        if not isinstance(param, bnb.nn.Params4bit):
            param.data = param.data.float()  # exact upcast, as prepare_model_for_kbit_training does for training
    reference = logits_on(PeftModel.from_pretrained(trained, adapter_dir), prompts)
    del trained

    report = {"reference": "NF4 base + adapter, fp32 compute", "output_dtype": str(out_dtype), "modes": {}}
    written = None
    for candidate in MODES:
        if candidate == "dequantized":
            full = build_dequantized(base, weights, recipe.model.trust_remote_code)
        else:
            full = AutoModelForCausalLM.from_pretrained(
                base, dtype=torch.float32, trust_remote_code=recipe.model.trust_remote_code
            )
        merged = PeftModel.from_pretrained(full, adapter_dir).merge_and_unload().to(out_dtype)
        report["modes"][candidate] = compare(reference, logits_on(merged, prompts))
        if candidate == mode:
            written = merged
    report["written_mode"] = mode

    with atomic_dir(out) as tmp:
        save_standalone(written, tokenizer, base, tmp)
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        write_manifest(
            tmp,
            "merge",
            source_run=str(Path(run_dir).resolve()),
            base={"path": base},
            mode=mode,
            dtype=str(out_dtype).removeprefix("torch."),
            report=report["modes"][mode],
        )
    return out


def save_standalone(merged: torch.nn.Module, tokenizer, base: str, out: Path) -> None:
    """safetensors + config.json without quantization_config + tokenizer + generation_config that stops at eos."""
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config
    try:
        gen = GenerationConfig.from_pretrained(base)
    except OSError:  # generation_config.json is optional in a checkpoint
        gen = GenerationConfig()
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    if tokenizer.eos_token_id not in eos:
        gen.eos_token_id = [tokenizer.eos_token_id, *[e for e in eos if e is not None]]
    merged.generation_config = gen
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
