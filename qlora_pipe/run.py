"""The run directory: what `qlora-pipe train` (and the stages that follow it) write under OUTPUT_DIR, and how a run
is read back. Every file and folder name lives here; merge, generate, eval, report and loftq read runs only through
`load_run` and `recipe_behind`.

OUTPUT_DIR/
    manifest.json       written last, when training finished (see below)
    adapter/            the trained PEFT adapter (adapter_config.json, adapter_model.safetensors) and the tokenizer
    checkpoints/        trainer checkpoints (checkpoint-STEP/), the resume points
    train_log.jsonl     one JSON record per trainer log (loss, learning rate, eval loss), appended as they happen
    data_check.json     the data check's report (`qlora-pipe check-data`)
    .run_state.json     what a resumed run needs that checkpoints do not hold (RunState)
    loss_curve.png      `qlora-pipe report`
    loftq/              `qlora-pipe loftq` (lora.init: loftq): backbone/, adapter_init/, loftq_report.json, manifest
    merged/             `qlora-pipe merge`: the standalone model, merge_report.json, manifest
    adapter_analysis/   `qlora-pipe adapter inspect`: adapter_report.json, spectra.png, effective_rank.png,
                        similarity.png (with --compare), manifest

The train manifest's fields (manifest.py adds `stage`, `created` and `versions` to every manifest):
    recipe          the resolved recipe, as `qlora-pipe train --print-config` prints it
    base            path (the LoftQ backbone for LoftQ runs), model_type, weights_fingerprint (None for a hub id)
    quantization    method (nf4|none); for nf4 the settings (quant_type, double_quant, blocksize, quant_storage);
                    load_dtype (it sets the NF4 block scales), compute_dtype, device_kind (where bitsandbytes
                    quantized), quantized_modules (name → {conv1d}), unquantized_dtypes (parameters kept in another
                    dtype than load_dtype)
    data            format, assistant_only_loss and where the train/eval rows came from (paths and sha256)
    task, labels    causal_lm or seq_cls, and the class names of a classifier (index = class id)
    packing         whether examples were packed
    ranks           world_size, strategy (single process, ddp, fsdp, deepspeed), per_rank_batch, grad_accumulation
                    and global_batch (= world_size x per_rank_batch x grad_accumulation: what one step averages over)
    adapter         the adapter folder, relative to the run
    metrics         losses before/after, steps, time, tokens seen and tokens/s (of all ranks together), peak memory
                    (predicted and measured, of rank 0)
The LoftQ manifest holds recipe, base (path, weights_fingerprint), settings, device and summary; the merge manifest
source_run, base, mode, dtype, quantized_on and report.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from qlora_pipe import UserError
from qlora_pipe.config import Recipe, recipe_from_dict, recipe_to_dict
from qlora_pipe.manifest import MANIFEST, read_manifest, write_json

logger = logging.getLogger(__name__)
T = TypeVar("T")

ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
TRAIN_LOG = "train_log.jsonl"
DATA_CHECK = "data_check.json"
RUN_STATE = ".run_state.json"
LOSS_CURVE = "loss_curve.png"
LOFTQ = "loftq"
LOFTQ_PARTIAL = f".{LOFTQ}.partial"  # per-matrix results of an unfinished LoftQ stage
BACKBONE = "backbone"
ADAPTER_INIT = "adapter_init"
LOFTQ_REPORT = "loftq_report.json"
MERGED = "merged"
MERGE_REPORT = "merge_report.json"
EXPORT_DIR = "gguf"
EXPORT_REPORT = "export_report.json"
ADAPTER_ANALYSIS = "adapter_analysis"
# Directories that hold an adapter and what merging it needs: a training run, or adapters combined from runs
# (`qlora-pipe adapter combine`, whose adapter files sit in the directory itself).
RUN_STAGES = ("train", "combine")
ADAPTER_REPORT = "adapter_report.json"
# A resumed run must be the run that was started: only its length, logging and memory-only settings may change.
RESUMABLE_CHANGES = (
    "train.max_steps",
    "train.epochs",
    "train.logging_steps",
    "train.eval_steps",
    "train.save_steps",
    "train.save_total_limit",
    "train.report_to",
    "train.activation_offloading",
    "train.loss_chunk_tokens",
    "train.tiled_mlp",
)


# ---- several ranks: one writer ---------------------------------------------------------------------------------
# Under torchrun or `accelerate launch` every rank runs the same command. Rank 0 alone writes the run directory
# (manifest, adapter, data check report, logs, run state, removals; the Trainer's own should_save does the same for
# checkpoints) and runs the data check; the others read only what it has finished. A single process is rank 0 of
# one. The collectives go through accelerate, on the process group it set up.


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_writer() -> bool:
    return rank() == 0


def wait_for_writer() -> None:
    """Every rank waits here until all have arrived: what the writer wrote before it is complete for the others."""
    if world_size() > 1:
        from accelerate import PartialState  # imports torch: this module stays light for the command line's parser

        PartialState().wait_for_everyone()


def check_launcher() -> None:
    """`accelerate launch --num_processes N` starts one process when it finds no GPU and is not told --multi_gpu (its
    simple launcher, which runs several only through MPI): refuse to train alone what was meant for N ranks."""
    parent = Path(f"/proc/{os.getppid()}/cmdline")  # the launcher that started this process
    if world_size() > 1 or "ACCELERATE_USE_CPU" not in os.environ or not parent.exists():
        return
    argv = parent.read_bytes().decode(errors="replace").split("\0")
    # `accelerate launch`, `accelerate-launch` or `python -m accelerate.commands.launch`
    at = [i for i, a in enumerate(argv) if a == "launch" or a.endswith(("accelerate-launch", "commands.launch"))]
    if not at:
        return
    from accelerate.commands.config.config_args import default_config_file, load_config_from_file
    from accelerate.commands.launch import launch_command_parser  # accelerate's own reading of its command line

    args, _ = launch_command_parser().parse_known_args(argv[at[0] + 1 :])
    asked = args.num_processes
    if asked is None and (args.config_file or Path(default_config_file).is_file()):
        asked = load_config_from_file(args.config_file).num_processes
    if (asked or 1) > 1 and not args.mpirun_hostfile:
        raise UserError(
            f"accelerate launch started 1 process for --num_processes {asked}: without a GPU it starts several only "
            "with --multi_gpu and without --cpu (gloo on CPUs), or through MPI; launch with those flags, or use "
            f"torchrun --nproc_per_node {asked} -m qlora_pipe train RECIPE"
        )


def on_writer(work: Callable[[], T]) -> T:
    """Run `work` on the writer alone and give every rank its result, or raise its UserError on every rank, so that
    a refusal stops all ranks at once with the same message instead of leaving them waiting for rank 0."""
    if world_size() == 1:
        return work()
    from accelerate.utils import broadcast_object_list

    outcome: list = [None]
    if is_writer():
        try:
            outcome[0] = (True, work())
        except UserError as e:
            outcome[0] = (False, str(e))
    broadcast_object_list(outcome, from_process=0)
    done, value = outcome[0]
    if not done:
        raise UserError(value)
    return value


def any_rank(flag: bool) -> bool:
    """Whether `flag` holds on some rank: decisions that every rank must take together (stop after this step)."""
    if world_size() == 1:
        return flag
    import torch
    from accelerate import PartialState
    from accelerate.utils import reduce

    return bool(reduce(torch.tensor([float(flag)], device=PartialState().device), reduction="sum").item())


@dataclass(frozen=True)
class Run:
    """A finished training run, read once from its manifest: everything a later stage needs."""

    dir: Path
    manifest: dict
    recipe: Recipe
    adapter: Path
    base: str
    """The base as training loaded it: the recipe's, or the LoftQ backbone for LoftQ runs."""
    quantization: dict
    labels: list[str] | None
    """Class names of a classifier (task seq_cls), else None."""

    @property
    def quantized(self) -> bool:
        return self.quantization["method"] == "nf4"


def load_run(run_dir: str | Path) -> Run:
    """The finished training run in `run_dir` (or an adapter combined from runs, which stands in for one); a user
    error when it is not one or its adapter is missing."""
    manifest = read_manifest(run_dir)
    if manifest.get("stage") not in RUN_STAGES:
        read_manifest(run_dir, "train")  # raises, naming what wrote the directory
    if "recipe" not in manifest:
        raise UserError(
            f"{run_dir}: combined from adapters without their training runs; merging, evaluating or generating needs "
            "the base and quantization a run records: combine the runs' directories instead"
        )
    adapter = Path(run_dir) / manifest["adapter"]
    if not (adapter / "adapter_config.json").exists():
        raise UserError(f"{run_dir}: the adapter directory {adapter} is missing; re-run `qlora-pipe train`")
    if not (adapter / "adapter_model.safetensors").exists():
        raise UserError(f"{adapter}: no adapter_model.safetensors; adapters are read from safetensors only")
    return Run(
        dir=Path(run_dir),
        manifest=manifest,
        recipe=recipe_from_dict(manifest["recipe"]),
        adapter=adapter,
        base=manifest["base"]["path"],
        quantization=manifest["quantization"],
        labels=manifest.get("labels"),
    )


def run_dir_of(path: str | Path) -> Path | None:
    """The training run (or combined adapter) that `path` is, or whose adapter it is, else None."""
    path = Path(path)
    for candidate in (path, path.parent) if (path / "adapter_config.json").exists() else (path,):
        if (candidate / MANIFEST).exists() and read_manifest(candidate).get("stage") in RUN_STAGES:
            return candidate
    return None


def find_adapter(path: str | Path) -> tuple[Path, Run | None]:
    """The adapter directory behind `path` (a training run, its adapter/, a combined adapter, or any PEFT adapter
    directory) and its run when it has one; a user error when `path` holds none."""
    path = Path(path)
    run_dir = run_dir_of(path)
    if run_dir is not None:
        run = load_run(run_dir)  # checks the run's adapter files
        return run.adapter, run
    if not (path / "adapter_config.json").exists():
        raise UserError(f"{path}: not a training run or a PEFT adapter directory (no manifest.json or adapter_config)")
    if not (path / "adapter_model.safetensors").exists():
        raise UserError(f"{path}: no adapter_model.safetensors; adapters are read from safetensors only")
    return path, None


def recipe_behind(path: Path) -> Recipe | None:
    """The recipe behind a run directory, a run's adapter or a merged model (through its manifest), if any."""
    for candidate in (path, path.parent):
        if (candidate / MANIFEST).exists():
            manifest = read_manifest(candidate)
            if manifest.get("stage") == "merge":
                return recipe_behind(Path(manifest["source_run"]))
            if manifest.get("stage") in RUN_STAGES and "recipe" in manifest:
                return recipe_from_dict(manifest["recipe"])
    return None


def check_output_dir(out: Path) -> None:
    """Refuse to write a run into a directory that holds something else."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir: {out} exists and is not a directory")
    markers = (MANIFEST, CHECKPOINTS, LOFTQ, LOFTQ_PARTIAL)
    if out.is_dir() and any(out.iterdir()) and not any((out / m).exists() for m in markers):
        raise UserError(
            f"output_dir: {out} exists, is not empty and is not a qlora-pipe run; choose another output_dir"
        )


# ---- checkpoints and resuming -------------------------------------------------------------------------------------


def checkpoint_step(path: Path) -> int | None:
    suffix = path.name.removeprefix("checkpoint-")
    return int(suffix) if path.name.startswith("checkpoint-") and suffix.isdigit() else None


def is_complete(checkpoint: Path) -> bool:
    """rank 0 writes trainer_state.json after the weights, optimizer, scheduler and its RNG state, and every rank
    writes its own RNG state (rng_state_RANK.pth when there are several): a checkpoint whose state file names its own
    step and that holds the RNG state of every rank of its run was written whole."""
    ranks = recorded_world_size(checkpoint.parent.parent)
    rng_states = ["rng_state.pth"] if ranks == 1 else [f"rng_state_{i}.pth" for i in range(ranks)]
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    # The adapter and optimizer state as one file each, or under FSDP as its sharded state (one folder).
    written = [("adapter_model.safetensors", "pytorch_model_fsdp_0"), ("optimizer.pt", "optimizer_0")]
    written += [("scheduler.pt",), *[(f,) for f in rng_states]]
    return state.get("global_step") == checkpoint_step(checkpoint) and all(
        any((checkpoint / name).exists() for name in names) for names in written
    )


def check_resume(resume: str) -> None:
    """--resume: `auto`, `never` or a complete checkpoint directory (checked before anything is loaded)."""
    if resume not in ("auto", "never") and not is_complete(Path(resume)):
        raise UserError(
            f"--resume {resume}: not a complete trainer checkpoint (it needs trainer_state.json, "
            "adapter_model.safetensors, optimizer.pt, scheduler.pt and the RNG state of every rank)"
        )


def resume_point(out: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: `auto` the newest complete one (incomplete newer ones are removed with a
    warning), `never` none (existing checkpoints are removed), or the given checkpoint directory."""
    found = [p for p in (out / CHECKPOINTS).glob("checkpoint-*") if checkpoint_step(p) is not None]
    found.sort(key=checkpoint_step, reverse=True)
    if resume == "never":
        if found and is_writer():
            logger.warning(
                "--resume never: removing the %d existing checkpoint(s) in %s", len(found), out / CHECKPOINTS
            )
            shutil.rmtree(out / CHECKPOINTS)
        return None
    if resume != "auto":
        check_resume(resume)
        return Path(resume)
    for checkpoint in found:
        if is_complete(checkpoint):
            return checkpoint
        if is_writer():
            logger.warning("skipping %s: it is incomplete (the run stopped while writing it); removing it", checkpoint)
            shutil.rmtree(checkpoint)
    return None


@dataclass
class RunState:
    """OUTPUT_DIR/.run_state.json: what a resumed run needs that trainer checkpoints do not hold: the recipe it
    started with, the eval metrics before training, the wall time spent up to each checkpoint, and the number of
    ranks that train it."""

    recipe: dict
    metrics_before: dict
    seconds_at_step: dict[str, float]
    world_size: int = 1

    def save(self, out: Path) -> None:
        if is_writer():
            write_json(out / RUN_STATE, vars(self))

    def seconds_at(self, step: int) -> float:
        return self.seconds_at_step.get(str(step), 0.0)


def start_state(out: Path, recipe: Recipe) -> RunState:
    """A fresh run: no log yet, nothing measured."""
    if is_writer():
        (out / TRAIN_LOG).unlink(missing_ok=True)
    return RunState(recipe_to_dict(recipe), {}, {}, world_size())


def resumed_state(out: Path, recipe: Recipe, checkpoint: Path) -> RunState:
    """The state of the run resumed at `checkpoint`, after checking that `recipe` is the one it started with; the log
    records written after the checkpoint are dropped (the resumed run writes them again)."""
    path = out / RUN_STATE
    raw = json.loads(path.read_text()) if path.exists() else {}
    # Read through the recipe schema, so that keys added since the run started count at their defaults.
    started = recipe_to_dict(recipe_from_dict(raw["recipe"])) if "recipe" in raw else recipe_to_dict(recipe)
    check_same_recipe(started, recipe_to_dict(recipe), out)
    check_same_world_size(raw.get("world_size", 1), recipe, out)
    if is_writer():
        keep_log_until(out / TRAIN_LOG, checkpoint_step(checkpoint))
    return RunState(started, raw.get("metrics_before", {}), raw.get("seconds_at_step", {}), world_size())


def recorded_world_size(out: Path) -> int:
    """How many ranks trained the run in `out` (1 for a run without a run state)."""
    path = out / RUN_STATE
    return json.loads(path.read_text()).get("world_size", 1) if path.exists() else 1


def check_same_world_size(started: int, recipe: Recipe, out: Path) -> None:
    """A run resumes with the number of ranks it started with. Its data order, steps and RNG states are those of its
    global batch (ranks x batch_size x grad_accumulation) and its per-rank RNG states; keeping the global batch with
    another rank count would need another batch_size, which is a different recipe."""
    now = world_size()
    if now != started:
        per_rank = recipe.train.batch_size * recipe.train.grad_accumulation
        raise UserError(
            f"{out} was trained by {started} rank(s) (global batch {started * per_rank} = {started} x batch_size "
            f"{recipe.train.batch_size} x grad_accumulation {recipe.train.grad_accumulation}), and this run has "
            f"{now}; resume it with {started} rank(s) (torchrun --nproc_per_node {started}, or accelerate launch "
            f"--num_processes {started}), or start over with --resume never"
        )


def _flat(d: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict) and key != "columns":
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_same_recipe(started: dict, now: dict, out: Path) -> None:
    """A resumed run must be the run that was started; only its length and logging may change."""
    old, new = _flat(started), _flat(now)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    blocking = [k for k in changed if k not in RESUMABLE_CHANGES]
    if blocking:
        raise UserError(
            f"{out} holds a run started with a different recipe ({', '.join(blocking)} changed); resume it with "
            "its recipe, or start over with --resume never or another output_dir"
        )
    if changed:
        logger.warning("resuming with changed %s", ", ".join(changed))


def keep_log_until(path: Path, step: int) -> None:
    """Drop the log records written after `step`."""
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(line for line in lines if json.loads(line)["step"] <= step))


def finished_metrics(run: Path) -> dict | None:
    """The metrics of a finished run; None while it trains, or after it was interrupted."""
    return read_manifest(run, "train")["metrics"] if (run / MANIFEST).exists() else None


def read_log(run: Path) -> list[dict]:
    """The records of OUTPUT_DIR/train_log.jsonl, of a finished run or one still training."""
    path = run / TRAIN_LOG
    if not path.exists():
        raise UserError(f"{run}: no {TRAIN_LOG}; expected the output directory of `qlora-pipe train`")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
