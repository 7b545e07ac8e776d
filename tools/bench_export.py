"""Benchmark the streaming GGUF export of a 7B-shaped model against the I/O floor, measured in the same run.

Generates (streaming, as tools/bench_merge.py does) a random bf16 Llama checkpoint of the given shape, then measures
in child processes: a plain copy of its weight files (the I/O floor: every byte read once and written once), and
`qlora-pipe export MODEL_DIR --type f16`, once with `--verify none` (the write alone) and once with `--verify auto`
(a 7B model is read back tensor by tensor). Prints wall time, bytes written, peak RSS (wait4), and the ratios
against the copy and against the checkpoint's and its largest tensor's sizes.

    python tools/bench_export.py --shape 7b --workdir /tmp/bench_export    # 32 layers, hidden 4096, vocab 32000
    python tools/bench_export.py --shape small                             # 4 layers, a quick check
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_merge import SHAPES, base_tensors, make_base, measure  # noqa: E402

COPY = """
import shutil, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
for f in sorted(src.glob("*.safetensors")):
    shutil.copyfile(f, dst / f.name)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qlora_pipe_bench_export"))
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    base = args.workdir / f"base_{args.shape}"
    if not (base / "config.json").exists():
        print(f"generating a random {args.shape} Llama checkpoint in {base} ...", flush=True)
        make_base(base, shape)
    tensors = base_tensors(shape)
    model_gb = sum(t.nbytes for t in tensors) / 1e9
    largest_f32_gib = max(math.prod(t.shape) for t in tensors) * 4 / 2**30
    print(f"checkpoint: {model_gb:.2f} GB bf16; largest tensor in fp32 {largest_f32_gib:.2f} GiB", flush=True)

    copy_out = args.workdir / "copy"
    copy = measure("copy (I/O floor)", [sys.executable, "-c", COPY, str(base), str(copy_out)], copy_out, "*")
    shutil.rmtree(copy_out)
    results = {}
    for verify in ("none", "auto"):
        out = args.workdir / "gguf" / f"model-{verify}.gguf"
        shutil.rmtree(out.parent, ignore_errors=True)
        cli = [sys.executable, "-m", "qlora_pipe.cli", "export", str(base), "--out", str(out), "--verify", verify]
        results[verify] = measure(f"qlora-pipe export f16 verify={verify}", cli, out.parent, "*.gguf")
        shutil.rmtree(out.parent)
    for verify, r in results.items():
        print(f"{'ratio export/copy':<32} {'wall ' + verify:<14} {r['wall_s'] / copy['wall_s']:10.2f}")
        print(f"{'peak RSS / checkpoint':<32} {verify:<14} {r['peak_rss_gib'] * 2**30 / 1e9 / model_gb:10.2f}")
        print(f"{'peak RSS / largest fp32 tensor':<32} {verify:<14} {r['peak_rss_gib'] / largest_f32_gib:10.2f}")


if __name__ == "__main__":
    main()
