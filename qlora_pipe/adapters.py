"""PEFT LoRA adapters read as tensors: per module A, B and the scale, as the merge folds them and the analysis
decomposes them. Reading the safetensors directly (not through PEFT) keeps memory at the adapter's size and needs no
base model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from qlora_pipe import UserError
from qlora_pipe.config import lora_scale

PEFT_PREFIX = "base_model.model."


@dataclass
class Adapter:
    """A PEFT LoRA adapter as the merge needs it: per module A, B and the scale; whole tensors replacing the base's."""

    scaling: float
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    magnitude: dict[str, torch.Tensor] = field(default_factory=dict)
    """DoRA's learned magnitude of each output row, per module (empty for plain LoRA)."""
    embedding_modules: set[str] = field(default_factory=set)
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)

    def delta(self, module: str, fan_in_fan_out: bool) -> torch.Tensor:
        """PEFT's get_delta_weight: transpose(B @ A, fan_in_fan_out) × scaling (embeddings: always transposed)."""
        a, b = self.lora[module]
        product = b.float() @ a.float()
        if fan_in_fan_out or module in self.embedding_modules:
            product = product.T
        return product.mul_(self.scaling)  # in place: the same values, one 7B-sized temporary fewer

    def fold(
        self, module: str, weight: torch.Tensor, delta: torch.Tensor, norm_dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """The (out, in) fp32 `weight` with the module's (out, in) update folded in as PEFT computes it: W + ΔW, or
        for DoRA m / ‖W + ΔW‖ · (W + ΔW), the norm over each output row. PEFT takes that norm from the weight as its
        dequantization returns it, in the dtype the base was loaded in (`norm_dtype`), while the layer multiplies by
        the exact fp32 dequantization."""
        merged = weight + delta
        if module not in self.magnitude:
            return merged
        norm = torch.linalg.norm(weight.to(norm_dtype).float() + delta, dim=1)
        return (self.magnitude[module].float() / norm).view(-1, 1) * merged


def load_adapter(adapter_dir: Path) -> Adapter:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    unsupported = [k for k in ("lora_bias", "rank_pattern", "alpha_pattern") if config.get(k)]
    if unsupported:
        raise UserError(f"{adapter_dir}: the merge does not support adapters with {', '.join(unsupported)}")
    adapter = Adapter(lora_scale(config["r"], config["lora_alpha"], bool(config.get("use_rslora"))))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(adapter_dir / "adapter_model.safetensors").items():
        name = key.removeprefix(PEFT_PREFIX)
        if name.endswith((".lora_magnitude_vector", ".lora_magnitude_vector.weight")):
            adapter.magnitude[name.split(".lora_magnitude_vector")[0]] = tensor
            continue
        for marker, part in (
            (".lora_A.weight", "A"),
            (".lora_B.weight", "B"),
            (".lora_embedding_A", "A"),
            (".lora_embedding_B", "B"),
        ):
            if name.endswith(marker):
                module = name[: -len(marker)]
                parts.setdefault(module, {})[part] = tensor
                if "embedding" in marker:
                    adapter.embedding_modules.add(module)
                break
        else:
            if "lora_" in name:
                raise UserError(f"{adapter_dir}: unsupported adapter tensor {key}")
            # modules_to_save and embedding layers PEFT saves whole: they replace the base's tensor
            adapter.replaced[name.replace(".base_layer.", ".")] = tensor
    adapter.lora = {module: (p["A"], p["B"]) for module, p in parts.items()}
    return adapter
