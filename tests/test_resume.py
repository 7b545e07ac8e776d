"""Resume: a run killed (kill -9) at three different steps, one of them while a checkpoint is being written, and
stopped once by SIGTERM, continues each time from its newest complete checkpoint; its per-step losses and final
adapter equal those of an uninterrupted run bitwise (the CPU is deterministic here). A run whose weights become
non-finite stops at once, names the step and keeps its last good checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import WITH_INTERRUPT
from safetensors.torch import load_file
from transformers import TrainerCallback

from qlora_pipe import UserError
from qlora_pipe import run as run_dir
from qlora_pipe import train as train_stage
from qlora_pipe.config import load_recipe

# Runs `qlora-pipe train` and interrupts it at a chosen step: SIGKILL at the end of the step, SIGKILL while the
# checkpoint of the step is half written (weights saved, optimizer not yet), or SIGTERM at the end of the step.
INTERRUPT = (
    """
import os, signal, sys
from transformers import Trainer, TrainerCallback
from qlora_pipe import cli, train
how, at = sys.argv[1], int(sys.argv[2])
sig = signal.SIGTERM if how == "term" else signal.SIGKILL
class Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if how in ("kill", "term") and state.global_step == at:
            os.kill(os.getpid(), sig)
"""
    + WITH_INTERRUPT
    + """
save = Trainer._save_optimizer_and_scheduler
def save_then_die(self, output_dir):
    if how == "kill-in-save" and self.state.global_step == at:
        os.kill(os.getpid(), signal.SIGKILL)
    save(self, output_dir)
Trainer._save_optimizer_and_scheduler = save_then_die
sys.exit(cli.main(["train", *sys.argv[3:]]))
"""
)

STEPS = 12


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def interrupted(recipe: Path, how: str, at: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", INTERRUPT, how, str(at), str(recipe)], capture_output=True, text=True, timeout=600
    )


@pytest.fixture
def resumable(write_recipe, tiny_model, tmp_path):
    """recipe(name) -> a 12-step recipe writing to tmp_path/name, a checkpoint every 3 steps, dropout on (so RNG
    state matters), evaluation before and after."""

    def recipe(name: str) -> Path:
        path = write_recipe(
            tiny_model("llama"),
            lora={"dropout": 0.1},
            train={"max_steps": STEPS, "save_steps": 3, "save_total_limit": 10},
            output_dir=str(tmp_path / name),
        )
        return path.rename(tmp_path / f"{name}.yaml")

    return recipe


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted_run(resumable, tmp_path):
    reference = train_stage.train(load_recipe(resumable("reference")))
    recipe = resumable("resumed")
    run = tmp_path / "resumed"

    first = interrupted(recipe, "kill", 5)
    assert first.returncode == -9 and (run / "checkpoints" / "checkpoint-3").is_dir()

    second = interrupted(recipe, "kill-in-save", 9)  # resumes from 3, dies while writing checkpoint-9
    assert second.returncode == -9 and "resuming from" in second.stderr
    half = run / "checkpoints" / "checkpoint-9"
    assert half.is_dir() and not run_dir.is_complete(half) and run_dir.is_complete(half.with_name("checkpoint-6"))

    third = interrupted(recipe, "term", 10)  # skips the half-written checkpoint-9, resumes from 6
    assert "skipping" in third.stderr and "checkpoint-9: it is incomplete" in third.stderr
    assert third.returncode == 128 + 15, third.stderr
    assert "stopped at step 10 with a checkpoint in" in third.stderr and "Traceback" not in third.stderr
    assert run_dir.is_complete(run / "checkpoints" / "checkpoint-10")

    fourth = interrupted(recipe, "kill", 11)  # resumes from 10
    assert fourth.returncode == -9 and "checkpoint-10 (step 10)" in fourth.stderr

    final = interrupted(recipe, "none", 0)  # resumes from 10 and finishes
    assert final.returncode == 0, final.stderr

    assert losses(run) == losses(reference) and sorted(losses(run)) == list(range(1, STEPS + 1))
    ours, theirs = (
        load_file(run / "adapter" / "adapter_model.safetensors"),
        load_file(reference / "adapter" / "adapter_model.safetensors"),
    )
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    metrics = json.loads((run / "manifest.json").read_text())["metrics"]
    assert metrics["resumed_from"].endswith("checkpoint-10") and metrics["steps"] == STEPS
    reference_metrics = json.loads((reference / "manifest.json").read_text())["metrics"]
    for key in ("eval_loss_before", "eval_loss_after", "tokens_seen"):
        assert metrics[key] == reference_metrics[key]


def test_non_finite_weights_stop_the_run_and_keep_the_last_good_checkpoint(resumable, add_callback):
    class Poison(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 4:  # the 5th step starts from a nan weight
                next(p for n, p in model.named_parameters() if "lora_B" in n).data[0, 0] = float("nan")

    add_callback(Poison())
    recipe = load_recipe(resumable("diverged"))
    with pytest.raises(UserError, match="diverged at step 5") as error:
        train_stage.train(recipe)
    assert "checkpoint-3" in str(error.value)
    checkpoints = Path(recipe.output_dir) / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-3"]
    assert not (Path(recipe.output_dir) / "adapter").exists()


@pytest.mark.slow
def test_resume_refuses_a_changed_recipe(resumable, tmp_path):
    recipe = resumable("changed")
    assert interrupted(recipe, "kill", 4).returncode == -9
    result = subprocess.run(
        [sys.executable, "-m", "qlora_pipe.cli", "train", str(recipe), "lora.r=4"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2 and "started with a different recipe (lora.r changed)" in result.stderr
