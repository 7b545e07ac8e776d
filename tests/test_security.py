"""Weights are read from safetensors only unless the recipe allows pickle, and what was allowed is named."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora_pipe import UserError
from qlora_pipe.config import load_recipe
from qlora_pipe.train import build_trainer


@pytest.fixture
def pickle_base(tiny_model, tmp_path):
    source = tiny_model("llama")
    out = tmp_path / "pickle_base"
    net = AutoModelForCausalLM.from_pretrained(source)
    net.config.save_pretrained(out)
    torch.save(net.state_dict(), out / "pytorch_model.bin")  # transformers 5 no longer writes pickle itself
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    assert (out / "pytorch_model.bin").exists() and not list(out.glob("*.safetensors"))
    return out


def test_pickle_weights_need_allow_pickle_and_are_named(pickle_base, write_recipe, caplog):
    with pytest.raises(UserError, match="holds only pickle weights"):
        build_trainer(load_recipe(write_recipe(pickle_base)))
    recipe = load_recipe(write_recipe(pickle_base, model={"allow_pickle": True, "trust_remote_code": True}))
    with caplog.at_level(logging.WARNING, logger="qlora_pipe.model"):
        trainer, _ = build_trainer(recipe)
    assert trainer.model is not None
    assert "model.allow_pickle: weights of" in caplog.text and "model.trust_remote_code: running" in caplog.text
