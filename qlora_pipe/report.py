"""`qlora-pipe report RUN_DIR`: what a training run did, from its manifest and loss log, plus a loss-curve PNG; for
image runs also the validation grids, one row per step, in one PNG.

Works on a finished run and on one still training or interrupted (then from train_log.jsonl alone).
"""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from qlora_pipe import UserError
from qlora_pipe.config import DIFFUSION_TASKS
from qlora_pipe.run import (
    LOSS_CURVE,
    RUN_STATE,
    VALIDATION,
    VALIDATION_OVERVIEW,
    finished_metrics,
    read_log,
    recorded_world_size,
)


def summary(run: Path) -> dict:
    """Steps, losses, learning rate, throughput (of all ranks together), peak memory and time of a run."""
    records = read_log(run)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    finished = finished_metrics(run)
    metrics = finished or {}
    return {
        "finished": finished is not None,
        "images": started_recipe(run).get("task") in DIFFUSION_TASKS,
        "steps": metrics.get("steps", max((r["step"] for r in records), default=0)),
        "train_loss_first": train[0]["loss"] if train else None,
        "train_loss_last": train[-1]["loss"] if train else None,
        "eval_loss_before": metrics.get("eval_loss_before"),
        "eval_loss_after": metrics.get("eval_loss_after", evals[-1]["eval_loss"] if evals else None),
        "learning_rate_last": train[-1].get("learning_rate") if train else None,
        **{
            k: metrics.get(k)
            for k in (
                "tokens_seen",
                "tokens_per_second",
                "images_seen",
                "images_per_second",
                "denoise_loss_before",
                "denoise_loss_after",
                "peak_memory_gib",
                "peak_memory_of",
                "train_seconds",
            )
        },
        "resumed_from": metrics.get("resumed_from"),
        "ranks": recorded_world_size(run),  # tokens are counted over all of them; memory is rank 0's
    }


def started_recipe(run: Path) -> dict:
    """The recipe a run started with (its run state is written before the first step)."""
    path = run / RUN_STATE
    return json.loads(path.read_text()).get("recipe", {}) if path.exists() else {}


def plot(run: Path) -> Path:
    """Train and eval loss against the step, the learning rate on a second axis."""
    records = read_log(run)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    fig = Figure(figsize=(8, 4.5), dpi=100)  # no pyplot: no display, no global state
    ax = fig.subplots()
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(run.name)
    if any("learning_rate" in r for r in train):
        lr = ax.twinx()
        lr.plot([r["step"] for r in train], [r.get("learning_rate") for r in train], color="grey", alpha=0.4)
        lr.set_ylabel("learning rate", color="grey")
    ax.legend(loc="upper right")
    fig.tight_layout()
    out = run / LOSS_CURVE
    fig.savefig(out)
    return out


def validation_overview(run: Path) -> Path | None:
    """An image run's validation grids (validation/step-NNNNNN.png), top to bottom by step, each labelled."""
    grids = sorted((run / VALIDATION).glob("step-*.png"))
    if not grids:
        return None
    rows = [Image.open(g).convert("RGB") for g in grids]
    label = 16
    width = max(r.width for r in rows)
    sheet = Image.new("RGB", (width, sum(r.height + label for r in rows)), "white")
    draw, y = ImageDraw.Draw(sheet), 0
    for grid, row in zip(grids, rows, strict=True):
        draw.text((4, y + 2), f"step {int(grid.stem.removeprefix('step-'))}", fill="black")
        sheet.paste(row, (0, y + label))
        y += row.height + label
    out = run / VALIDATION_OVERVIEW
    sheet.save(out)
    return out


def report(run_dir: str | Path) -> tuple[dict, Path]:
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"{run}: no such directory (give the output directory of `qlora-pipe train`)")
    s = summary(run)
    s["validation_grids"] = [str(p) for p in sorted((run / VALIDATION).glob("step-*.png"))]
    s["validation_overview"] = validation_overview(run)
    return s, plot(run)
