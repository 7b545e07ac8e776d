"""Packing: TRL's padding-free packed rows give every example the logits it has alone (no attention or position
leakage), and training refuses packing for a model that would leak."""

from __future__ import annotations

import datasets
import pytest
import torch
from conftest import write_jsonl
from transformers import AutoModelForCausalLM
from trl.data_utils import pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from qlora_pipe import UserError
from qlora_pipe.config import load_recipe
from qlora_pipe.train import build_trainer, keeps_packed_examples_apart


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_examples_run_one_by_one(arch, attn, tiny_model):
    net = AutoModelForCausalLM.from_pretrained(tiny_model(arch), dtype=torch.float32, attn_implementation=attn)
    net.config.use_cache = False  # as training sets it: with a cache, transformers cannot see the boundaries
    g = torch.Generator().manual_seed(0)
    examples = [torch.randint(5, 500, (n,), generator=g).tolist() for n in (7, 12, 5, 9, 3)]
    rows = pack_dataset(datasets.Dataset.from_dict({"input_ids": examples, "labels": examples}), 24, "bfd")
    assert any(len(r["seq_lengths"]) > 1 for r in rows)  # something was packed
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    seen = 0
    for row in rows:
        batch = collate([row])
        batch.pop("labels")
        with torch.no_grad():
            packed = net(**batch).logits[0]
        start = 0
        for length in row["seq_lengths"]:
            ids = row["input_ids"][start : start + length]
            with torch.no_grad():
                alone = net(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(packed[start : start + length], alone, atol=1e-4, rtol=1e-4)
            start, seen = start + length, seen + 1
    assert seen == len(examples)


def test_packing_probe_passes_a_model_that_keeps_examples_apart(tiny_model):
    net = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32)
    net.config.use_cache = False
    assert keeps_packed_examples_apart(net, net.config.vocab_size)


def test_training_refuses_packing_for_a_model_that_leaks(tiny_like, write_recipe, tmp_path):
    # BLOOM's ALiBi attention ignores position_ids: packed examples would attend to each other.
    base = tiny_like("recipes/seeds/bloomz-560m")
    data = write_jsonl(
        tmp_path / "d.jsonl", [{"text": f"Tweet text : late again {i} Label : complaint"} for i in range(8)]
    )
    recipe = load_recipe(write_recipe(base, train={"packing": True}, data={"train": str(data), "eval": None}))
    with pytest.raises(UserError, match="attends across packed examples"):
        build_trainer(recipe)


def test_auto_packing_pads_a_leaking_model_and_packs_the_others(tiny_like, tiny_model, write_recipe, tmp_path):
    data = write_jsonl(
        tmp_path / "d.jsonl", [{"text": f"Tweet text : late again {i} Label : complaint"} for i in range(8)]
    )
    sections = {"train": {"packing": "auto"}, "data": {"train": str(data), "eval": None}}
    _, facts = build_trainer(load_recipe(write_recipe(tiny_like("recipes/seeds/bloomz-560m"), **sections)))
    assert facts["packing"] is False
    trainer, facts = build_trainer(load_recipe(write_recipe(tiny_model("llama"), **sections)))
    assert facts["packing"] is True and "seq_lengths" in trainer.train_dataset.column_names
