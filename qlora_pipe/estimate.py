"""Estimate stage: predicted peak training memory and FLOPs of a recipe, without loading any weights; and the
measurement it is checked against.

The prediction sums the parts of a QLoRA training step with this pipeline's settings: NF4 weights (double quant),
parameters left unquantized (upcast to fp32 by prepare_model_for_kbit_training), the fp32 LoRA adapter with its
gradients and optimizer states, the layer inputs kept by gradient checkpointing, the working set of the one layer
being recomputed, the LM head (TRL's fused head: tiles, never the full logits) and, on CUDA, the context and
allocator slack. The activation terms are per token, with coefficients measured on the CPU with `PeakMemory`, which
counts the bytes of every tensor storage alive (not process RSS), and checked by tests/test_estimate.py.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback
from transformers.pytorch_utils import Conv1D

from qlora_pipe import UserError
from qlora_pipe.config import Recipe
from qlora_pipe.model import cpu_has_native_bf16

GIB = 2**30


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storages alive while the mode is active, on top of `baseline` (the storages that existed
    before). Every op's outputs are recorded; a storage is released when its last tensor is freed."""

    def __init__(self, baseline: int = 0):
        super().__init__()
        self.live: dict[int, int] = {}
        self.baseline = self.current = self.peak = baseline

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.live or storage.nbytes() == 0:
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


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views and tied weights counted once)."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def resident_bytes(net: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """What a training step starts from: parameters (with bitsandbytes' quantization state), buffers, gradients and
    optimizer states."""
    tensors = [*net.parameters(), *net.buffers(), *(p.grad for p in net.parameters() if p.grad is not None)]
    for p in net.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code, *((state.state2.absmax, state.state2.code) if state.state2 else ())]
    if optimizer is not None:
        tensors += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return storage_bytes(tensors)


# ---- the prediction -----------------------------------------------------------------------------------------------

# TRL's fused LM head scores tokens in tiles of this many tokens (and 32768 vocabulary entries; trl.kernels).
HEAD_TILE_TOKENS, HEAD_TILE_VOCAB = 4096, 32768
# Fitted to PeakMemory measurements of training steps on the CPU (llama shapes: vocab 2k-16k, hidden 256-512, 1k-8k
# tokens, fp32 and bf16 autocast; checked on other architectures, shapes and settings by tests/test_estimate.py).
# The step peaks in the LM head's backward: each token of the current tile holds a tile-wide row in the compute dtype
# (less ~6 KB), 29.2 bytes per vocabulary entry and ~8 fp32 hidden-size vectors; every token of the batch holds its
# checkpointed layer inputs and ~3 more fp32 hidden-size vectors.
HEAD_ROW_SAVING = 6_000
HEAD_BYTES_PER_TOKEN_VOCAB = 29.2
HIDDEN_VECTORS_PER_TILE_TOKEN = 8
HIDDEN_VECTORS_PER_TOKEN = 3
# bitsandbytes NF4 with double quant: 4 bits per weight, one uint8 absmax per block of 64, one fp32 absmax per 256
# blocks.
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)


def optimizer(name: str, device: str) -> str:
    """The optimizer `auto` stands for on `device`."""
    if name != "auto":
        return name
    return "paged_adamw_8bit" if device == "cuda" else "adamw_torch"


OPTIMIZER_BYTES = {"adamw_torch": 8, "paged_adamw_32bit": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2}
# CUDA context, cuBLAS workspace and caching-allocator fragmentation: not measurable here; the usual observed range.
CUDA_SLACK = int(1.25 * GIB)


@dataclass
class Estimate:
    """Predicted peak training memory, part by part (bytes), and the training FLOPs per token."""

    parts: dict[str, int]
    device: str
    tokens: int
    flops_per_token: float
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def linear_shapes(net: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(in, out) of every linear layer (nn.Linear and GPT-2's Conv1D) but the output head."""
    head = net.get_output_embeddings()
    shapes = {}
    for name, module in net.named_modules():
        if module is head:
            continue
        if isinstance(module, torch.nn.Linear):
            shapes[name] = (module.in_features, module.out_features)
        elif isinstance(module, Conv1D):
            shapes[name] = tuple(module.weight.shape)
    return shapes


def is_target(name: str, targets: str | list[str]) -> bool:
    return targets == "all-linear" or any(name == t or name.endswith(f".{t}") for t in targets)


def predict(net: torch.nn.Module, recipe: Recipe, device: str, compute_bytes: int) -> Estimate:
    """The peak memory of one training step of `recipe` on `net` (a meta-device skeleton of the base)."""
    config = net.config.get_text_config()
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    vocab = config.vocab_size
    tokens = recipe.train.batch_size * recipe.data.max_seq_length
    shapes = linear_shapes(net)
    quantized = recipe.model.quantization == "nf4"
    linear_params = sum(i * o for i, o in shapes.values())
    params = {id(p): p.numel() for p in net.parameters()}  # tied weights once
    other_params = sum(params.values()) - linear_params
    lora = sum(
        recipe.lora.r * (i + o) for name, (i, o) in shapes.items() if is_target(name, recipe.lora.target_modules)
    )
    tile_tokens = min(tokens, HEAD_TILE_TOKENS)
    kept = layers if recipe.train.gradient_checkpointing else layers * 16  # without: every layer's working set
    parts = {
        "base weights (NF4)" if quantized else "base weights": int(
            linear_params * (NF4_BYTES_PER_WEIGHT if quantized else compute_bytes)
        ),
        "unquantized parameters (fp32)": other_params * 4,
        "LoRA parameters (fp32)": lora * 4,
        "LoRA gradients (fp32)": lora * 4,
        f"optimizer states ({optimizer(recipe.train.optimizer, device)})": lora
        * OPTIMIZER_BYTES[optimizer(recipe.train.optimizer, device)],
        "activations (checkpointed layer inputs)": tokens * kept * hidden * compute_bytes,
        "activations (final hidden states)": tokens * HIDDEN_VECTORS_PER_TOKEN * hidden * 4,
        "LM head tiles (fused loss)": int(
            tile_tokens
            * (
                HEAD_TILE_VOCAB * compute_bytes
                - HEAD_ROW_SAVING
                + HEAD_BYTES_PER_TOKEN_VOCAB * min(vocab, HEAD_TILE_VOCAB)
                + HIDDEN_VECTORS_PER_TILE_TOKEN * hidden * 4
            )
        ),
    }
    notes = []
    if device == "cuda":
        parts["CUDA context and allocator slack"] = CUDA_SLACK
        notes.append("CUDA: the LM head runs TRL's Triton kernel; the head and slack terms were not measured here")
    # 6 FLOPs per weight per token for the backbone (forward, recompute, input gradients; the frozen base gets no
    # weight gradient, the LoRA weights do), plus the head's forward and input gradient.
    flops = 6 * linear_params + 6 * lora + (2 if recipe.train.gradient_checkpointing else 0) * linear_params
    flops += 4 * hidden * vocab
    return Estimate(parts, device, tokens, float(flops), notes)


def skeleton_for(recipe: Recipe, facts_dir: Path | None):
    """The base's architecture on the meta device: from the base directory, else from a config.json kept beside the
    recipe (recipes/<model>/), else from the hub."""
    source = recipe.model.base
    if not Path(source).is_dir() and facts_dir is not None and (facts_dir / "config.json").exists():
        source = str(facts_dir)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=recipe.model.trust_remote_code)
    except OSError as e:
        raise UserError(f"model.base: cannot read the config of {recipe.model.base}: {str(e).splitlines()[0]}; "
                        "put its config.json beside the recipe to estimate offline") from None  # fmt: skip
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)


def compute_bytes(recipe: Recipe, device: str) -> int:
    name = recipe.model.compute_dtype
    if name == "auto":
        name = "bfloat16" if device == "cuda" or cpu_has_native_bf16() else "float32"
    return torch.finfo(getattr(torch, name)).bits // 8


def estimate(recipe: Recipe, device: str = "cuda", facts_dir: Path | None = None) -> Estimate:
    """Predicted peak memory of training `recipe` on `device`, from the base's config alone."""
    return predict(skeleton_for(recipe, facts_dir), recipe, device, compute_bytes(recipe, device))


def advice(recipe: Recipe, device: str, limit: int, facts_dir: Path | None = None) -> list[str]:
    """Single changes that bring the prediction under `limit`, cheapest first."""
    net, cb = skeleton_for(recipe, facts_dir), compute_bytes(recipe, device)
    t, d = recipe.train, recipe.data
    options = []
    if optimizer(t.optimizer, device) in ("adamw_torch", "paged_adamw_32bit"):
        options.append(("train.optimizer=paged_adamw_8bit", dataclasses.replace(t, optimizer="paged_adamw_8bit"), d))
    for factor in (2, 4, 8):
        if t.batch_size >= factor:
            batch = t.batch_size // factor
            options.append((f"train.batch_size={batch} train.grad_accumulation={t.grad_accumulation * factor}",
                            dataclasses.replace(t, batch_size=batch, grad_accumulation=t.grad_accumulation * factor),
                            d))  # fmt: skip
    for factor in (2, 4):
        options.append((f"data.max_seq_length={d.max_seq_length // factor}", t,
                        dataclasses.replace(d, max_seq_length=d.max_seq_length // factor)))  # fmt: skip
    if not t.gradient_checkpointing:
        options.insert(
            0, ("train.gradient_checkpointing=true", dataclasses.replace(t, gradient_checkpointing=True), d)
        )
    fits = []
    for label, train, data in options:
        changed = dataclasses.replace(recipe, train=train, data=data)
        total = predict(net, changed, device, cb).total
        if total <= limit:
            fits.append(f"{label} (predicted {total / GIB:.1f} GiB)")
    return fits


class MeasurePeak(TrainerCallback):
    """Trainer callback: peak tensor memory of one training step (the second: optimizer states exist by then).
    CUDA: the allocator's own peak (reset for the step; the run's peak before it is kept in `earlier_peak`); CPU:
    PeakMemory over the step, on top of what the step starts from."""

    def __init__(self, optimizer_of, step: int = 2):
        self.optimizer_of, self.step, self.mode, self.peak, self.earlier_peak = optimizer_of, step, None, None, 0

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 != self.step or self.peak is not None:
            return
        if torch.cuda.is_available():
            self.earlier_peak = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.mode = PeakMemory(resident_bytes(model, self.optimizer_of()))
            self.mode.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != self.step or self.peak is not None:
            return
        if torch.cuda.is_available():
            self.peak = torch.cuda.max_memory_allocated()
        elif self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.peak = self.mode.peak
