"""LoRA oracle: PEFT's layer equals W' = W + (alpha/r)·B·A computed from scratch; with B = 0 nothing changes."""

from __future__ import annotations

import math

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from qlora_pipe.config import load_recipe
from qlora_pipe.model import lora_config


class TwoLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(32, 48)
        self.out = torch.nn.Linear(48, 16)

    def forward(self, x):
        return self.out(torch.relu(self.proj(x)))


def reference_lora(layer: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float, x: torch.Tensor):
    return x @ (layer.weight + scale * b @ a).T + layer.bias


@pytest.mark.parametrize(("r", "alpha", "rslora"), [(4, 8, False), (8, 8, False), (4, 16, True)])
def test_peft_lora_layer_equals_reference(r, alpha, rslora):
    torch.manual_seed(0)
    net = TwoLayer()
    base_proj = torch.nn.Linear(32, 48)
    base_proj.load_state_dict(net.proj.state_dict())
    model = peft.get_peft_model(
        net, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], use_rslora=rslora)
    )
    layer = model.base_model.model.proj
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # B starts at zero; give it a value to test the formula
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    x = torch.randn(5, 32)
    torch.testing.assert_close(layer(x), reference_lora(base_proj, a, b, scale, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.get_delta_weight("default"), scale * b @ a, rtol=1e-5, atol=1e-6)


def test_zero_b_leaves_the_model_unchanged(tiny_model):
    base = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32)
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("init", ["default", "gaussian", "false"])
def test_lora_inits_as_the_peft_guide_describes_them(init, tiny_model, write_recipe):
    """default and gaussian start from a zero update (B = 0), A Kaiming-uniform or Gaussian with std 1/r; false draws
    B at random too, so the model changes before any training. `init: false` in YAML (a boolean) means `false`."""
    recipe = load_recipe(write_recipe(tiny_model("llama"), lora={"init": False if init == "false" else init}))
    assert recipe.lora.init == init
    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32)
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        before = net(input_ids=ids).logits
    adapted = peft.get_peft_model(net, lora_config(recipe))
    layer = adapted.base_model.model.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        after = adapted(input_ids=ids).logits
    if init == "false":
        assert b.abs().sum() > 0 and not torch.equal(before, after)
        return
    assert torch.count_nonzero(b) == 0 and torch.equal(before, after)
    if init == "gaussian":
        assert float(a.std()) == pytest.approx(1 / recipe.lora.r, rel=0.15)
    else:  # Kaiming-uniform with a = sqrt(5): bound 1/sqrt(fan_in)
        assert float(a.abs().max()) <= 1 / a.shape[1] ** 0.5 + 1e-6
