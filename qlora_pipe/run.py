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
    adapter         the adapter folder, relative to the run
    metrics         losses before/after, steps, time, tokens/s, peak memory (predicted and measured)
The LoftQ manifest holds recipe, base (path, weights_fingerprint), settings, device and summary; the merge manifest
source_run, base, mode, dtype, quantized_on and report.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from qlora_pipe import UserError
from qlora_pipe.config import Recipe, recipe_from_dict, recipe_to_dict
from qlora_pipe.manifest import MANIFEST, read_manifest, write_json

logger = logging.getLogger(__name__)

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
    """The finished training run in `run_dir`; a user error when it is not one or its adapter is missing."""
    manifest = read_manifest(run_dir, "train")
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
    """The training run that `path` is (or whose adapter it is), else None."""
    path = Path(path)
    if (path / "adapter_config.json").exists() and (path.parent / MANIFEST).exists():
        path = path.parent
    if (path / MANIFEST).exists() and read_manifest(path).get("stage") == "train":
        return path
    return None


def recipe_behind(path: Path) -> Recipe | None:
    """The recipe behind a run directory, a run's adapter or a merged model (through its manifest), if any."""
    for candidate in (path, path.parent):
        if (candidate / MANIFEST).exists():
            manifest = read_manifest(candidate)
            if manifest.get("stage") == "merge":
                return recipe_behind(Path(manifest["source_run"]))
            if manifest.get("stage") == "train":
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
    """transformers writes trainer_state.json after the weights, optimizer, scheduler and RNG states: a checkpoint
    whose state file parses and names the checkpoint's own step was written whole."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    files = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt")
    return (
        state.get("global_step") == checkpoint_step(checkpoint)
        and all((checkpoint / f).is_file() for f in files)
        and any(checkpoint.glob("rng_state*.pth"))
    )


def check_resume(resume: str) -> None:
    """--resume: `auto`, `never` or a complete checkpoint directory (checked before anything is loaded)."""
    if resume not in ("auto", "never") and not is_complete(Path(resume)):
        raise UserError(
            f"--resume {resume}: not a complete trainer checkpoint (it needs trainer_state.json, "
            "adapter_model.safetensors, optimizer.pt, scheduler.pt and rng_state*.pth)"
        )


def resume_point(out: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: `auto` the newest complete one (incomplete newer ones are removed with a
    warning), `never` none (existing checkpoints are removed), or the given checkpoint directory."""
    found = [p for p in (out / CHECKPOINTS).glob("checkpoint-*") if checkpoint_step(p) is not None]
    found.sort(key=checkpoint_step, reverse=True)
    if resume == "never":
        if found:
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
        logger.warning("skipping %s: it is incomplete (the run stopped while writing it); removing it", checkpoint)
        shutil.rmtree(checkpoint)
    return None


@dataclass
class RunState:
    """OUTPUT_DIR/.run_state.json: what a resumed run needs that trainer checkpoints do not hold: the recipe it
    started with, the eval metrics before training, and the wall time spent up to each checkpoint."""

    recipe: dict
    metrics_before: dict
    seconds_at_step: dict[str, float]

    def save(self, out: Path) -> None:
        write_json(out / RUN_STATE, vars(self))

    def seconds_at(self, step: int) -> float:
        return self.seconds_at_step.get(str(step), 0.0)


def start_state(out: Path, recipe: Recipe) -> RunState:
    """A fresh run: no log yet, nothing measured."""
    (out / TRAIN_LOG).unlink(missing_ok=True)
    return RunState(recipe_to_dict(recipe), {}, {})


def resumed_state(out: Path, recipe: Recipe, checkpoint: Path) -> RunState:
    """The state of the run resumed at `checkpoint`, after checking that `recipe` is the one it started with; the log
    records written after the checkpoint are dropped (the resumed run writes them again)."""
    path = out / RUN_STATE
    raw = json.loads(path.read_text()) if path.exists() else {}
    # Read through the recipe schema, so that keys added since the run started count at their defaults.
    started = recipe_to_dict(recipe_from_dict(raw["recipe"])) if "recipe" in raw else recipe_to_dict(recipe)
    check_same_recipe(started, recipe_to_dict(recipe), out)
    keep_log_until(out / TRAIN_LOG, checkpoint_step(checkpoint))
    return RunState(started, raw.get("metrics_before", {}), raw.get("seconds_at_step", {}))


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
