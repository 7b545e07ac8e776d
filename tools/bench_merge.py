"""Benchmark the streaming merge against PEFT's load → merge_and_unload → save_pretrained, on the same input.

Generates, streaming (never whole in RAM), a random Llama checkpoint of the given shape in bf16 shards and a random
rank-16 all-linear adapter with a run manifest, then measures each merge in a child process (wall time, bytes
written, throughput, peak RSS from wait4) and prints one line per figure and the ratios.

    python tools/bench_merge.py --shape 7b --workdir /tmp/bench_merge    # 32 layers, hidden 4096, vocab 32000
    python tools/bench_merge.py --shape small                            # 4 layers, a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tiny-model builder

from tiny_models import build_tokenizer, corpus_lines  # noqa: E402

from qlora_pipe.manifest import fingerprint_weights, write_manifest  # noqa: E402
from qlora_pipe.model import NF4  # noqa: E402
from qlora_pipe.shards import OutTensor, ShardWriter  # noqa: E402

SHAPES = {
    "7b": dict(hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32000),
    "small": dict(hidden=4096, intermediate=11008, layers=4, heads=32, vocab=32000),
}
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASELINE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""


def linear_shapes(s: dict) -> dict[str, tuple[int, int]]:
    h, i = s["hidden"], s["intermediate"]
    return {
        "q_proj": (h, h),
        "k_proj": (h, h),
        "v_proj": (h, h),
        "o_proj": (h, h),
        "gate_proj": (i, h),
        "up_proj": (i, h),
        "down_proj": (h, i),
    }


def base_tensors(s: dict) -> list[OutTensor]:
    bf16, h = torch.bfloat16, s["hidden"]
    tensors = [OutTensor("model.embed_tokens.weight", bf16, [s["vocab"], h])]
    for layer in range(s["layers"]):
        prefix = f"model.layers.{layer}"
        for name, shape in linear_shapes(s).items():
            group = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            tensors.append(OutTensor(f"{prefix}.{group}.{name}.weight", bf16, list(shape)))
        tensors += [
            OutTensor(f"{prefix}.input_layernorm.weight", bf16, [h]),
            OutTensor(f"{prefix}.post_attention_layernorm.weight", bf16, [h]),
        ]
    return tensors + [OutTensor("model.norm.weight", bf16, [h]), OutTensor("lm_head.weight", bf16, [s["vocab"], h])]


def make_base(base: Path, s: dict) -> None:
    """A random bf16 checkpoint written tensor by tensor into 5 GB shards (memory: one tensor)."""
    from transformers import LlamaConfig

    base.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"],
        vocab_size=s["vocab"],
        dtype="bfloat16",
    )
    config.save_pretrained(base)
    tensors = base_tensors(s)
    writer = ShardWriter(base, tensors, 5 * 10**9)
    gen = torch.Generator().manual_seed(0)
    for t in tensors:
        value = torch.ones(t.shape) if t.key.endswith("norm.weight") else torch.randn(t.shape, generator=gen) * 0.02
        writer.write(t.key, value.to(t.dtype))
    writer.close()
    build_tokenizer(corpus_lines(ROOT / "data" / "tiny" / "train.jsonl"), 1024).save_pretrained(base)


def make_run(run: Path, base: Path, s: dict, rank: int = 16) -> None:
    """A run directory as `qlora-pipe train` leaves it: a random rank-16 all-linear adapter and the manifest."""
    from safetensors.torch import save_file

    adapter = run / "adapter"
    adapter.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1)
    weights, quantized = {}, {}
    for layer in range(s["layers"]):
        for name, (out_f, in_f) in linear_shapes(s).items():
            group = "self_attn" if name in LINEAR[:4] else "mlp"
            module = f"model.layers.{layer}.{group}.{name}"
            quantized[module] = {"conv1d": False}
            weights[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) * 0.01
            weights[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 0.01
    save_file(weights, adapter / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": list(LINEAR),
        "use_rslora": False,
        "fan_in_fan_out": False,
        "bias": "none",
        "base_model_name_or_path": str(base),
    }
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    for f in base.glob("tokenizer*"):
        shutil.copy(f, adapter / f.name)
    recipe = {
        "model": {"base": str(base), "compute_dtype": "bfloat16"},
        "data": {"train": "unused.jsonl"},
        "output_dir": str(run),
    }
    files = sorted(base.glob("*.safetensors"))
    quantization = {
        "method": "nf4",
        **NF4,
        "load_dtype": "bfloat16",
        "compute_dtype": "bfloat16",
        "device_kind": "cpu",
        "quantized_modules": quantized,
        "unquantized_dtypes": {},
    }
    base_facts = {"path": str(base), "model_type": "llama", "weights_fingerprint": fingerprint_weights(files)}
    write_manifest(run, "train", recipe=recipe, adapter="adapter", base=base_facts, quantization=quantization)


def measure(label: str, argv: list[str], out: Path, pattern: str = "*.safetensors") -> dict:
    """Run argv in a child process; wall time, bytes written under `out` (files matching `pattern`), peak RSS of
    that child (wait4)."""
    start = time.monotonic()
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.monotonic() - start
    if status != 0:
        sys.exit(f"{label} failed: {child.stderr.read()[-2000:]}")
    written = sum(f.stat().st_size for f in out.glob(pattern))
    result = {
        "wall_s": wall,
        "written_gb": written / 1e9,
        "mb_per_s": written / 1e6 / wall,
        "peak_rss_gib": usage.ru_maxrss * 1024 / 2**30,
    }
    for key, value in result.items():
        print(f"{label:<34} {key:<14} {value:10.2f}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qlora_pipe_bench_merge"))
    parser.add_argument("--skip-baseline", action="store_true", help="measure only our merge")
    parser.add_argument("--verify", default="none", help="--verify for our merge (default none: the write alone)")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    base, run = args.workdir / f"base_{args.shape}", args.workdir / f"run_{args.shape}"
    if not (base / "config.json").exists():
        print(f"generating a random {args.shape} Llama checkpoint in {base} ...", flush=True)
        make_base(base, shape)
    make_run(run, base, shape)
    ours_out, peft_out = args.workdir / "merged_ours", args.workdir / "merged_peft"
    for d in (ours_out, peft_out):
        shutil.rmtree(d, ignore_errors=True)
    cli = [sys.executable, "-m", "qlora_pipe.cli", "merge", str(run), "--out", str(ours_out), "--verify", args.verify]
    ours = measure("qlora-pipe merge (stream)", cli, ours_out)
    shutil.rmtree(ours_out, ignore_errors=True)
    if args.skip_baseline:
        return
    script = [sys.executable, "-c", BASELINE, str(base), str(run / "adapter"), str(peft_out)]
    peft = measure("peft merge_and_unload", script, peft_out)
    shutil.rmtree(peft_out, ignore_errors=True)
    print(f"{'ratio ours/peft':<28} {'wall':<14} {ours['wall_s'] / peft['wall_s']:10.2f}")
    print(f"{'ratio ours/peft':<28} {'throughput':<14} {ours['mb_per_s'] / peft['mb_per_s']:10.2f}")
    print(f"{'ratio ours/peft':<28} {'peak_rss':<14} {ours['peak_rss_gib'] / peft['peak_rss_gib']:10.2f}")


if __name__ == "__main__":
    main()
