"""Benchmark data parallelism on the CPU: 2 ranks x 1 thread (torchrun, DDP over gloo) against 1 process x 2 threads,
the same recipe, the same global batch (2 x b against 2b), the same steps, in one run.

Each configuration trains through `qlora-pipe train` in its own processes; the throughput is the run's own figure
(tokens of all ranks per second of training, from its manifest). Printed side by side with the ratio against the
single process, plus the peak memory of one process (rank 0) and its loss at the last step (the two must agree).

    python tools/bench_ranks.py                  # Llama-shaped, hidden 512, 4 layers, vocab 32000, 20 steps
    python tools/bench_ranks.py --quick          # a small shape, to check the script
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import bench_train  # noqa: E402  (beside this script)
from tiny_models import random_llama  # noqa: E402

# bench_train's shapes, at 4 layers and a 32k vocabulary for the CPU: the layers, not the head, dominate a step
SHAPES = {
    "cpu": bench_train.SHAPES["cpu"] | {"num_hidden_layers": 4, "vocab_size": 32000},
    "quick": bench_train.SHAPES["quick"],
}


def recipe(base: Path, out: Path, steps: int, batch: int) -> dict:
    return {
        "model": {"base": str(base), "quantization": "nf4", "compute_dtype": "auto"},
        "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
        "data": {"train": str(ROOT / "data" / "tiny" / "train.jsonl"), "eval": None, "max_seq_length": 128},
        "train": {
            "max_steps": steps,
            "batch_size": batch,
            "grad_accumulation": 1,
            "learning_rate": 2e-3,
            "logging_steps": 1,
            "save_steps": 10_000,
            "warmup_ratio": 0.0,
        },
        "output_dir": str(out),
    }


def run(command: list[str], threads: int) -> None:
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")


def measured(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    losses = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    m = manifest["metrics"]
    return {
        "tokens/s": m["tokens_per_second"],
        "seconds": m["train_seconds"],
        "peak GiB (one process)": m["peak_memory_gib"],
        "last loss": round([r["loss"] for r in losses if "loss" in r][-1], 4),
        "global batch": manifest["ranks"]["global_batch"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small shape and 5 steps, to check the script")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4, help="rows per rank; the single process takes twice as many")
    args = parser.parse_args()
    steps = 5 if args.quick else args.steps
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        random_llama(tmp / "base", SHAPES["quick" if args.quick else "cpu"])
        path = tmp / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe(tmp / "base", tmp / "one", steps, 2 * args.batch)))
        run([sys.executable, "-m", "qlora_pipe", "train", str(path)], threads=2)
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        overrides = [f"train.batch_size={args.batch}", f"output_dir={tmp / 'two'}"]
        run([*torchrun, "-m", "qlora_pipe", "train", str(path), *overrides], threads=1)
        results = {"1 process x 2 threads": measured(tmp / "one"), "2 ranks x 1 thread": measured(tmp / "two")}
    base = results["1 process x 2 threads"]["tokens/s"]
    print(f"{'':<24}" + "".join(f"{k:>24}" for k in results))
    for key in next(iter(results.values())):
        print(f"{key:<24}" + "".join(f"{r[key]:>24}" for r in results.values()))
    print(f"{'throughput ratio':<24}" + "".join(f"{r['tokens/s'] / base:>24.2f}" for r in results.values()))


if __name__ == "__main__":
    main()
