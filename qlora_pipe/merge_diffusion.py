"""Merge stage of image runs: the base pipeline with the run's LoRA fused into its UNet (and text encoder), written
as a standalone diffusers pipeline directory that `StableDiffusionPipeline.from_pretrained` loads, verified like the
language merge: the written UNet (and text encoder) read back from disk against the base + LoRA, unfused, on the
same latents, timesteps and text, in fp32.

diffusers' fuse_lora does the fusing. Our part is what it cannot know: the weights the adapter was trained on. A run
whose UNet was NF4 (CUDA) trained against the dequantized NF4 weights, so its LoRA is fused into those (reproduced on
any device by quant.py, as for language models), not into the original ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from qlora_pipe import diffusion, quant
from qlora_pipe.manifest import atomic_dir, write_manifest
from qlora_pipe.merge import check_disk, check_fingerprint
from qlora_pipe.run import MERGE_REPORT, MERGED, Run, load_run

# Probe inputs of the verification: this many latents, at timesteps spread over the schedule.
PROBES = 2


def merge(run_dir: str | Path, *, dtype: str = "auto", out: str | Path | None = None, force: bool = False) -> Path:
    """Write RUN_DIR/merged (or `out`): the whole pipeline with the LoRA fused in, merge_report.json, manifest.json."""
    diffusion.require_diffusers()
    run = load_run(run_dir, images=True)
    check_fingerprint(run, diffusion.unet_weight_files, force)
    base = run.base  # a hub id stays one: diffusers reads the pipeline from the hub cache
    out = Path(out) if out else run.dir / MERGED
    pipe = diffusion.full_pipeline(base, torch.float32)
    mode = "original"
    if run.quantized:
        dequantize_as_trained(pipe.unet, run.quantization)
        mode = "dequantized"
    out_dtype = resolve_out_dtype(dtype, base)
    components = ["unet", *(["text_encoder"] if run.recipe.diffusion.train_text_encoder else [])]
    probe = probe_inputs(pipe, run)
    pipe.load_lora_weights(run.adapter)
    reference = outputs(pipe.unet, pipe.text_encoder, probe)
    pipe.fuse_lora(components=components)
    pipe.unload_lora_weights()
    if out_dtype != torch.float32:
        pipe.to(out_dtype)
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    check_disk(out, sum(p.numel() * p.element_size() for m in modules for p in m.parameters()))
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp)
        del pipe
        written = diffusion.load_components(str(tmp), torch.float32)
        report = {
            "output_dtype": str(out_dtype).removeprefix("torch."),
            "written_mode": mode,
            "reference": "base + LoRA (unfused, diffusers), fp32, vs the written pipeline read back in fp32; the same "
            "latents, timesteps and prompts",
            "components": compare(reference, outputs(written.unet, written.text_encoder, probe)),
        }
        (tmp / MERGE_REPORT).write_text(json.dumps(report, indent=2) + "\n")
        write_manifest(
            tmp,
            "merge",
            source_run=str(Path(run_dir).resolve()),
            base={"path": str(base)},
            mode=mode,
            dtype=report["output_dtype"],
            report=report["components"],
        )
    return out


def dequantize_as_trained(unet: torch.nn.Module, quantization: dict) -> None:
    """Replace each weight the run's UNet held in NF4 by its dequantization (from the weight in the load dtype, as
    diffusers' quantizer saw it)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    load_dtype = getattr(torch, quantization["load_dtype"])
    for name in quantization["quantized_modules"]:
        layer = unet.get_submodule(name)
        packed, state = quant.quantize_nf4(layer.weight.data.to(load_dtype), quantization, device)
        layer.weight.data = quant.dequantize_fp32(packed, state).to(layer.weight.device)


def resolve_out_dtype(name: str, base: str) -> torch.dtype:
    """`auto`: the dtype the base's UNet weights are stored in (float32 for a hub id: diffusers' own files are)."""
    if name != "auto":
        return getattr(torch, name)
    files = diffusion.unet_weight_files(base)
    if not files:
        return torch.float32
    with safe_open(files[0], "pt") as f:
        return f.get_tensor(next(iter(f.keys()))).dtype


def probe_inputs(pipe, run: Run) -> dict[str, torch.Tensor]:
    """Seeded latents, timesteps spread over the schedule, and two prompts (the validation prompt or instance prompt,
    and an unconditional one): what the UNet sees when it generates."""
    g = run.recipe.diffusion
    generator = torch.Generator().manual_seed(run.recipe.train.seed)
    size = pipe.unet.config.sample_size
    latents = torch.randn(PROBES, pipe.unet.config.in_channels, size, size, generator=generator)
    steps = pipe.scheduler.config.num_train_timesteps
    timesteps = torch.linspace(steps // 10, steps - steps // 10, PROBES).long()
    prompt = g.validation_prompt or g.instance_prompt or "a photo"
    tok = pipe.tokenizer
    ids = tok([prompt, ""], max_length=tok.model_max_length, padding="max_length", truncation=True).input_ids
    return {"latents": latents, "timesteps": timesteps, "input_ids": torch.tensor(ids)}


def outputs(unet, text_encoder, probe: dict) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        states = text_encoder(probe["input_ids"], return_dict=False)[0].float()
        noise = unet(probe["latents"], probe["timesteps"], states, return_dict=False)[0].float()
    return {"text_encoder": states, "unet": noise}


def compare(reference: dict[str, torch.Tensor], candidate: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Relative error ‖a − b‖ / ‖a‖ and the largest absolute difference, per component output."""
    return {
        name: {
            "relative_error": ((candidate[name] - ref).norm() / ref.norm().clamp_min(1e-30)).item(),
            "max_abs_diff": (candidate[name] - ref).abs().max().item(),
        }
        for name, ref in reference.items()
    }
