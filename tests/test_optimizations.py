"""The speed and memory optimizations leave the loss and its gradients unchanged: scoring only the labelled
positions in the fused LM head equals transformers' full-logits loss, and a padding-free packed batch has the loss
of the same examples padded."""

from __future__ import annotations

import json

import pytest
import torch
import trl.trainer.utils as trl_utils
from conftest import slow
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from qlora_pipe import model
from qlora_pipe.config import load_recipe
from qlora_pipe.train import build_trainer, configure_loss_head, train


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


@pytest.mark.parametrize("arch", ["llama", *slow("gpt2")])
def test_tiled_mlp_leaves_the_loss_and_gradients_unchanged(arch, write_recipe, tiny_model):
    trainer, _ = build_trainer(load_recipe(write_recipe(tiny_model(arch), lora={"dropout": 0.0})))
    # as in training: each layer checkpointed (non-reentrant), so the MLP tiles nest inside the layer's checkpoint
    trainer.model.train()
    for module in trainer.model.modules():  # GPT-2's own dropout would draw other masks per tile
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    examples = [{k: trainer.train_dataset[i][k] for k in ("input_ids", "labels")} for i in range(4)]
    batch = DataCollatorForLanguageModeling(pad_token_id=trainer.processing_class.pad_token_id)(examples)
    whole = loss_and_grads(trainer.model, batch, fused_lm_head=True, use_cache=False)
    assert model.tile_mlps(trainer.model, tile_tokens=16) == 2  # both layers' MLPs
    assert batch["input_ids"].numel() > 4 * 16  # several tiles per MLP
    tiled = loss_and_grads(trainer.model, batch, fused_lm_head=True, use_cache=False)
    assert tiled[0] == pytest.approx(whole[0], rel=1e-6)
    for a, b in zip(tiled[1], whole[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_activation_offloading_trains_the_same_losses(write_recipe, tiny_model, tmp_path):
    runs = {}
    for offload in (False, True):
        recipe = write_recipe(
            tiny_model("llama"),
            model={"compute_dtype": "bfloat16"},
            lora={"dropout": 0.0},
            train={"max_steps": 4, "activation_offloading": offload},
            output_dir=str(tmp_path / f"offload_{offload}"),
        )
        run = train(load_recipe(recipe))
        runs[offload] = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    losses = {k: [r["loss"] for r in v if "loss" in r] for k, v in runs.items()}
    assert len(losses[True]) == 4 and losses[True] == pytest.approx(losses[False], rel=1e-6)


def test_bounded_loss_tiles_equal_the_full_logits_loss(trainer, monkeypatch):
    """Tiles of 16 labelled tokens × 100 vocabulary entries (the last one partial): the loss and every LoRA gradient
    equal transformers' loss over the whole (batch, seq, vocab) logits."""
    import trl.kernels.chunked_logprob as trl_head

    monkeypatch.setattr(trl_head, "TOKEN_CHUNK_SIZE", trl_head.TOKEN_CHUNK_SIZE)  # restored after the test
    monkeypatch.setattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE)
    vocab = trainer.model.get_output_embeddings().weight.shape[0]
    configure_loss_head(chunk_tokens=16, vocab_size=vocab)
    tokens, width = trl_head.TOKEN_CHUNK_SIZE, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE
    assert tokens == 16 and width == min(vocab, 32768)
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = 100
    examples = [trainer.train_dataset[i] for i in range(32)]
    batch = DataCollatorForLanguageModeling(pad_token_id=trainer.processing_class.pad_token_id)(examples)
    assert (batch["labels"][:, 1:] != -100).sum() >= 4 * 16 and vocab % 100  # several token tiles, a partial one
    full = loss_and_grads(trainer.model, batch)
    tiled = loss_and_grads(trainer.model, batch, fused_lm_head=True)
    assert abs(tiled[0] / full[0] - 1) <= 1e-5
    a, b = torch.cat([g.flatten() for g in tiled[1]]), torch.cat([g.flatten() for g in full[1]])
    assert ((a - b).norm() / b.norm()).item() <= 1e-5
