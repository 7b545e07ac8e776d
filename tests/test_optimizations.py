"""The speed and memory optimizations leave the loss and its gradients unchanged: scoring only the labelled
positions in the fused LM head equals transformers' full-logits loss, and a padding-free packed batch has the loss
of the same examples padded."""

from __future__ import annotations

import pytest
import torch
import trl.trainer.utils as trl_utils
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from qlora_pipe.config import load_recipe
from qlora_pipe.train import build_trainer


@pytest.fixture
def trainer(write_recipe, tiny_model):
    recipe = write_recipe(tiny_model("llama"), lora={"dropout": 0.0}, train={"packing": False})  # unpacked examples
    trainer, _ = build_trainer(load_recipe(recipe))
    trainer.model.eval()
    return trainer


def loss_and_grads(model, batch, **kwargs) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad()
    loss = model(**batch, **kwargs).loss
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_labelled_positions_only_head_equals_the_full_logits_loss(trainer, monkeypatch):
    examples = [trainer.train_dataset[i] for i in range(6)]
    batch = DataCollatorForLanguageModeling(pad_token_id=trainer.processing_class.pad_token_id)(examples)
    assert (batch["labels"] == -100).float().mean() > 0.5  # prompts and padding: most positions are not scored
    model = trainer.model
    compact = loss_and_grads(model, batch, fused_lm_head=True)
    full = loss_and_grads(model, batch)  # transformers' own loss over the (batch, seq, vocab) logits
    monkeypatch.setattr(trl_utils, "_use_triton", trl_utils._use_triton.original)
    every_position = loss_and_grads(model, batch, fused_lm_head=True)  # TRL's CPU default
    for other in (full, every_position):
        assert compact[0] == pytest.approx(other[0], rel=1e-5)
        for a, b in zip(compact[1], other[1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_padding_free_packed_batch_has_the_padded_batch_loss(trainer):
    examples = [{k: trainer.train_dataset[i][k] for k in ("input_ids", "labels")} for i in range(6)]
    pad = trainer.processing_class.pad_token_id
    padded = DataCollatorForLanguageModeling(pad_token_id=pad)(examples)
    packed = DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=True)(examples)
    packed_loss, packed_grads = loss_and_grads(trainer.model, packed, fused_lm_head=True, use_cache=False)
    padded_loss, padded_grads = loss_and_grads(trainer.model, padded, fused_lm_head=True, use_cache=False)
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    for a, b in zip(packed_grads, padded_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
