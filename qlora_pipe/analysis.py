"""`qlora-pipe adapter inspect`: what a trained LoRA learned, by the LoRA paper's analysis of the update
ΔW = s·B·A (Hu et al. 2021, §7).

Per module: the singular values of ΔW, its effective rank (how many directions hold 90 % and 99 % of its energy),
‖ΔW‖_F and, when the run's base is at hand, ‖ΔW‖_F / ‖W‖_F and the amplification factor ‖ΔW‖_F / ‖UᵀWV‖_F (U, V:
ΔW's singular vectors; W the weight the adapter was trained on, the NF4 dequantization for quantized layers). With a
second adapter, the subspace similarity φ(i, j) = ‖U_iᵀ U'_j‖_F² / min(i, j) of the right singular vectors of the two
A matrices (the paper's Fig. 3-4).

The SVD of ΔW is taken from its r × r core (QR of B and of Aᵀ), never from the d × d product: a 7B adapter takes
seconds, and the base is read one tensor at a time.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from qlora_pipe import UserError, model
from qlora_pipe.adapters import Adapter, load_adapter
from qlora_pipe.manifest import atomic_dir, write_json, write_manifest
from qlora_pipe.quant import nf4_layer, trained_weight_fp32
from qlora_pipe.run import ADAPTER_ANALYSIS, ADAPTER_REPORT, Run, find_adapter
from qlora_pipe.shards import checkpoint_files, read_index, read_tensor

SHARES = (0.90, 0.99)


@dataclass
class Spectrum:
    """ΔW = U·diag(values)·Vᵀ, with U (out × r) and V (in × r) orthonormal and the values descending."""

    values: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor


def spectrum(a: torch.Tensor, b: torch.Tensor, scale: float) -> Spectrum:
    """The SVD of s·B·A (B: out × r, A: r × in) from the r × r core R_B·R_Aᵀ of the QRs B = Q_B·R_B, Aᵀ = Q_A·R_A."""
    q_b, r_b = torch.linalg.qr(b.double())
    q_a, r_a = torch.linalg.qr(a.double().T)
    u, values, vh = torch.linalg.svd(scale * r_b @ r_a.T, full_matrices=False)
    return Spectrum(values, q_b @ u, q_a @ vh.T)


def effective_rank(values: torch.Tensor, share: float) -> int:
    """The fewest singular directions that hold `share` of ΔW's energy (Σσ²); 0 for a zero update."""
    energy = values.square()
    total = float(energy.sum())
    if total == 0.0:
        return 0
    return int((energy.cumsum(0) / total < share - 1e-12).sum()) + 1


def similarity(a: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """φ(i, j) for i ≤ r_a, j ≤ r_other: the overlap of the top-i and top-j right singular subspaces of two A
    matrices (r × in), in [0, 1]."""
    right = torch.linalg.svd(a.double(), full_matrices=False).Vh.T
    right_other = torch.linalg.svd(other.double(), full_matrices=False).Vh.T
    overlap = (right.T @ right_other).square().cumsum(0).cumsum(1)
    i = torch.arange(1, overlap.shape[0] + 1).unsqueeze(1)
    j = torch.arange(1, overlap.shape[1] + 1).unsqueeze(0)
    return overlap / torch.minimum(i, j)


def module_summary(found: Spectrum, rank: int, weight: torch.Tensor | None) -> dict:
    values = found.values
    summary = {
        "rank": rank,
        "singular_values": [float(x) for x in values],
        **{f"effective_rank_{round(share * 100)}": effective_rank(values, share) for share in SHARES},
        "delta_norm": float(values.norm()),
    }
    if weight is not None:
        w = weight.double()
        summary["weight_norm"] = float(w.norm())
        summary["relative_to_weight"] = summary["delta_norm"] / summary["weight_norm"]
        projected = float((found.u.T @ w @ found.v).norm())
        summary["amplification"] = summary["delta_norm"] / projected if projected else math.inf
    return summary


# ------------------------------------------------------------------------------------------------ the trained base


def trained_weights(run: Run, modules: list[str]):
    """(module, W) for each LoRA module, W as training multiplied by it (NF4 round trip for quantized layers),
    (out, in); nothing when the base is not a local safetensors checkpoint."""
    base = Path(run.base)
    files = checkpoint_files(base) if base.is_dir() else []
    if not files:
        return
    net = model.skeleton(base, run.recipe.model.trust_remote_code, run.labels)
    conv1d = {name for name, m in net.named_modules() if isinstance(m, Conv1D)}
    refs = {ref.key: ref for ref in read_index(files)}
    names = {param: key for key, param in model.parameter_names(net, list(refs)).items() if param}
    quantized = run.quantization.get("quantized_modules", {}) if run.quantized else {}
    dtypes = run.quantization.get("unquantized_dtypes", {})
    for module in modules:
        key = names.get(f"{module}.weight")
        if key is None:
            continue
        weight = read_tensor(refs[key])
        weight = (weight.T if module in conv1d else weight).float()
        if module in quantized:  # nf4_layer casts to the load dtype first, as loading did
            weight = trained_weight_fp32(nf4_layer(weight, run.quantization, torch.device("cpu")))
        else:
            weight = weight.to(getattr(torch, dtypes.get(f"{module}.weight", run.quantization["load_dtype"])))
        yield module, weight.float()


# ---------------------------------------------------------------------------------------------------- the stage


def resolve(path: Path) -> tuple[Adapter, Path, Run | None]:
    """The adapter at `path`, where it is, and its run when there is one."""
    where, run = find_adapter(path)
    return load_adapter(where), where, run


def layer_and_kind(module: str) -> tuple[int | None, str]:
    """model.layers.12.self_attn.q_proj → (12, q_proj)."""
    found = re.search(r"\.(\d+)\.", module)
    return (int(found.group(1)) if found else None), module.rsplit(".", 1)[-1]


def advice(modules: dict[str, dict]) -> str:
    """One line on the rank: the most directions any module needs for 90 % of its update, against the rank."""
    rank = max(m["rank"] for m in modules.values())
    needed = max(m["effective_rank_90"] for m in modules.values())
    if needed == 0:
        return "the update is zero in every module: the adapter has not been trained"
    enough = 2 ** math.ceil(math.log2(needed))
    if enough < rank:
        return (
            f"rank {rank} uses at most {needed} directions for 90 % of the update in every module: "
            f"r={enough} is enough"
        )
    return (
        f"rank {rank} is used: up to {needed} of its {rank} directions hold 90 % of the update in some module; "
        "a larger rank may learn more"
    )


def inspect(path: str | Path, *, compare: str | Path | None = None, out: str | Path | None = None) -> Path:
    """Write OUTPUT (default RUN_DIR/adapter_analysis, or ADAPTER_analysis beside a bare adapter): the report, the
    figures and a manifest."""
    path = Path(path)
    adapter, where, run = resolve(path)
    other = resolve(Path(compare))[0] if compare else None
    modules = sorted(adapter.lora)
    weights = dict(trained_weights(run, modules)) if run else {}
    report = {}
    for module in tqdm(modules, desc="modules", unit="module"):
        a, b = adapter.lora[module]
        found = spectrum(a, b, adapter.scaling)
        report[module] = module_summary(found, a.shape[0], weights.get(module))
        if other is not None and module in other.lora:
            phi = similarity(a, other.lora[module][0])
            report[module]["subspace_similarity"] = [[round(float(x), 4) for x in row] for row in phi]
    if not report:
        raise UserError(f"{where}: the adapter holds no LoRA modules")
    out = Path(out) if out else (run.dir / ADAPTER_ANALYSIS if run else where.with_name(f"{where.name}_analysis"))
    summary = {"adapter": str(where), "compared_with": str(compare) if compare else None, "advice": advice(report)}
    with atomic_dir(out) as tmp:
        write_json(tmp / ADAPTER_REPORT, summary | {"modules": report})
        plot_spectra(report, tmp / "spectra.png")
        plot_effective_rank(report, tmp / "effective_rank.png")
        if other is not None:
            plot_similarity(report, tmp / "similarity.png")
        write_manifest(
            tmp, "inspect", source=str(where), compared_with=summary["compared_with"], report=ADAPTER_REPORT
        )
    return out


# ---------------------------------------------------------------------------------------------------- figures


def plot_spectra(report: dict[str, dict], out: Path) -> None:
    """σ_k / σ_1 of every module, one colour per module kind."""
    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.subplots()
    colours: dict[str, str] = {}
    for module, summary in report.items():
        values = summary["singular_values"]
        if not values or values[0] == 0:
            continue
        kind = layer_and_kind(module)[1]
        colour = colours.setdefault(kind, f"C{len(colours) % 10}")
        ax.plot(range(1, len(values) + 1), [v / values[0] for v in values], color=colour, alpha=0.4, lw=0.8)
    for kind, colour in colours.items():
        ax.plot([], [], color=colour, label=kind)
    ax.set_yscale("log")
    ax.set_xlabel("singular direction k")
    ax.set_ylabel("σ_k / σ_1")
    ax.set_title("spectrum of ΔW per module")
    if colours:
        ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(out)


def plot_effective_rank(report: dict[str, dict], out: Path) -> None:
    """Effective rank (90 %) by layer (rows) and module kind (columns)."""
    cells = {layer_and_kind(m): s["effective_rank_90"] for m, s in report.items()}
    layers = sorted({layer for layer, _ in cells if layer is not None})
    kinds = sorted({kind for _, kind in cells})
    grid = [[cells.get((layer, kind), float("nan")) for kind in kinds] for layer in layers] or [[float("nan")]]
    fig = Figure(figsize=(1.2 + 0.9 * len(kinds), 1.5 + 0.25 * max(len(layers), 1)), dpi=100)
    ax = fig.subplots()
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right", fontsize="small")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize="x-small")
    ax.set_ylabel("layer")
    ax.set_title("effective rank (90 % of ‖ΔW‖²)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(out)


def plot_similarity(report: dict[str, dict], out: Path) -> None:
    """φ(i, j) averaged over the modules both adapters train."""
    grids = [torch.tensor(s["subspace_similarity"]) for s in report.values() if "subspace_similarity" in s]
    fig = Figure(figsize=(7, 3.5), dpi=100)
    ax = fig.subplots()
    if grids:
        mean = torch.stack(grids).mean(0)
        image = ax.imshow(mean.numpy(), aspect="auto", cmap="magma", vmin=0, vmax=1, origin="lower")
        fig.colorbar(image, ax=ax)
    ax.set_xlabel("j (compared adapter)")
    ax.set_ylabel("i (this adapter)")
    ax.set_title("subspace similarity φ(i, j) of the A matrices, mean over modules")
    fig.tight_layout()
    fig.savefig(out)
