"""`qlora-pipe adapter combine`: one adapter from several, weighted, through PEFT's `add_weighted_adapter` (linear,
cat, svd, ties, dare, magnitude prune).

Why a shell model: `add_weighted_adapter` reads only the adapters' A and B, but PEFT holds adapters on a model. Loading
the base (14 GiB for 7B) to hold them is wasted; the shell is the adapters' own layers, built from their shapes, each
with a zero weight that is a view of one element (no memory). Everything is fp32, so `svd` also works for adapters
saved in bf16 or fp16, which PEFT's SVD does not take.

The output is an ordinary PEFT adapter directory with a manifest naming its sources, their weights and the base. When
the sources are training runs it also records what merging needs (the first run's recipe, base and quantization), so
that `qlora-pipe merge`, `eval`, `generate` and `adapter inspect` take it as they take a run.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from qlora_pipe import UserError
from qlora_pipe.adapters import Adapter, load_adapter
from qlora_pipe.config import DENSITY_METHODS
from qlora_pipe.manifest import atomic_dir, write_manifest
from qlora_pipe.run import Run, TrainedOn, base_mismatch, find_adapter, trained_on

RUN_FACTS = ("recipe", "base", "quantization", "task", "labels", "packing", "data")


@dataclass
class Source:
    """One adapter to combine: where its files are, and its run when it has one."""

    adapter_dir: Path
    adapter: Adapter
    run: Run | None

    @property
    def trained_on(self) -> TrainedOn:
        return trained_on(self.adapter_dir, self.run)


def source(path: Path) -> Source:
    adapter_dir, run = find_adapter(path)
    adapter = load_adapter(adapter_dir)
    if adapter.replaced or adapter.embedding_modules:
        raise UserError(f"{path}: the adapter trains whole modules or embeddings; combine takes LoRA layers only")
    if adapter.magnitude:
        raise UserError(f"{path}: a DoRA adapter; its magnitudes rescale whole rows and do not add up across adapters")
    return Source(adapter_dir, adapter, run)


def check_sources(sources: list[Source], paths: list[Path]) -> None:
    """Adapters combine only when they were trained on the same base (run.base_mismatch) and adapt the same
    layers."""
    for path, other in zip(paths[1:], sources[1:], strict=True):
        ours, theirs = sources[0].trained_on, other.trained_on
        mismatch = base_mismatch(ours, theirs)
        if mismatch:
            raise UserError(
                f"the adapters were trained on different bases ({mismatch}): {path} on {theirs}, {paths[0]} on "
                f"{ours}; combine adapters of one base"
            )
    shapes = [{m: (a.shape[1], b.shape[0]) for m, (a, b) in s.adapter.lora.items()} for s in sources]
    for path, theirs in zip(paths[1:], shapes[1:], strict=True):
        clash = [m for m in theirs.keys() & shapes[0].keys() if theirs[m] != shapes[0][m]]
        if clash:
            raise UserError(f"{path}: layer {clash[0]} has another shape than in {paths[0]}; not the same base")


def shell(adapters: list[Adapter]) -> nn.Module:
    """A module tree with an nn.Linear at every adapted layer, its weight a zero view of one element."""
    root = nn.Module()
    for adapter in adapters:
        for name, (a, b) in adapter.lora.items():
            *path, leaf = name.split(".")
            parent = root
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            if not hasattr(parent, leaf):
                layer = nn.Linear(a.shape[1], b.shape[0], bias=False, device="meta")
                layer.weight = nn.Parameter(torch.zeros(()).expand(b.shape[0], a.shape[1]), requires_grad=False)
                parent.add_module(leaf, layer)
    return root


def combined_model(sources: list[Source]) -> PeftModel:
    """The shell with every source loaded as adapter `source{i}`."""
    configs = [LoraConfig.from_pretrained(s.adapter_dir) for s in sources]
    for config in configs:
        # On the shell every layer is an nn.Linear: PEFT's delta is then (out, in) for Conv1D layers too, which is
        # how A and B are stored either way. The combined adapter keeps the first source's setting when saved.
        config.fan_in_fan_out, config.task_type, config.base_model_name_or_path = False, None, None
    net = PeftModel(shell([s.adapter for s in sources]), configs[0], adapter_name="source0")
    for i, (s, config) in enumerate(zip(sources, configs, strict=True)):
        if i:
            net.add_adapter(f"source{i}", config)
        set_peft_model_state_dict(net, load_file(s.adapter_dir / "adapter_model.safetensors"), f"source{i}")
    return net


def combine(
    paths: list[str | Path],
    *,
    weights: list[float],
    method: str,
    out: str | Path,
    density: float | None = None,
    rank: int | None = None,
) -> Path:
    """Write OUT: the PEFT adapter Σ weightᵢ · adapterᵢ as `method` combines them, and its manifest."""
    paths = [Path(p) for p in paths]
    if len(weights) != len(paths):
        raise UserError(f"--weights: {len(weights)} weight(s) for {len(paths)} adapters; give one per adapter")
    if (density is None) != (method not in DENSITY_METHODS):
        raise UserError(
            f"--density: {method} {'needs' if density is None else 'takes no'} --density (the share of each "
            f"update kept, in (0, 1]; methods that take it: {', '.join(DENSITY_METHODS)})"
        )
    if density is not None and not 0 < density <= 1:
        raise UserError(f"--density {density}: must be in (0, 1]")
    if rank is not None and ("svd" not in method or rank < 1):
        raise UserError(f"--rank {rank}: takes a positive rank, with the svd methods only (svd, ties_svd)")
    out = Path(out)
    if out.exists():
        raise UserError(f"--out {out}: exists; choose a new directory (nothing is overwritten)")
    sources = [source(p) for p in paths]
    check_sources(sources, paths)
    net = combined_model(sources)
    first = net.peft_config["source0"]
    # PEFT gives the combination alpha = r and keeps the first source's use_rslora: with rsLoRA its scale would be
    # sqrt(r) instead of 1 (the combined A and B already hold each source's scale).
    first.use_rslora = False
    try:
        net.add_weighted_adapter(
            [f"source{i}" for i in range(len(sources))],
            weights,
            "default",
            combination_type=method,
            svd_rank=rank,
            svd_full_matrices=False,
            density=density,
        )
    except ValueError as e:  # PEFT's own checks on the combination (e.g. linear needs equal ranks)
        raise UserError(f"--method {method}: {e}") from None
    combined = net.peft_config["default"]
    original = LoraConfig.from_pretrained(sources[0].adapter_dir)
    combined.fan_in_fan_out, combined.task_type = original.fan_in_fan_out, original.task_type
    combined.base_model_name_or_path = original.base_model_name_or_path
    with atomic_dir(out) as tmp:
        net.save_pretrained(tmp, selected_adapters=["default"])
        (tmp / "README.md").unlink(missing_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if (sources[0].adapter_dir / name).exists():
                shutil.copy2(sources[0].adapter_dir / name, tmp / name)
        run = sources[0].run
        facts = {k: run.manifest[k] for k in RUN_FACTS if k in run.manifest} if run else {}
        write_manifest(
            tmp,
            "combine",
            adapter=".",
            sources=[{"path": str(p.resolve()), "weight": w} for p, w in zip(paths, weights, strict=True)],
            method=method,
            density=density,
            rank=combined.r,
            **facts,
        )
    return out
