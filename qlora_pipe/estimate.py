"""Estimate stage: predicted peak training memory and FLOPs of a recipe, without loading any weights; and the
measurement it is checked against.

The prediction sums the parts of a QLoRA training step with this pipeline's settings: NF4 weights (double quant),
parameters left unquantized (in the load dtype, or fp32 with model.frozen_dtype: float32), the fp32 LoRA adapter
with its optimizer states (and its gradients when they outlive a micro-batch), the layer inputs kept by gradient
checkpointing, the working set of the one layer being recomputed, the LM head (TRL's fused head: tiles, never the
full logits) and, on CUDA, the context and allocator slack. The activation terms are per token, with coefficients
measured on the CPU with `PeakMemory`, which counts the bytes of every tensor storage alive (not process RSS), and
checked by tests/test_estimate.py.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback
from trl import pack_dataset

from qlora_pipe import UserError
from qlora_pipe.config import (
    DTYPE_BYTES,
    HEAD_TILE_VOCAB,
    Recipe,
    compute_dtype,
    local_device,
    loss_chunk_tokens,
    optimizer_name,
)
from qlora_pipe.data import prepare_data
from qlora_pipe.model import check_base, lora_targets, mlp_tile_tokens

logger = logging.getLogger(__name__)

GIB = 2**30


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storages alive while the mode is active, on top of `resident` (the storages that existed
    before, by data pointer: counted once, views of them included). Every op's outputs are recorded; a storage is
    released when its last tensor is freed."""

    def __init__(self, resident: dict[int, int] | None = None):
        super().__init__()
        self.resident = resident or {}
        self.live: dict[int, int] = {}
        self.baseline = self.current = self.peak = sum(self.resident.values())

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.live or key in self.resident or storage.nbytes() == 0:
            return
        self.live[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def storages(tensors) -> dict[int, int]:
    """The distinct storages behind `tensors`, data pointer → bytes (views and tied weights counted once)."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return seen


def resident_storages(net: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[int, int]:
    """What a training step starts from: parameters (with bitsandbytes' quantization state), buffers, gradients and
    optimizer states."""
    tensors = [*net.parameters(), *net.buffers(), *(p.grad for p in net.parameters() if p.grad is not None)]
    for p in net.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code, *((state.state2.absmax, state.state2.code) if state.state2 else ())]
    if optimizer is not None:
        tensors += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return storages(tensors)


# ---- the prediction -----------------------------------------------------------------------------------------------

# bitsandbytes NF4 with double quant: 4 bits per weight, one uint8 absmax per block of 64, one fp32 absmax per 256
# blocks.
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
# TRL's activation offloading keeps the last few tensors it offloaded on the GPU until their copies finish
# (max_fwd_stash_size) and brings one layer's back at a time: about this many layers' inputs stay on the GPU.
OFFLOADED_LAYERS_ON_GPU = 6


@dataclass(frozen=True)
class Activations:
    """Bytes of a training step's activations per token, on top of the checkpointed layer inputs. Fitted to
    measurements (tools/measure_memory.py; docs/benchmarks.md) and checked by tests/test_estimate.py."""

    layer_hidden: float
    """Per hidden unit: what one layer's recompute and backward hold besides its MLP (norms, attention, residual)."""
    layer_mlp: float
    """Per MLP intermediate unit (the MLP's backward; with train.tiled_mlp per token of one tile)."""
    lora_dropout: float
    """Per input feature of each adapted layer when lora.dropout > 0 (PEFT keeps the dropped copy)."""
    head_hidden: float
    """Per hidden unit per position while the LM head runs (the final hidden states and their gradient)."""
    head_labelled: float
    """Per hidden unit per labelled position while the LM head runs (the gathered hidden states, fp32 gradients)."""
    head_logit: float
    """Per logit of an LM-head tile, besides the tile's own buffer (on the CPU: the temporaries of TRL's torch fold;
    on CUDA its Triton kernel folds the tile in place)."""


# bitsandbytes multiplies by a dequantized copy of the NF4 weight: while a layer's backward runs, about this many
# copies of its largest weight exist in the compute dtype.
DEQUANTIZED_WEIGHTS = 1.25
# (device, bytes of the compute dtype, bytes of the residual stream: the embeddings' dtype) → coefficients.
# CPU: PeakMemory on Llama shapes (hidden 256-1024, intermediate 512-8192, 2k-4k tokens, vocabularies 2k-128k),
# where PEFT copies each LoRA input to the fp32 adapter's dtype. CUDA: the allocator's peaks on Llama-3.1-8B's widths
# at 4k and 8k tokens, tiled and not (docs/benchmarks.md); CUDA with fp32 compute was not measured: twice the bf16
# figures.
ACTIVATIONS = {
    ("cpu", 2, 2): Activations(36.4, 13.4, 6.0, head_hidden=0.0, head_labelled=13.4, head_logit=29.0),
    ("cpu", 2, 4): Activations(34.1, 22.5, 4.6, head_hidden=0.0, head_labelled=13.0, head_logit=29.0),
    ("cpu", 4, 4): Activations(34.1, 22.5, 4.6, head_hidden=0.0, head_labelled=13.0, head_logit=29.0),
    ("cuda", 2, 2): Activations(31.2, 7.8, 1.95, head_hidden=6.4, head_labelled=6.7, head_logit=0.0),
    ("cuda", 2, 4): Activations(77.4, 7.8, 1.95, head_hidden=15.6, head_labelled=15.7, head_logit=0.0),
    ("cuda", 4, 4): Activations(62.4, 15.6, 3.9, head_hidden=12.8, head_labelled=13.4, head_logit=0.0),
}


OPTIMIZER_BYTES = {"adamw_torch": 8, "paged_adamw_32bit": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2}
# Allocated on CUDA besides the model's tensors (cuBLAS workspaces and the like): measured 39-62 MiB on an H200.
CUDA_WORKSPACES = 48 * 2**20
# What a CUDA process holds beyond its allocated tensors: the context and the caching allocator's reserve. Measured
# 0.9-1.34 GiB on an H200 (docs/benchmarks.md); the context is smaller on most consumer cards.
CUDA_SLACK = int(1.25 * GIB)


@dataclass
class StepShape:
    """The micro-batch a step's memory is predicted for: positions (padding included) and labelled positions."""

    tokens: int
    labelled: int
    source: str = "full-length sequences"


def worst_case(recipe: Recipe) -> StepShape:
    tokens = recipe.train.batch_size * recipe.data.max_seq_length
    return StepShape(tokens, tokens)


def step_shape(dataset, recipe: Recipe, packed: bool) -> StepShape:
    """The largest micro-batch of `dataset` (tokenized rows with labels; packed or truncated as TRL feeds them, or
    raw, then packed or truncated here as TRL will): the `batch_size` longest rows (padding-free when packed, padded
    to the longest otherwise) and the most labelled positions any `batch_size` rows hold. Data order is random, so
    some step may draw them together."""
    max_len, batch = recipe.data.max_seq_length, recipe.train.batch_size
    if packed and "seq_lengths" not in dataset.column_names:
        dataset = pack_dataset(dataset.select_columns(["input_ids", "labels"]), max_len, "bfd")
    lengths = [min(len(ids), max_len) for ids in dataset["input_ids"]]
    # the head scores position i when the label of i + 1 is trained
    labels = dataset["labels"]
    labelled = [int((np.asarray(row[1:n]) != -100).sum()) for row, n in zip(labels, lengths, strict=True)]
    top = lambda values: sum(sorted(values, reverse=True)[:batch])  # noqa: E731
    tokens = top(lengths) if packed else min(batch, len(lengths)) * max(lengths)
    return StepShape(tokens, top(labelled), f"the data, {'packed' if packed else 'padded'}")


def data_step_shape(recipe: Recipe) -> tuple[StepShape | None, str | None]:
    """The largest micro-batch of the recipe's own data, tokenized as training will; or None and the reason when the
    data or the tokenizer is not on this machine."""
    if recipe.task != "causal_lm":
        return None, "classifiers: predicted for full-length rows only"
    if not Path(recipe.data.train).exists():
        return None, f"data.train {recipe.data.train} is not a local path: predicted for full-length rows only"
    base = check_base(recipe.model.base, recipe.model.allow_pickle)
    try:
        _, _, checked = prepare_data(recipe, base)
    except UserError as e:
        return None, f"the data could not be tokenized here ({e}): predicted for full-length rows only"
    shape = step_shape(checked.tokenized["train"], recipe, packed=recipe.train.packing is not False)
    if recipe.train.packing == "auto":
        shape.source += " (auto)"
    return shape, None


@dataclass(frozen=True)
class Ranks:
    """Data-parallel ranks: `count` processes, each with a full copy of the base (`ddp`) or a shard of it (`fsdp`,
    FSDP1 full sharding as recipes/accelerate/fsdp_qlora.yaml sets it up)."""

    count: int
    strategy: str = "ddp"

    def per_rank(self, parts: dict[str, int], lora_grad_bytes: int, layers: int) -> dict[str, int]:
        """One rank's share of the single-process `parts`. Activations are per rank either way."""
        if self.strategy == "ddp":
            # DDP's reducer keeps its own fp32 buckets of the gradients it all-reduces.
            return parts | {"DDP gradient buckets (fp32)": lora_grad_bytes}
        shared = {}
        for name, size in parts.items():
            # The base's linear weights and everything trained are sharded; the root unit (embeddings, LM head,
            # final norm) stays gathered through the step, so it counts whole.
            sharded = name.startswith(("base weights", "LoRA", "optimizer"))
            shared[name] = -(-size // self.count) if sharded else size
            if name.startswith("base weights"):
                # FSDP gathers one decoder layer's weights to compute it and prefetches the next one.
                shared["FSDP gathered layers (current and prefetched)"] = 2 * size // layers
        return shared


@dataclass
class Estimate:
    """Predicted peak training memory, part by part (bytes), and the training FLOPs per token. `phases` holds the
    two candidate peaks above the static parts: the layers' recompute and backward, and the LM head; the larger is in
    `parts`."""

    parts: dict[str, int]
    device: str
    step: StepShape
    flops_per_token: float
    phases: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def linear_shapes(modules: dict[str, torch.nn.Module]) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear layer (nn.Linear, or GPT-2's Conv1D whose weight is stored (in, out))."""
    return {
        name: (m.in_features, m.out_features) if isinstance(m, torch.nn.Linear) else tuple(m.weight.shape)
        for name, m in modules.items()
    }


def text_sizes(net: torch.nn.Module) -> tuple[int, int, int, int]:
    """hidden size, layers, MLP width and vocabulary of a (text) model's config, under their various names."""
    config = net.config.get_text_config()
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    mlp = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    return hidden, layers, mlp, config.vocab_size


def predict(
    net: torch.nn.Module,
    recipe: Recipe,
    device: str,
    compute_bytes: int,
    step: StepShape | None = None,
    ranks: Ranks | None = None,
) -> Estimate:
    """The peak memory of one training step of `recipe` on `net` (a meta-device skeleton of the base), for the
    micro-batch `step` (default: every row full length, every position trained), on each of `ranks` (default one
    process)."""
    hidden, layers, mlp, vocab = text_sizes(net)
    step = step or worst_case(recipe)
    t, lo = recipe.train, recipe.lora
    shapes = linear_shapes(lora_targets(net, "all-linear"))
    quantized = recipe.model.quantization == "nf4"
    linear_params = sum(i * o for i, o in shapes.values())
    params = {id(p): p.numel() for p in net.parameters()}  # tied weights once
    other_params = sum(params.values()) - linear_params
    targets = linear_shapes(lora_targets(net, lo.target_modules))
    lora = sum(lo.r * (i + o) for i, o in targets.values())
    frozen_bytes = 4 if recipe.model.frozen_dtype == "float32" else compute_bytes
    opt = optimizer_name(t.optimizer, device)
    parts = {
        "base weights (NF4)" if quantized else "base weights": int(
            linear_params * (NF4_BYTES_PER_WEIGHT if quantized else frozen_bytes)
        ),
        f"frozen unquantized parameters ({'fp32' if frozen_bytes == 4 else 'compute dtype'})": other_params
        * frozen_bytes,
        "LoRA parameters (fp32)": lora * 4,
        f"optimizer states ({opt})": lora * OPTIMIZER_BYTES[opt],
    }
    if t.grad_accumulation > 1:
        # Summed over the micro-batches, the gradients are alive through every forward and backward but the first.
        # With one micro-batch per step they are created layer by layer while the backward frees that layer's
        # input, after the step's peak (the LM head, or the last layer's backward); the optimizer step that reads
        # them holds no activations. Measured on SmolLM2-135M: counting them anyway over-predicted by 3 %.
        parts["LoRA gradients (fp32)"] = lora * 4
    # The residual stream, and so each checkpointed layer input, has the embeddings' dtype.
    layer_input = step.tokens * hidden * frozen_bytes
    kept = min(layers, OFFLOADED_LAYERS_ON_GPU) if t.activation_offloading else layers
    label = f"offloaded, {kept} on the GPU" if t.activation_offloading else "checkpointed"
    parts[f"activations (layer inputs, {label})"] = kept * layer_input
    coef = ACTIVATIONS[device, compute_bytes, max(frozen_bytes, compute_bytes)]
    mlp_tokens = min(step.tokens, mlp_tile_tokens(mlp)) if t.tiled_mlp else step.tokens
    in_mlp = sum(i for name, (i, _) in targets.items() if ".mlp." in f".{name}.") / layers
    in_other = sum(i for i, _ in targets.values()) / layers - in_mlp
    layer = step.tokens * hidden * coef.layer_hidden + mlp_tokens * mlp * coef.layer_mlp
    if lo.dropout > 0:
        layer += coef.lora_dropout * (step.tokens * in_other + mlp_tokens * in_mlp)
    if not t.gradient_checkpointing:  # every layer keeps what its backward needs
        layer *= layers
    if quantized:
        layer += DEQUANTIZED_WEIGHTS * max(i * o for i, o in shapes.values()) * compute_bytes
    if lo.use_dora:  # each DoRA layer forms B·A and W + s·B·A in fp32 for its row norms (counted, not measured)
        layer += 2 * max(i * o for i, o in targets.values()) * 4
    width = min(vocab, HEAD_TILE_VOCAB)
    tile = min(step.labelled, loss_chunk_tokens(t.loss_chunk_tokens, vocab, device)) * width
    head = hidden * (step.tokens * coef.head_hidden + step.labelled * coef.head_labelled)
    head += tile * (coef.head_logit + compute_bytes)
    if frozen_bytes != compute_bytes:  # each vocabulary chunk of the head's weight is cast to the compute dtype
        head += width * hidden * compute_bytes
    phases = {"layers": int(layer), "head": int(head)}
    peak = max(phases, key=phases.get)
    name = "activations (layer recompute and backward)" if peak == "layers" else "LM head (fused loss tiles)"
    parts[name] = phases[peak]
    if ranks and ranks.count > 1:
        parts = ranks.per_rank(parts, lora * 4, layers)
    if device == "cuda":
        parts["CUDA workspaces (cuBLAS)"] = CUDA_WORKSPACES
        parts["CUDA context and allocator slack"] = CUDA_SLACK
    # 6 FLOPs per weight per token for the backbone (forward, recompute, input gradients; the frozen base gets no
    # weight gradient, the LoRA weights do), plus the head's forward and input gradient.
    flops = 6 * linear_params + 6 * lora + (2 if t.gradient_checkpointing else 0) * linear_params
    flops += 4 * hidden * vocab
    return Estimate(parts, device, step, float(flops), phases)


def skeleton_for(recipe: Recipe, facts_dir: Path | None):
    """The base's architecture on the meta device: from the base directory, else from a config.json kept beside the
    recipe (recipes/<model>/), else from the hub."""
    source = recipe.model.base
    if not Path(source).is_dir() and facts_dir is not None and (facts_dir / "config.json").exists():
        source = str(facts_dir)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=recipe.model.trust_remote_code)
    except OSError as e:
        raise UserError(
            f"model.base: cannot read the config of {recipe.model.base}: {str(e).splitlines()[0]}; "
            "put its config.json beside the recipe to estimate offline"
        ) from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)


def compute_bytes(recipe: Recipe, device: str) -> int:
    return DTYPE_BYTES[compute_dtype(recipe.model.compute_dtype, device)]


def estimate(
    recipe: Recipe,
    *,
    device: str = "cuda",
    facts_dir: Path | None = None,
    step: StepShape | None = None,
    ranks: Ranks | None = None,
) -> Estimate:
    """Predicted peak memory of training `recipe` on `device` (on each of `ranks`), from the base's config alone."""
    return predict(skeleton_for(recipe, facts_dir), recipe, device, compute_bytes(recipe, device), step, ranks)


def advice(
    recipe: Recipe, *, device: str, limit: int, facts_dir: Path | None = None, step: StepShape | None = None
) -> list[str]:
    """Single changes that bring the prediction under `limit`, cheapest first."""
    net, cb = skeleton_for(recipe, facts_dir), compute_bytes(recipe, device)
    t, d = recipe.train, recipe.data
    options = []
    if not t.gradient_checkpointing:
        options.append(("train.gradient_checkpointing=true", dataclasses.replace(t, gradient_checkpointing=True), d))
    if optimizer_name(t.optimizer, device) in ("adamw_torch", "paged_adamw_32bit"):
        options.append(("train.optimizer=paged_adamw_8bit", dataclasses.replace(t, optimizer="paged_adamw_8bit"), d))
    if not t.tiled_mlp:
        options.append(("train.tiled_mlp=true", dataclasses.replace(t, tiled_mlp=True), d))
    if device == "cuda" and not t.activation_offloading:
        options.append(("train.activation_offloading=true", dataclasses.replace(t, activation_offloading=True), d))
    for factor in (2, 4, 8):
        if t.batch_size >= factor:
            batch = t.batch_size // factor
            options.append(
                (
                    f"train.batch_size={batch} train.grad_accumulation={t.grad_accumulation * factor}",
                    dataclasses.replace(t, batch_size=batch, grad_accumulation=t.grad_accumulation * factor),
                    d,
                )
            )
    for factor in (2, 4):
        options.append(
            (
                f"data.max_seq_length={d.max_seq_length // factor}",
                t,
                dataclasses.replace(d, max_seq_length=d.max_seq_length // factor),
            )
        )
    fits = []
    for label, train, data in options:
        changed = dataclasses.replace(recipe, train=train, data=data)
        # a shorter max_seq_length or smaller batch changes the micro-batch: predicted for full-length rows
        shape = step if (train.batch_size, data.max_seq_length) == (t.batch_size, d.max_seq_length) else None
        total = predict(net, changed, device, cb, shape).total
        if total <= limit:
            fits.append(f"{label} (predicted {total / GIB:.1f} GiB)")
    return fits


def longest_sequence(
    recipe: Recipe, *, device: str, limit: int, facts_dir: Path | None = None, offloading: bool = False
) -> int:
    """The longest full-length sequence (a multiple of 256) whose training step at batch 1 is predicted to fit
    `limit`, with or without activation offloading (the recipe's other settings kept)."""
    net, cb = skeleton_for(recipe, facts_dir), compute_bytes(recipe, device)
    train = dataclasses.replace(recipe.train, batch_size=1, activation_offloading=offloading)

    def fits(tokens: int) -> bool:
        data = dataclasses.replace(recipe.data, max_seq_length=tokens)
        return predict(net, dataclasses.replace(recipe, train=train, data=data), device, cb).total <= limit

    low, high = 0, 256
    while fits(high) and high < 2**24:
        low, high = high, high * 2
    while high - low > 256:
        middle = (low + high) // 512 * 256
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


class MeasurePeak(TrainerCallback):
    """Trainer callback: peak tensor memory of one training step (the second: optimizer states exist by then).
    CUDA: the allocator's own peak (reset for the step; the run's peak before it is kept in `earlier_peak`); CPU:
    PeakMemory over the step, on top of what the step starts from."""

    def __init__(self, optimizer_of, step: int = 2):
        self.optimizer_of, self.step, self.mode, self.peak, self.earlier_peak = optimizer_of, step, None, None, 0

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 != self.step or self.peak is not None:
            return
        if local_device() == "cuda":
            self.earlier_peak = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.mode = PeakMemory(resident_storages(model, self.optimizer_of()))
            self.mode.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != self.step or self.peak is not None:
            return
        if local_device() == "cuda":
            self.peak = torch.cuda.max_memory_allocated()
        elif self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.peak = self.mode.peak


def peak_memory(earlier_cuda_peak: int = 0) -> dict:
    """Peak memory of this process: allocated tensor memory on CUDA (the larger of the allocator's peak and the one
    it had before a reset), resident set size on the CPU."""
    if local_device() == "cuda":
        peak = max(torch.cuda.max_memory_allocated(), earlier_cuda_peak)
        return {"peak_memory_gib": round(peak / 2**30, 3), "peak_memory_of": "cuda"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_memory_gib": round(rss / 2**20, 3), "peak_memory_of": "cpu process rss"}


def predicted_peak(recipe: Recipe, trainer) -> int | None:
    """The estimate for this run's largest micro-batch, logged before training starts (causal LM runs; None for
    classifiers)."""
    if recipe.task != "causal_lm":
        return None
    device = local_device()
    net = trainer.model.get_base_model()
    with torch.device("meta"):
        skeleton = type(net)(net.config)
    step = step_shape(trainer.train_dataset, recipe, packed=trainer.args.packing)
    ranks = Ranks(trainer.args.world_size, "fsdp" if trainer.is_fsdp_enabled else "ddp")
    est = predict(skeleton, recipe, device, compute_bytes(recipe, device), step, ranks)
    parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in est.parts.items())
    logger.info(
        "predicted peak memory of a training step: %.2f GiB for %d tokens, %d of them labelled (%s)",
        est.total / GIB,
        step.tokens,
        step.labelled,
        parts,
    )
    return est.total
