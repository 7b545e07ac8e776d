"""Several ranks through torchrun (gloo on the CPU, fp32): N ranks with batch b train the same model as one process
with batch N*b, rank 0 alone writes, a user error on any rank stops all of them with exit status 2, a killed rank's run
resumes to the same adapter, SIGTERM checkpoints, and a resume with another number of ranks is refused. FSDP-QLoRA
needs CUDA GPUs: its test skips elsewhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DEMO_DATA, WITH_INTERRUPT
from safetensors.torch import load_file

from qlora_pipe import UserError, cli, model
from qlora_pipe import train as train_stage
from qlora_pipe.config import load_recipe

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]

# `python -m qlora_pipe train` on each rank, killed with SIGKILL (rank 1, end of step AT) or the launcher sent SIGTERM
# (by rank 0, end of step AT: torchrun forwards it to every rank).
INTERRUPT = (
    """
import os, signal, sys
from transformers import TrainerCallback
from qlora_pipe import cli, train
how, at = sys.argv[1], int(sys.argv[2])
class Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == at and how == "kill" and os.environ["RANK"] == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        if state.global_step == at and how == "term" and os.environ["RANK"] == "0":
            os.kill(os.getppid(), signal.SIGTERM)
"""
    + WITH_INTERRUPT
    + """
sys.exit(cli.main(["train", *sys.argv[3:]]))
"""
)


def launch(nproc: int, *args: str, script: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """torchrun with `nproc` ranks, each running `python -m qlora_pipe ARGS` (or the script `script` with ARGS)."""
    target = ["-m", "qlora_pipe"] if script is None else [script]
    return subprocess.run(
        [*TORCHRUN, str(nproc), *target, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def accelerate_launch(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`accelerate launch ARGS -m qlora_pipe train ...` (ARGS: its flags, then the command)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def logits(run: Path) -> torch.Tensor:
    net, tokenizer, _ = model.load_for_inference(run)
    ids = tokenizer(["Classify: the service was slow", "Classify: great value, would buy again"], padding=True)
    with torch.no_grad():
        return net(input_ids=torch.tensor(ids["input_ids"]), attention_mask=torch.tensor(ids["attention_mask"])).logits


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture
def two_rank_recipe(write_recipe, tiny_model, tmp_path):
    """recipe(name, data=None, task="causal_lm", **train) -> a recipe writing to tmp_path/name: 6 steps of batch 4,
    fp32; `data` updates its data section."""

    def recipe(name: str, data: dict | None = None, task: str = "causal_lm", **train) -> Path:
        path = write_recipe(
            tiny_model("llama"),
            task=task,
            train={"max_steps": 6, **train},
            data=data or {},
            output_dir=str(tmp_path / name),
        )
        return path.rename(tmp_path / f"{name}.yaml")

    return recipe


@pytest.mark.slow
@pytest.mark.parametrize("packing", [True, False])
def test_two_ranks_train_the_same_model_as_one_process_with_twice_the_batch(
    packing, two_rank_recipe, tmp_path, capsys
):
    one = train_stage.train(load_recipe(two_rank_recipe("one", packing=packing)))
    result = launch(2, "train", str(two_rank_recipe("two", packing=packing)), "train.batch_size=2")
    assert result.returncode == 0, result.stderr
    two = tmp_path / "two"

    ours, theirs = losses(two), losses(one)
    assert sorted(ours) == list(range(1, 7))
    worst = max(abs(ours[step] - loss) / abs(loss) for step, loss in theirs.items())
    apart = relative(logits(two), logits(one))
    with capsys.disabled():
        print(f"\npacking {packing}: per-step losses within {worst:.1e} relative, logits {apart:.1e}")
    assert worst <= 1e-4 and apart < 5e-3

    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["ranks"] == {
        "world_size": 2,
        "strategy": "ddp",
        "per_rank_batch": 2,
        "grad_accumulation": 1,
        "global_batch": 4,
    }
    assert json.loads((one / "manifest.json").read_text())["ranks"]["global_batch"] == 4
    assert manifest["packing"] is packing
    # tokens are counted over every rank: the same as one process saw
    assert (
        manifest["metrics"]["tokens_seen"] == json.loads((one / "manifest.json").read_text())["metrics"]["tokens_seen"]
    )
    # one summary, printed by rank 0, and a report of both ranks' throughput together
    assert result.stdout.count("next: qlora-pipe merge") == 1 and "2 ranks (ddp), global batch 4" in result.stdout
    assert cli.main(["report", str(two)]) == 0
    tokens_per_second = manifest["metrics"]["tokens_per_second"]
    out = capsys.readouterr().out
    assert f"{tokens_per_second:.1f} tokens/s over" in out and "all 2 ranks together" in out


def first_rows(path: Path, rows: int, tmp_path: Path) -> str:
    """A data file of the first `rows` lines of `path`."""
    (tmp_path / "rows.jsonl").write_text("".join(path.read_text().splitlines(keepends=True)[:rows]))
    return str(tmp_path / "rows.jsonl")


def one_process_and_two_ranks(two_rank_recipe, tmp_path: Path, **recipe) -> tuple[Path, Path, int, float, float]:
    """The recipe trained by one process with batch 4 and by two ranks with batch 2: both runs, the steps, the worst
    per-step loss difference and the final logits' difference (relative)."""
    one = train_stage.train(load_recipe(two_rank_recipe("one", **recipe)))
    result = launch(2, "train", str(two_rank_recipe("two", **recipe)), "train.batch_size=2")
    assert result.returncode == 0, result.stderr
    two = tmp_path / "two"
    ours, theirs = losses(two), losses(one)
    assert sorted(ours) == sorted(theirs)
    worst = max(abs(ours[step] - loss) / abs(loss) for step, loss in theirs.items())
    return one, two, len(ours), worst, relative(logits(two), logits(one))


# Rows (packed rows when packing) that leave the last global batch of 4 short: 18 rows fill rank 0's last batch of 2
# and leave rank 1 none; 19 leave rank 1 one row; 18 examples pack into 9 rows, one for rank 0 and none for rank 1.
# (packing, rows, batches accumulated per step)
REMAINDERS = {
    "rank 1's last batch empty": (False, 18, 1),
    "rank 1's last batch short": (False, 19, 1),
    "rank 1's last batch short, two batches a step": (False, 19, 2),
    "packed, rank 0's last batch short, rank 1's empty": (True, 18, 1),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", REMAINDERS)
def test_two_ranks_train_the_same_model_as_one_process_when_the_rows_leave_a_remainder(
    case, two_rank_recipe, tmp_path, capsys
):
    """Two epochs over rows that do not divide the global batch: every row trains once per epoch, as in one process
    (no repeated row fills a rank's short or empty batch), the loss of each step is normalised over the trained tokens
    of both ranks together, and the tokens seen are those one process sees."""
    packing, rows, accumulation = REMAINDERS[case]
    data = {"train": first_rows(DEMO_DATA / "train.jsonl", rows, tmp_path), "eval": None, "eval_fraction": 0.0}
    recipe = {"data": data, "max_steps": -1, "epochs": 2, "packing": packing, "grad_accumulation": accumulation}
    trainer, _ = train_stage.build_trainer(load_recipe(two_rank_recipe("count", **recipe)))
    assert len(trainer.train_dataset) % 4 == (1 if packing else rows % 4)  # the case is the one it names
    del trainer
    one, two, steps, worst, apart = one_process_and_two_ranks(two_rank_recipe, tmp_path, **recipe)
    with capsys.disabled():
        print(f"\n{case}: {steps} steps, losses within {worst:.1e} relative, logits {apart:.1e}")
    assert worst <= 1e-4 and apart < 5e-3
    metrics = [json.loads((run / "manifest.json").read_text())["metrics"] for run in (two, one)]
    assert metrics[0]["tokens_seen"] == metrics[1]["tokens_seen"]


# Classifier rows that leave the last global batch of 4 short: 18 leave rank 1's last batch empty, 19 one row short.
CLASSIFIER_REMAINDERS = {"rank 1's last batch empty": (18, 1), "rank 1's last batch short, two a step": (19, 2)}


@pytest.mark.slow
@pytest.mark.parametrize("case", CLASSIFIER_REMAINDERS)
def test_two_ranks_train_the_same_classifier_as_one_process_when_the_rows_leave_a_remainder(
    case, two_rank_recipe, tmp_path, capsys
):
    """task seq_cls, two epochs: each step's loss is the mean over the examples of both ranks, every row once."""
    rows, accumulation = CLASSIFIER_REMAINDERS[case]
    train = first_rows(ROOT / "data" / "seeds" / "sst2" / "train.jsonl", rows, tmp_path)
    data = {"train": train, "eval": None, "eval_fraction": 0.0, "format": "classification"}
    data |= {"columns": {"text": "sentence"}, "max_seq_length": 64}
    recipe = {"data": data, "max_steps": -1, "epochs": 2, "grad_accumulation": accumulation}
    _, _, steps, worst, apart = one_process_and_two_ranks(two_rank_recipe, tmp_path, task="seq_cls", **recipe)
    with capsys.disabled():
        print(f"\nclassifier, {case}: {steps} steps, losses within {worst:.1e} relative, logits {apart:.1e}")
    assert worst <= 1e-4 and apart < 5e-3


@pytest.mark.slow
def test_a_user_error_on_two_ranks_stops_both_with_exit_2(two_rank_recipe, tmp_path):
    empty_replies = tmp_path / "empty.jsonl"
    empty_replies.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": ""}]})
            + "\n"
            for i in range(20)
        )
    )
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    cases = {
        "the data check refuses": (f"data.train={empty_replies}", "data.eval=null", "the data check failed"),
        "the base is no model": (f"model.base={not_a_model}", f"model.base: {not_a_model}"),
    }
    for case, (*overrides, message) in cases.items():
        start = time.monotonic()
        result = launch(2, "train", str(two_rank_recipe(case.replace(" ", "_"))), *overrides, timeout=300)
        assert result.returncode != 0, case
        assert time.monotonic() - start < 120, f"{case}: the ranks took too long to stop"
        # The first rank to fail exits with 2 and its message; the launcher then stops the other one (which exits
        # with 2 too when it got there first, else by the launcher's SIGTERM). The one traceback is the launcher's.
        assert "exitcode  : 2" in result.stderr.split("Root Cause")[1], (case, result.stderr[-3000:])
        assert f"): error: {message}" in result.stderr, (case, result.stderr)
        assert result.stderr.count("Traceback") == 1 and "ChildFailedError" in result.stderr, case
    assert not (tmp_path / "the_data_check_refuses" / "manifest.json").exists()


@pytest.mark.slow
def test_a_killed_rank_resumes_to_the_uninterrupted_adapter_and_sigterm_checkpoints(two_rank_recipe, tmp_path):
    overrides = ("train.batch_size=2", "train.save_steps=2", "train.save_total_limit=10", "lora.dropout=0.1")
    reference = launch(2, "train", str(two_rank_recipe("reference")), *overrides)
    assert reference.returncode == 0, reference.stderr
    recipe, run = str(two_rank_recipe("resumed")), tmp_path / "resumed"
    script = tmp_path / "interrupt.py"
    script.write_text(INTERRUPT)

    killed = launch(2, "kill", "3", recipe, *overrides, script=str(script))
    assert killed.returncode != 0 and (run / "checkpoints" / "checkpoint-2").is_dir()
    assert not (run / "manifest.json").exists()

    termed = launch(2, "term", "4", recipe, *overrides, script=str(script))  # resumes from 2, stops after 4 or 5
    assert "resuming from" in termed.stderr and "checkpoint-2 (step 2)" in termed.stderr
    for rank in (0, 1):
        assert f"(rank {rank}): error: SIGTERM: stopped at step" in termed.stderr, termed.stderr
    newest = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("checkpoint-*"))
    assert newest >= 4 and (run / "checkpoints" / f"checkpoint-{newest}" / "rng_state_1.pth").is_file()

    final = launch(2, "train", recipe, *overrides)
    assert final.returncode == 0, final.stderr
    assert f"checkpoint-{newest} (step {newest})" in final.stderr
    assert losses(run).keys() == losses(tmp_path / "reference").keys()
    ours, theirs = adapter(run), adapter(tmp_path / "reference")
    assert ours.keys() == theirs.keys()
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) <= 1e-6

    # Resuming with another number of ranks is refused, naming both numbers.
    (run / "manifest.json").unlink()
    one_rank = subprocess.run(
        [sys.executable, "-m", "qlora_pipe", "train", recipe, *overrides, "train.max_steps=8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one_rank.returncode == 2, one_rank.stderr
    assert "was trained by 2 rank(s)" in one_rank.stderr and "this run has 1" in one_rank.stderr


def test_only_train_runs_on_several_ranks(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "qlora_pipe", "report", str(tmp_path)],
        capture_output=True,
        text=True,
        env=os.environ | {"WORLD_SIZE": "2", "RANK": "1"},
    )
    assert result.returncode == 2
    assert "qlora-pipe report (rank 1): error: only `train` runs on several ranks" in result.stderr


def test_fsdp2_with_4bit_weights_and_fsdp_on_the_cpu_are_refused(monkeypatch, write_recipe, tiny_model):
    recipe = load_recipe(write_recipe(tiny_model("llama")))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(UserError, match=r"FSDP2 with 4-bit weights is broken upstream"):
        train_stage.check_sharding(recipe, "cuda")
    monkeypatch.setenv("FSDP_VERSION", "1")
    train_stage.check_sharding(recipe, "cuda")
    with pytest.raises(UserError, match=r"recipes/accelerate/ddp.yaml"):
        train_stage.check_sharding(recipe, "cpu")
    assert model.quant_storage(torch.bfloat16) == torch.bfloat16  # FSDP shards floating storage only
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert model.quant_storage(torch.bfloat16) == torch.uint8


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP-QLoRA needs two CUDA GPUs")
def test_fsdp_qlora_adapter_merges_exactly(two_rank_recipe, tmp_path):
    recipe = two_rank_recipe("fsdp", batch_size=2)
    config = str(ROOT / "recipes" / "accelerate" / "fsdp_qlora.yaml")
    result = accelerate_launch(
        "--config_file", config, "-m", "qlora_pipe", "train", str(recipe), "model.compute_dtype=bfloat16", timeout=900
    )
    assert result.returncode == 0, result.stderr
    run = tmp_path / "fsdp"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["ranks"]["strategy"] == "fsdp" and manifest["quantization"]["quant_storage"] == "bfloat16"
    merged = subprocess.run(
        [sys.executable, "-m", "qlora_pipe", "merge", str(run), "--dtype", "float32"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert merged.returncode == 0, merged.stderr
    report = json.loads((run / "merged" / "merge_report.json").read_text())
    assert report["modes"]["dequantized"]["relative_error"] <= 1e-5, report


@pytest.mark.slow
def test_accelerate_launch_with_the_ddp_config_runs_two_ranks(two_rank_recipe, tmp_path):
    config = str(ROOT / "recipes" / "accelerate" / "ddp.yaml")
    recipe = str(two_rank_recipe("accelerate", max_steps=2))
    result = accelerate_launch("--config_file", config, "-m", "qlora_pipe", "train", recipe)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "accelerate" / "manifest.json").read_text())["ranks"]["world_size"] == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="accelerate starts one process per GPU where there are GPUs")
def test_accelerate_launch_that_would_start_one_process_for_two_is_refused(write_recipe, tiny_model):
    recipe = str(write_recipe(tiny_model("llama")))
    result = accelerate_launch("--cpu", "--num_processes", "2", "-m", "qlora_pipe", "train", recipe, timeout=300)
    assert result.returncode != 0
    assert "qlora-pipe train: error: accelerate launch started 1 process for --num_processes 2" in result.stderr
    assert "torchrun --nproc_per_node 2 -m qlora_pipe train RECIPE" in result.stderr
