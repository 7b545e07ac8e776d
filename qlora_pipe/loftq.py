"""LoftQ stage: a quantization-aware LoRA initialisation (Li et al., 2023), streamed, on the CPU or a GPU.

Alternate Q = NF4(W − s·B·A) and s·B·A = best rank-r approximation of W − Q; then train in NF4 from Q with the
adapter starting at (A, B), so that NF4 base + adapter starts close to the full-precision model.

Why our own: PEFT's `loftq_init` hard-codes a CUDA/XPU device and works on the whole model in memory; it sets
B·A ≈ W − Q without dividing by the LoRA scale s = alpha/r (right only when alpha == r, peft issue 1982); and it
quantizes without double quant, while training re-quantizes the backbone with the recipe's settings. Here every
matrix is fitted with the recipe's exact NF4 settings, for any alpha and rsLoRA, and the final A, B are fitted to
the Q that training will load (the stored backbone, re-quantized).

`lora.init: pissa` runs the same stage with PiSSA's start instead (Meng et al., 2024, quantized as its QPiSSA): the
adapter is W's principal rank-r part and the backbone the residual, which training quantizes. It fits this stage
as it is: a backbone in place of each targeted weight plus an adapter to start from, written, resumed, loaded and
merged the same way. PEFT's own `init_lora_weights="pissa"` needs the full-precision model in memory and leaves the
residual for the user to save and quantize.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoConfig, GenerationConfig
from transformers.pytorch_utils import Conv1D

from qlora_pipe import UserError, model
from qlora_pipe.config import Recipe, lora_scale, recipe_to_dict
from qlora_pipe.manifest import MANIFEST, atomic_dir, fingerprint_weights, read_manifest, write_manifest
from qlora_pipe.quant import dequantize_fp32, quantize_nf4
from qlora_pipe.run import ADAPTER_INIT, BACKBONE, LOFTQ, LOFTQ_PARTIAL, LOFTQ_REPORT, world_size
from qlora_pipe.shards import OutTensor, ShardWriter, TensorRef, checkpoint_files, read_index, read_tensor

logger = logging.getLogger(__name__)

OVERSAMPLE = 8  # extra columns for torch.svd_lowrank


@dataclass
class Fit:
    """One matrix's LoftQ result: the backbone weight Q (fp32, (out, in)), A, B, and the errors."""

    q: torch.Tensor
    backbone: torch.Tensor  # what is stored: training re-quantizes it into exactly `q`
    a: torch.Tensor
    b: torch.Tensor
    error_nf4: float  # ‖W − NF4(W)‖_F: plain NF4 of the original weight, what training without this stage starts from
    error_backbone: float  # ‖W − Q‖_F, the backbone alone, Q as training loads it
    error_loftq: float  # ‖W − (Q + s·B·A)‖_F: where training with this stage starts
    norm_w: float
    seconds: float


def nf4_roundtrip(weight: torch.Tensor, quantization: dict, device: torch.device) -> torch.Tensor:
    """The fp32 weight bitsandbytes' matmul would use for `weight` quantized with the recipe's NF4 settings."""
    packed, state = quantize_nf4(
        weight.to(device, getattr(torch, quantization["load_dtype"])).contiguous(), quantization, device
    )
    return dequantize_fp32(packed, state)


def low_rank(residual: torch.Tensor, rank: int, svd: str) -> tuple[torch.Tensor, torch.Tensor]:
    """L (out, r), R (r, in): L·R is the best rank-r approximation of `residual`, √S on each side (as PEFT splits)."""
    if svd == "exact":
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    else:
        u, s, v = torch.svd_lowrank(residual, q=min(rank + OVERSAMPLE, *residual.shape), niter=2)
        vh = v.T
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def fit_pissa(
    weight: torch.Tensor,
    quantization: dict,
    rank: int,
    scaling: float,
    svd: str,
    storage_dtype: torch.dtype | None,
    device: torch.device,
) -> Fit:
    """PiSSA on one (out, in) weight, quantized as in its paper (QPiSSA): the adapter starts as W's principal rank-r
    part L·R (its top singular directions) and the backbone is the residual W − L·R, which training quantizes; the
    model starts at Q(W − L·R) + L·R."""
    start = time.monotonic()
    w = weight.to(device, torch.float32)
    left, right = low_rank(w, rank, svd)
    backbone = w - left @ right
    if storage_dtype is not None:
        backbone = backbone.to(storage_dtype)
    q = nf4_roundtrip(backbone, quantization, device)
    root = math.sqrt(scaling)
    b, a = left / root, right / root
    return Fit(
        q.cpu(),
        backbone.cpu(),
        a.cpu(),
        b.cpu(),
        torch.linalg.matrix_norm(w - nf4_roundtrip(w, quantization, device)).item(),
        torch.linalg.matrix_norm(w - q).item(),
        torch.linalg.matrix_norm(w - (q + scaling * (b @ a))).item(),
        torch.linalg.matrix_norm(w).item(),
        time.monotonic() - start,
    )


def fit_matrix(
    weight: torch.Tensor,
    quantization: dict,
    rank: int,
    scaling: float,
    iters: int,
    svd: str,
    storage_dtype: torch.dtype | None,
    device: torch.device,
) -> Fit:
    """LoftQ on one (out, in) weight. `storage_dtype`: the dtype the backbone is saved in; training re-quantizes that
    stored Q, so the final A, B are fitted to the re-quantized one (None: fit to Q as found, as PEFT does)."""
    start = time.monotonic()
    w = weight.to(device, torch.float32)
    target, best, error_nf4 = w, None, None
    for _ in range(iters):
        q = nf4_roundtrip(target, quantization, device)
        if error_nf4 is None:  # the first target is W itself: this Q is plain NF4's
            error_nf4 = torch.linalg.matrix_norm(w - q).item()
        left, right = low_rank(w - q, rank, svd)
        error = torch.linalg.matrix_norm(w - q - left @ right).item()
        if best is None or error < best[0]:
            best = (error, q, left, right)
        target = w - left @ right
    _, q, left, right = best
    backbone = q
    if storage_dtype is not None:
        backbone = q.to(storage_dtype)
        q = nf4_roundtrip(backbone, quantization, device)
        left, right = low_rank(w - q, rank, svd)
    # s·B·A = L·R: split the 1/s evenly between B and A
    root = math.sqrt(scaling)
    b, a = left / root, right / root
    error_loftq = torch.linalg.matrix_norm(w - (q + scaling * (b @ a))).item()
    return Fit(
        q.cpu(),
        backbone.cpu(),
        a.cpu(),
        b.cpu(),
        error_nf4,
        torch.linalg.matrix_norm(w - q).item(),
        error_loftq,
        torch.linalg.matrix_norm(w).item(),
        time.monotonic() - start,
    )


def target_modules(base: Path, recipe: Recipe) -> tuple[dict[str, str], set[str]]:
    """checkpoint key → module name of every weight LoRA targets and bitsandbytes quantizes; the Conv1D modules."""
    net = model.skeleton(base, recipe.model.trust_remote_code)
    modules = model.lora_targets(net, recipe.lora.target_modules)
    conv1d = {n for n, m in modules.items() if isinstance(m, Conv1D)}
    names = model.parameter_names(net, [r.key for r in read_index(checkpoint_files(base))])
    keys = {
        key: name.removesuffix(".weight")
        for key, name in names.items()
        if name and name.endswith(".weight") and name.removesuffix(".weight") in modules
    }
    if not keys:
        raise UserError(f"lora.target_modules: no weight of {base} matches {recipe.lora.target_modules!r}")
    return keys, conv1d


def settings(recipe: Recipe, quantization: dict) -> dict:
    lo = recipe.lora
    return {
        "r": lo.r,
        "alpha": lo.alpha,
        "use_rslora": lo.use_rslora,
        "target_modules": lo.target_modules,
        "init": lo.init,
        "iters": lo.loftq_iters,
        "svd": lo.loftq_svd,
        "quantization": quantization,
    }


def run_loftq(recipe: Recipe, *, device: str = "auto") -> Path:
    """Write OUTPUT_DIR/loftq: backbone/ (Q in place of each targeted weight), adapter_init/ (a PEFT adapter with
    A, B), loftq_report.json and manifest.json. Resumes from the matrices a previous run finished."""
    base = model.local_checkpoint(model.check_base(recipe.model.base))
    files = checkpoint_files(base)
    if not files:
        raise UserError(f"model.base: {base} has no safetensors weights; LoftQ reads *.safetensors")
    quantization = model.nf4_settings(model.resolve_compute_dtype(recipe.model.compute_dtype))
    dev = model.compute_device(device)
    out = Path(recipe.output_dir) / LOFTQ
    partial = Path(recipe.output_dir) / LOFTQ_PARTIAL
    wanted = settings(recipe, quantization)
    if partial.exists() and json.loads((partial / "settings.json").read_text()) != json.loads(json.dumps(wanted)):
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "settings.json").write_text(json.dumps(wanted))

    keys, conv1d = target_modules(base, recipe)
    refs = read_index(files)
    lo = recipe.lora
    scaling = lora_scale(lo.r, lo.alpha, lo.use_rslora)
    logger.info("LoftQ: fitting %d matrices on %s", len(keys), dev.type)
    for index, ref in enumerate(tqdm([r for r in refs if r.key in keys], desc="LoftQ", unit="matrix")):
        done = partial / f"{index:05d}.safetensors"
        if done.exists():
            continue
        tensor = read_tensor(ref)
        transposed = keys[ref.key] in conv1d
        matrix = tensor.T if transposed else tensor
        if lo.init == "pissa":
            fit = fit_pissa(matrix, quantization, lo.r, scaling, lo.loftq_svd, tensor.dtype, dev)
        else:
            fit = fit_matrix(matrix, quantization, lo.r, scaling, lo.loftq_iters, lo.loftq_svd, tensor.dtype, dev)
        q = (fit.backbone.T if transposed else fit.backbone).to(tensor.dtype).contiguous()
        facts = {
            "key": ref.key,
            "module": keys[ref.key],
            "error_nf4": fit.error_nf4,
            "error_backbone": fit.error_backbone,
            "error_loftq": fit.error_loftq,
            "improvement": 1 - fit.error_loftq / fit.error_nf4,
            "norm_w": fit.norm_w,
            "seconds": fit.seconds,
        }
        tmp = done.with_suffix(".tmp")
        save_file(
            {"q": q, "a": fit.a.contiguous(), "b": fit.b.contiguous()}, tmp, metadata={"facts": json.dumps(facts)}
        )
        tmp.rename(done)

    with atomic_dir(out) as tmp:
        report = write_outputs(recipe, base, refs, keys, partial, tmp, out / BACKBONE)
        write_manifest(
            tmp,
            "loftq",
            recipe=recipe_to_dict(recipe),
            base={"path": str(base), "weights_fingerprint": fingerprint_weights(files)},
            settings=wanted,
            device=dev.type,
            summary=report["summary"],
        )
    shutil.rmtree(partial)
    s = report["summary"]
    logger.info(
        "LoftQ: %d matrices, relative error plain NF4 ‖W−NF4(W)‖ %.4f → ‖W−(Q+sBA)‖ %.4f (%.1f %% lower; "
        "backbone alone ‖W−Q‖ %.4f), %.1f s",
        s["matrices"],
        s["relative_error_nf4"],
        s["relative_error_loftq"],
        100 * s["improvement"],
        s["relative_error_backbone"],
        s["seconds"],
    )
    return out


def write_outputs(
    recipe: Recipe,
    base: Path,
    refs: list[TensorRef],
    keys: dict[str, str],
    partial: Path,
    out: Path,
    final_backbone: Path,
) -> dict:
    """Assemble backbone/ (streamed, shard by shard), adapter_init/ and the report from the per-matrix results."""
    fits = {key: partial / f"{i:05d}.safetensors" for i, key in enumerate(r.key for r in refs if r.key in keys)}
    backbone = out / BACKBONE
    backbone.mkdir()
    writer = ShardWriter(backbone, [OutTensor(r.key, r.dtype, r.shape) for r in refs], 5 * 10**9)
    adapter, rows = {}, []
    for ref in refs:
        if ref.key not in fits:
            writer.write(ref.key, read_tensor(ref))
            continue
        with safe_open(fits[ref.key], "pt") as f:
            writer.write(ref.key, f.get_tensor("q"))
            prefix = f"base_model.model.{keys[ref.key]}"
            adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"] = (
                f.get_tensor("a"),
                f.get_tensor("b"),
            )
            rows.append(json.loads(f.metadata()["facts"]))
    writer.close()
    trust = recipe.model.trust_remote_code
    AutoConfig.from_pretrained(base, trust_remote_code=trust).save_pretrained(backbone)
    if (base / "generation_config.json").exists():
        GenerationConfig.from_pretrained(base).save_pretrained(backbone)
    model.load_tokenizer(str(base), trust).save_pretrained(backbone)
    write_adapter(recipe, final_backbone, out / ADAPTER_INIT, adapter)
    report = {"matrices": rows, "summary": summarize(rows)}
    (out / LOFTQ_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


def write_adapter(recipe: Recipe, backbone: Path, out: Path, tensors: dict[str, torch.Tensor]) -> None:
    config = model.lora_config(recipe)
    config.base_model_name_or_path = str(backbone.resolve())
    config.target_modules = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors})
    config.save_pretrained(out)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})


def summarize(rows: list[dict]) -> dict:
    """Totals over the matrices (Frobenius norms of the stacked errors). The baseline is plain NF4 of the original
    weights, what the user trains from without this stage; `improvement` is 1 − ‖W − (Q + s·B·A)‖ / ‖W − NF4(W)‖."""
    norm_w = math.sqrt(sum(r["norm_w"] ** 2 for r in rows))
    totals = {name: math.sqrt(sum(r[f"error_{name}"] ** 2 for r in rows)) for name in ("nf4", "backbone", "loftq")}
    return {
        "matrices": len(rows),
        **{f"error_{name}": total for name, total in totals.items()},
        **{f"relative_error_{name}": total / norm_w for name, total in totals.items()},
        "improvement": 1 - totals["loftq"] / totals["nf4"],
        "improvement_min": min(r["improvement"] for r in rows),
        "improvement_max": max(r["improvement"] for r in rows),
        "matrices_improved": sum(r["error_loftq"] < r["error_nf4"] for r in rows),
        "seconds": sum(r["seconds"] for r in rows),
    }


def loftq_outputs(recipe: Recipe) -> tuple[Path, Path]:
    """backbone/ and adapter_init/ for training, running the stage first when its output is missing or stale."""
    out = Path(recipe.output_dir) / LOFTQ
    wanted = settings(recipe, model.nf4_settings(model.resolve_compute_dtype(recipe.model.compute_dtype)))
    fresh = (out / MANIFEST).exists() and read_manifest(out, "loftq")["settings"] == json.loads(json.dumps(wanted))
    if not fresh and world_size() > 1:
        # LoftQ of a 7B base takes longer than a process group waits (10-30 min), and it needs one process's memory
        raise UserError(
            f"lora.init: loftq: {out} is {'stale' if (out / MANIFEST).exists() else 'missing'}; compute it once "
            "with one process (`qlora-pipe loftq RECIPE`), then launch the ranks"
        )
    if not fresh:
        run_loftq(recipe)
    return out / BACKBONE, out / ADAPTER_INIT
