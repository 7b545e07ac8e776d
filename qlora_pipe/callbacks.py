"""Trainer callbacks of the train stage: the loss log, the run's clock across resumes, and clean stops (on
SIGINT/SIGTERM after a checkpoint; at once when training diverges)."""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import TrainerCallback

from qlora_pipe import UserError
from qlora_pipe.run import RunState, any_rank, is_writer

logger = logging.getLogger(__name__)


class Interrupted(UserError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint; the exit status says which signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopControl(TrainerCallback):
    """Stops training cleanly. After a SIGINT/SIGTERM: save a checkpoint at the end of the step, then stop. When the
    loss or the adapter weights become non-finite: stop at once and save nothing, so the last checkpoint stays good."""

    def __init__(self):
        self.signal, self.diverged_at = None, None

    def _diverge(self, state, control) -> None:
        self.diverged_at = self.diverged_at or state.global_step
        control.should_save, control.should_evaluate, control.should_training_stop = False, False, True

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # The trained parameters as the model holds them now (under FSDP, this rank's shards of them). Several ranks
        # decide together: a rank that stopped alone would leave the others waiting in the next step.
        trained = [p.detach().isfinite().all() for p in model.parameters() if p.requires_grad]
        if any_rank(not torch.stack(trained).all()):
            self._diverge(state, control)
        elif any_rank(self.signal is not None):
            control.should_save, control.should_training_stop = True, True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and not math.isfinite(logs["loss"]):
            self._diverge(state, control)


@contextmanager
def graceful_stop(stop: StopControl):
    """The first SIGINT/SIGTERM asks `stop` to checkpoint and stop; a second one stops at once."""

    def handler(signum, frame):
        if stop.signal is not None:
            raise SystemExit(128 + signum)
        stop.signal = signum
        name = signal.Signals(signum).name
        logger.warning(
            "%s: saving a checkpoint at the end of this step, then stopping (send it again to stop now)", name
        )

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class RunClock(TrainerCallback):
    """Wall time of the whole run across resumes, recorded in the run state at every checkpoint."""

    def __init__(self, out: Path, state: RunState, start_seconds: float):
        self.out, self.state, self.start = out, state, time.monotonic() - start_seconds

    def seconds(self) -> float:
        return time.monotonic() - self.start

    def on_save(self, args, state, control, **kwargs):
        self.state.seconds_at_step[str(state.global_step)] = round(self.seconds(), 2)
        self.state.save(self.out)  # written by the writer alone


class LossLog(TrainerCallback):
    """Append every log record (loss, learning rate, eval loss) to OUTPUT_DIR/train_log.jsonl as it happens."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if is_writer() and logs:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")
