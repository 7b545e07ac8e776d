"""Benchmark the LoftQ fit on 7B-shaped matrices on this machine: exact vs low-rank SVD, against PEFT's loftq_init.

Each figure is measured in a child process (seconds per matrix, peak RSS from wait4). Rank 16, alpha 32, 5
iterations, the recipe defaults' NF4 settings (double quant, bf16 load and storage). PEFT's loftq_init hard-codes a
CUDA/XPU device; the baseline runs it with that one line pointed at the CPU (no double quant, exact SVD: its own
algorithm). Prints one line per figure, the ratios, and a projection for a whole 7B model (32 layers × 4 of 4096² and
3 of 4096×11008).

    python tools/bench_loftq.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

SHAPES = {"4096x4096": (4096, 4096), "4096x11008": (4096, 11008)}
RANK, ALPHA, ITERS = 16, 32, 5


def matrix(shape: tuple[int, int]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)


def child(kind: str, shape_name: str) -> None:
    """Runs in the child process: one fit, then prints its seconds and errors as JSON."""
    from qlora_pipe import loftq
    from qlora_pipe.model import NF4

    w = matrix(SHAPES[shape_name])
    # first-call costs (thread pools, tables) are paid once per model, not per matrix
    warm_up = matrix((256, 256)).float()
    if kind == "peft":
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from test_loftq import peft_loftq_init_on_cpu

        peft_loftq_init_on_cpu()(warm_up, num_bits=4, reduced_rank=RANK, num_iter=1)
    else:
        loftq.fit_matrix(warm_up, {**NF4, "load_dtype": "bfloat16"}, RANK, 2.0, 1, kind, None, torch.device("cpu"))
    start = time.monotonic()
    if kind == "peft":
        q, a, b = peft_loftq_init_on_cpu()(w.float(), num_bits=4, reduced_rank=RANK, num_iter=ITERS)
        seconds = time.monotonic() - start
        wf = w.float()
        error_q = torch.linalg.matrix_norm(wf - q).item()
        error_loftq = torch.linalg.matrix_norm(wf - (q + ALPHA / RANK * b @ a)).item()
        norm = torch.linalg.matrix_norm(wf).item()
    else:
        quantization = {**NF4, "load_dtype": "bfloat16"}
        fit = loftq.fit_matrix(w, quantization, RANK, ALPHA / RANK, ITERS, kind, torch.bfloat16, torch.device("cpu"))
        seconds, error_q, error_loftq, norm = fit.seconds, fit.error_backbone, fit.error_loftq, fit.norm_w
    print(json.dumps({"seconds": seconds, "rel_error_q": error_q / norm, "rel_error_loftq": error_loftq / norm}))


def measure(kind: str, shape_name: str) -> dict:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", kind, shape_name],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        sys.exit(f"{kind} {shape_name} failed")
    result = json.loads(proc.stdout.read().strip().splitlines()[-1])
    result["peak_rss_gib"] = usage.ru_maxrss * 1024 / 2**30
    label = f"{kind} {shape_name}"
    for key, value in result.items():
        print(f"{label:<26} {key:<16} {value:10.4f}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    # exact SVD of a 4096×11008 matrix takes ~5 minutes here; it is measured on 4096² only
    results = {("lowrank", shape): measure("lowrank", shape) for shape in SHAPES}
    results["exact", "4096x4096"] = measure("exact", "4096x4096")
    seconds = 32 * (4 * results["lowrank", "4096x4096"]["seconds"] + 3 * results["lowrank", "4096x11008"]["seconds"])
    print(f"{'lowrank whole 7B (projected)':<26} {'minutes':<16} {seconds / 60:10.2f}")
    if not args.skip_baseline:
        peft = measure("peft", "4096x4096")
        for kind in ("lowrank", "exact"):
            ratio = results[kind, "4096x4096"]["seconds"] / peft["seconds"]
            print(f"{'ratio ' + kind + '/peft':<26} {'seconds 4096²':<16} {ratio:10.4f}")


if __name__ == "__main__":
    main()
