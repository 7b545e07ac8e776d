"""eval: the loss it reports is the trainer's eval loss, exact match scores label tasks, a merged model scores as
its run does, and a classifier (task seq_cls) reports the accuracy the trainer saw. Training's own eval metrics: exact
match scores the held-out examples one per row as eval does, and the final model is evaluated once."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT
from transformers import TrainerCallback

from qlora_pipe import UserError
from qlora_pipe import train as train_stage
from qlora_pipe.config import load_recipe
from qlora_pipe.evaluate import evaluate, exact_match
from qlora_pipe.merge import merge
from qlora_pipe.train import train


def test_eval_of_a_run_and_its_merge_agree_with_training(write_recipe, tiny_model):
    run = train(load_recipe(write_recipe(tiny_model("llama"), train={"max_steps": 6})))
    trained = json.loads((run / "manifest.json").read_text())["metrics"]
    metrics = evaluate(run)
    assert metrics["examples"] == 64 and metrics["loss"] == pytest.approx(trained["eval_loss_after"], rel=0.02)
    assert metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["loss"], rel=1e-6)
    assert 0 <= metrics["exact_match"] <= 1 and metrics["exact_match_examples"] == 64  # labels: one word each
    merged = evaluate(merge(run, verify="none"))
    assert merged["loss"] == pytest.approx(metrics["loss"], rel=1e-4)
    assert merged["exact_match"] == metrics["exact_match"]


def test_eval_of_a_classifier_reports_the_trainers_accuracy(tiny_like, write_recipe, tmp_path):
    sst2 = ROOT / "data" / "seeds" / "sst2"
    recipe = write_recipe(
        tiny_like("recipes/seeds/bert-base-uncased"),
        task="seq_cls",
        data={
            "train": str(sst2 / "train.jsonl"),
            "eval": str(sst2 / "eval.jsonl"),
            "columns": {"text": "sentence"},
            "format": "classification",
        },
    )
    run = train(load_recipe(recipe))
    trained = json.loads((run / "manifest.json").read_text())
    assert trained["labels"] == ["0", "1"] and "eval_accuracy_after" in trained["metrics"]
    metrics = evaluate(run)
    assert metrics["accuracy"] == pytest.approx(trained["metrics"]["eval_accuracy_after"])
    assert metrics["loss"] == pytest.approx(trained["metrics"]["eval_loss_after"], rel=1e-3)
    merged = merge(run, verify="full")
    assert json.loads((merged / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]
    assert evaluate(merged)["accuracy"] == pytest.approx(metrics["accuracy"])


def test_eval_of_a_bare_model_needs_data(tiny_model):
    with pytest.raises(UserError, match="pass --data FILE"):
        evaluate(tiny_model("llama"))


def test_train_scores_exact_match_on_the_held_out_examples_one_per_row(write_recipe, tiny_model, monkeypatch):
    """With packing on, TRL packs the eval set too (fewer rows, earlier examples in each row's prompt); exact match
    scores the 64 held-out examples themselves, and agrees with `qlora-pipe eval` on the run."""
    scored = []

    def counted(net, tokenizer, tokenized):
        scored.append(len(tokenized))
        return exact_match(net, tokenizer, tokenized)

    monkeypatch.setattr(train_stage, "exact_match", counted)
    run = train(load_recipe(write_recipe(tiny_model("llama"), train={"max_steps": 6, "label_accuracy": True})))
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["packing"] is True
    assert scored == [64, 64]  # before and after training
    assert manifest["metrics"]["eval_exact_match_after"] == evaluate(run)["exact_match"]


@pytest.mark.parametrize(("eval_steps", "evaluated_at"), [(None, [0, 4]), (3, [0, 3, 4])])
def test_training_evaluates_the_final_model_once(eval_steps, evaluated_at, write_recipe, tiny_model, add_callback):
    """Before training, at every train.eval_steps (else every epoch's end) and at the last step; the manifest's
    eval_loss_after is the trainer's evaluation at the last step, not a second one."""
    evaluations = []

    class Count(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            evaluations.append((state.global_step, metrics["eval_loss"]))

    add_callback(Count())
    recipe = write_recipe(tiny_model("llama"), train={"max_steps": 4, "eval_steps": eval_steps})
    metrics = json.loads((train(load_recipe(recipe)) / "manifest.json").read_text())["metrics"]
    assert [step for step, _ in evaluations] == evaluated_at
    assert {k for k in metrics if k.startswith("eval_")} == {"eval_loss_before", "eval_loss_after"}
    assert (metrics["eval_loss_before"], metrics["eval_loss_after"]) == (evaluations[0][1], evaluations[-1][1])
