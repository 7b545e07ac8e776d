"""Measure the memory of a training step, phase by phase, beside `qlora-pipe estimate`'s prediction for it.

Builds a random Llama-style model of the given shape (cached under --workdir; or takes a real one, --base), writes a
recipe for it and trains a few steps through qlora_pipe's own train stage. For the measured step (the second: optimizer
states exist by then) it reports what the step starts from (weights, adapter, gradients, optimizer states), the peak
while the fused LM head runs (forward and backward), the peak during the rest (the layers' forward, recompute and
backward), the step time, and the estimate's prediction for the same recipe and data. CPU: bytes of live tensor
storages (PeakMemory); CUDA: the caching allocator's peaks (max_memory_allocated, reset at each phase boundary).

    python tools/measure_memory.py --hidden 512 --intermediate 2048 --layers 2 --vocab 32000 --seq 2048
    python tools/measure_memory.py --hidden 4096 --intermediate 14336 --heads 32 --kv-heads 8 --vocab 128256 \\
        --seq 2048 --batch 2 --set train.tiled_mlp=true
    python tools/measure_memory.py --grid cuda --out cuda.json   # the calibration grid, each shape in its own process
    python tools/measure_memory.py --base ~/.cache/qlora_pipe/SmolLM2-135M-Instruct --data chats.jsonl --seq 96 \\
        --batch 4 --set model.compute_dtype=float32     # a real checkpoint and data set instead of a random shape

With rows of varied length the measured step's micro-batch is usually smaller than the data's largest, which the
estimate predicts: the tool also prints the prediction for the micro-batch the measured step really had.

Figures it printed are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["match", "goal", "soup", "bread", "laptop", "screen", "the", "a", "wonderful", "awful", "team", "dinner"]
LLAMA_8B = {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "vocab": 128256}
# The CUDA calibration grid: Llama-3.1-8B's widths at 2 and 4 layers (the per-layer terms are their difference),
# today's settings for comparison, each memory option alone and together, and smaller widths.
GRIDS = {
    "cuda": [
        {**LLAMA_8B, "layers": 2, "seq": 2048, "batch": 2},
        {**LLAMA_8B, "layers": 4, "seq": 2048, "batch": 2},
        {
            **LLAMA_8B,
            "layers": 2,
            "seq": 2048,
            "batch": 2,
            "set": ["model.frozen_dtype=float32", "train.loss_chunk_tokens=4096"],
        },
        {**LLAMA_8B, "layers": 2, "seq": 2048, "batch": 2, "set": ["train.tiled_mlp=true"]},
        {**LLAMA_8B, "layers": 2, "seq": 2048, "batch": 2, "set": ["train.activation_offloading=true"]},
        {
            **LLAMA_8B,
            "layers": 4,
            "seq": 2048,
            "batch": 2,
            "set": ["train.activation_offloading=true", "train.tiled_mlp=true"],
        },
        {**LLAMA_8B, "layers": 2, "seq": 2048, "batch": 2, "set": ["lora.dropout=0.05"]},
        {**LLAMA_8B, "layers": 2, "seq": 2048, "batch": 2, "labelled": 0.2},
        {**LLAMA_8B, "layers": 2, "seq": 8192, "batch": 1, "set": ["train.tiled_mlp=true"]},
        {
            "hidden": 2048,
            "intermediate": 4096,
            "heads": 16,
            "kv_heads": 4,
            "vocab": 32000,
            "layers": 2,
            "seq": 2048,
            "batch": 2,
        },
        {
            "hidden": 1024,
            "intermediate": 4096,
            "heads": 16,
            "kv_heads": 16,
            "vocab": 2048,
            "layers": 2,
            "seq": 4096,
            "batch": 1,
            "set": ["model.compute_dtype=float32"],
        },
    ],
    # Llama-3.1-8B's own shape (32 layers): the 12 GB recipe's settings with and without offloading, the 24 GB
    # recipe's, and today's before this version (fp32 frozen weights, 4096-token head tiles).
    "cuda-8b": [
        {
            **LLAMA_8B,
            "layers": 32,
            "seq": 2048,
            "batch": 2,
            "set": ["lora.dropout=0.0", "train.tiled_mlp=true", "train.activation_offloading=true"],
        },
        {**LLAMA_8B, "layers": 32, "seq": 2048, "batch": 2, "set": ["lora.dropout=0.0", "train.tiled_mlp=true"]},
        {**LLAMA_8B, "layers": 32, "seq": 2048, "batch": 2, "set": ["lora.dropout=0.05"]},
        {
            **LLAMA_8B,
            "layers": 32,
            "seq": 2048,
            "batch": 2,
            "set": ["lora.dropout=0.05", "model.frozen_dtype=float32", "train.loss_chunk_tokens=4096"],
        },
    ],
    "cpu": [
        {"hidden": 512, "intermediate": 2048, "heads": 8, "kv_heads": 4, "vocab": 32000, "layers": 2, "seq": 2048},
        {
            "hidden": 512,
            "intermediate": 2048,
            "heads": 8,
            "kv_heads": 4,
            "vocab": 32000,
            "layers": 2,
            "seq": 2048,
            "set": ["train.tiled_mlp=true"],
        },
    ],
}


def build_base(work: Path, spec: dict) -> Path:
    """A random Llama-style base of the spec's shape in bf16 (built on the GPU when there is one), with the demo's
    tokenizer; cached by shape."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))  # the tiny-model builder
    from tiny_models import random_llama

    shape = {k: spec[k] for k in ("hidden", "intermediate", "heads", "kv_heads", "vocab", "layers")}
    out = work / ("base-" + hashlib.sha1(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:10])
    if (out / "config.json").exists():
        return out
    partial = out.with_name(out.name + ".partial")
    config = {
        "hidden_size": shape["hidden"],
        "intermediate_size": shape["intermediate"],
        "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["kv_heads"],
        "num_hidden_layers": shape["layers"],
        "vocab_size": shape["vocab"],
        "max_position_embeddings": 131072,
    }
    random_llama(partial, config, "cuda" if torch.cuda.is_available() else "cpu")
    partial.rename(out)
    return out


def write_data(path: Path, seq: int, rows: int, labelled: float) -> None:
    """Rows of about `seq` tokens (the tokenizer spends ~1.3 tokens per word): plain text (every position trained),
    or prompt-completion with `labelled` of the tokens in the completion."""
    rng = random.Random(0)
    words = int(seq / 1.25)
    lines = []
    for _ in range(rows):
        if labelled >= 1:
            lines.append({"text": " ".join(rng.choice(WORDS) for _ in range(words))})
        else:
            answer = max(1, int(words * labelled))
            lines.append(
                {
                    "prompt": " ".join(rng.choice(WORDS) for _ in range(words - answer)),
                    "completion": " " + " ".join(rng.choice(WORDS) for _ in range(answer)),
                }
            )
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def measure(spec: dict, work: Path) -> dict:
    """Train 2 steps of `spec` (plus any warm-up) and measure the second; runs in this process."""
    import torch
    import trl.kernels.chunked_logprob as trl_head
    import yaml

    from qlora_pipe import estimate, train
    from qlora_pipe.config import load_recipe

    base = spec.get("base") or build_base(work, spec)
    run = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    seq, batch = spec["seq"], spec.get("batch", 1)
    data = spec.get("data")
    if not data:
        data = run / "data.jsonl"
        write_data(data, seq, 4 * batch, spec.get("labelled", 1.0))
    recipe = {
        "model": {"base": str(base), "compute_dtype": "bfloat16"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "data": {
            "train": str(data),
            "eval_fraction": 0.0,
            "max_seq_length": seq,
            "max_truncated": 1.0,
            "format": "text" if spec.get("labelled", 1.0) >= 1 and not spec.get("data") else "auto",
        },
        "train": {
            "max_steps": 3,
            "batch_size": batch,
            "grad_accumulation": 1,
            "save_steps": 100,
            "logging_steps": 1,
            "report_to": "none",
            "packing": True,
            "learning_rate": 1e-4,
        },
        "output_dir": str(run / "out"),
    }
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    recipe = load_recipe(run / "recipe.yaml", spec.get("set", []))
    cuda = torch.cuda.is_available()
    phases = Phases(step=2, cuda=cuda)
    function = trl_head.ChunkedLogProbFunction
    for name in ("forward", "backward"):
        setattr(function, name, staticmethod(phases.around(getattr(function, name))))
    trainer, _ = train.build_trainer(recipe)
    clock = StepClock(cuda)
    trainer.add_callback(phases)
    trainer.add_callback(clock)
    trainer.data_collator = shapes = BatchShapes(trainer.data_collator)
    trainer.train()
    device = "cuda" if cuda else "cpu"
    step = estimate.step_shape(trainer.train_dataset, recipe, packed=trainer.args.packing)
    skeleton, compute_bytes = estimate.skeleton_for(recipe, None), estimate.compute_bytes(recipe, device)
    predicted = estimate.predict(skeleton, recipe, device, compute_bytes, step)
    # The data's largest micro-batch is what `estimate` predicts; with rows of varied length the measured step is
    # usually smaller, so the prediction for the batch the step really had tells model error from batch choice.
    accumulation = recipe.train.grad_accumulation
    tokens, labelled = max(shapes.batches[(phases.step - 1) * accumulation : phases.step * accumulation])
    batch = estimate.StepShape(tokens, labelled, "the measured batch")
    for_batch = estimate.predict(skeleton, recipe, device, compute_bytes, batch)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    extra = {}
    if cuda:
        free, total = torch.cuda.mem_get_info()
        extra = {"cuda_reserved": torch.cuda.max_memory_reserved(), "cuda_used_by_process": total - free}
    return {
        "spec": spec,
        "measured": phases.result() | extra,
        "step_seconds": clock.times,
        "losses": losses,
        "tokens": step.tokens,
        "labelled": step.labelled,
        "predicted": {"total": predicted.total, "parts": predicted.parts, "phases": predicted.phases},
        "measured_batch": {"tokens": tokens, "labelled": labelled},
        "predicted_for_measured_batch": {
            "total": for_batch.total,
            "parts": for_batch.parts,
            "phases": for_batch.phases,
        },
    }


class BatchShapes:
    """The trainer's collator, recording each micro-batch's positions (padding included) and the positions the LM
    head scores (those whose next label is trained), in the order the steps use them."""

    def __init__(self, collate):
        self.collate, self.batches = collate, []

    def __call__(self, examples):
        batch = self.collate(examples)
        labels = batch["labels"]
        self.batches.append((batch["input_ids"].numel(), int((labels[:, 1:] != -100).sum())))
        return batch


class StepClock(TrainerCallback):
    def __init__(self, cuda: bool):
        self.cuda, self.times = cuda, []

    def _sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(round(time.perf_counter() - self.start, 4))


class Phases(TrainerCallback):
    """Trainer callback and wrapper of TRL's head function: the peaks of one step, inside the head and outside."""

    def __init__(self, step: int, cuda: bool):
        self.step, self.cuda, self.active = step, cuda, False
        self.peaks = {"head": 0, "layers": 0}
        self.start = 0

    def around(self, fn):
        def wrapped(*args, **kwargs):
            self._switch("layers")
            try:
                return fn(*args, **kwargs)
            finally:
                self._switch("head")

        return wrapped

    def _switch(self, ended: str) -> None:
        """Close the phase that just ended (its peak so far) and start counting the next one afresh."""
        if not self.active:
            return
        if self.cuda:
            import torch

            self.peaks[ended] = max(self.peaks[ended], torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peaks[ended] = max(self.peaks[ended], self.mode.peak)
            self.mode.peak = self.mode.current

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step + 1 != self.step:
            return
        import torch

        from qlora_pipe.estimate import PeakMemory, resident_storages

        self.active = True
        if self.cuda:
            torch.cuda.synchronize()
            self.start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.mode = PeakMemory(resident_storages(model, optimizer))
            self.start = self.mode.baseline
            self.mode.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if not self.active:
            return
        self._switch("layers")
        self.active = False
        if not self.cuda:
            self.mode.__exit__(None, None, None)

    def result(self) -> dict:
        return {"resident": self.start, **self.peaks, "total": max(self.peaks.values())}


def spec_from_args(args: argparse.Namespace) -> dict:
    return {
        "hidden": args.hidden,
        "intermediate": args.intermediate,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "vocab": args.vocab,
        "layers": args.layers,
        "seq": args.seq,
        "batch": args.batch,
        "labelled": args.labelled,
        "set": args.set,
        "base": str(args.base) if args.base else None,
        "data": str(args.data) if args.data else None,
    }


def run_isolated(spec: dict, work: Path, timeout: float) -> dict:
    """One shape in a fresh process: allocator peaks and caches start clean, and a failure stays contained."""
    cmd = [sys.executable, __file__, "--one", json.dumps(spec), "--workdir", str(work)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"spec": spec, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"spec": spec, "error": proc.stderr[-2000:]}
    return json.loads(lines[-1].removeprefix("RESULT "))


def show(result: dict) -> None:
    spec = result["spec"]
    shape = f"h{spec['hidden']} i{spec['intermediate']} L{spec['layers']} v{spec['vocab']}"
    shape = Path(spec["base"]).name if spec.get("base") else shape
    label = f"{shape} {spec.get('batch', 1)}x{spec['seq']} {' '.join(spec.get('set', []))}"
    if "error" in result:
        print(f"{label}: FAILED {result['error'][-300:]}")
        return
    m, p, gib = result["measured"], result["predicted"], 2**30
    print(
        f"{label}: measured {m['total'] / gib:.3f} GiB (resident {m['resident'] / gib:.3f}, head phase "
        f"{m['head'] / gib:.3f}, layers phase {m['layers'] / gib:.3f}); predicted {p['total'] / gib:.3f} GiB "
        f"({p['total'] / m['total'] - 1:+.1%}); step {result['step_seconds'][-1]:.3f} s"
    )
    if "measured_batch" in result:
        b, q = result["measured_batch"], result["predicted_for_measured_batch"]
        print(
            f"  the measured batch: {b['tokens']} tokens, {b['labelled']} labelled (the data's largest: "
            f"{result['tokens']}, {result['labelled']}); predicted for it {q['total'] / gib:.3f} GiB "
            f"({q['total'] / m['total'] - 1:+.1%})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--labelled", type=float, default=1.0, help="share of tokens trained (prompt-completion)")
    parser.add_argument("--set", action="append", default=[], help="recipe override, e.g. train.tiled_mlp=true")
    parser.add_argument("--base", type=Path, help="a real checkpoint directory instead of a random model of the shape")
    parser.add_argument("--data", type=Path, help="the rows to train on (any format the recipe reads)")
    parser.add_argument("--grid", choices=sorted(GRIDS))
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "qlora_pipe_measure")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per shape")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.one:
        print("RESULT " + json.dumps(measure(json.loads(args.one), args.workdir)))
        return
    results = []
    for spec in GRIDS[args.grid] if args.grid else [spec_from_args(args)]:
        results.append(run_isolated(spec, args.workdir, args.timeout))
        show(results[-1])
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
