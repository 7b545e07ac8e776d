"""Benchmark training: the vanilla stack (PEFT + bitsandbytes + TRL defaults, padding to the longest example of each
batch), qlora_pipe as it was before its memory work (`today`: frozen weights upcast to fp32 as PEFT's
prepare_model_for_kbit_training does, TRL's 4096-token LM-head tiles) and qlora_pipe now (`ours`), same model, same
mixed-length data, same examples, in one run.

Each stack runs in its own process: warm-up steps, then timed steps. Printed side by side: tokens/s of real (not
padding) tokens, peak tensor memory of a training step (PeakMemory on the CPU, the CUDA allocator's peak on a GPU),
share of padding tokens, and the ratios against the first stack.

    python tools/bench_train.py                 # CPU: Llama-shaped, hidden 512, 8 layers, vocab 128256, seq 2048
    python tools/bench_train.py --stacks today,ours --layers 4 --batch 4 --completion-share 0.5
                                                # the memory work: 4 layers, 2 packed rows of 2048, long completions
    python tools/bench_train.py --quick         # a small shape, to check the script
    python tools/bench_train.py --gpu           # 7B-shaped random model under a 24 GB cap (needs CUDA)
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    "cpu": dict(
        hidden_size=512,
        intermediate_size=1376,
        num_attention_heads=8,
        num_key_value_heads=8,
        num_hidden_layers=8,
        vocab_size=128256,
    ),
    "quick": dict(
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_hidden_layers=2,
        vocab_size=32000,
    ),
    "gpu": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        num_hidden_layers=32,
        vocab_size=32000,
    ),
}

STACK = r"""
import json, sys, time, torch
sys.path.insert(0, ROOT)
from transformers import TrainerCallback
from qlora_pipe.estimate import MeasurePeak
stack, base, data, out, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
if args["gpu_cap_gib"]:  # a 24 GB card, emulated on a larger GPU
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, args["gpu_cap_gib"] * 2**30 / total))

class Clock(TrainerCallback):
    def __init__(self):
        self.times, self.tokens, self.padding = [], [], []
    def on_step_begin(self, a, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()
    def on_step_end(self, a, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.start)

if stack == "vanilla":
    import datasets, peft
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer
    dtype = getattr(torch, args["dtype"])
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
    model = peft.prepare_model_for_kbit_training(model)
    trainer = SFTTrainer(model=model, processing_class=tokenizer,
        train_dataset=datasets.load_dataset("json", data_files=data, split="train"),
        peft_config=peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
        args=SFTConfig(output_dir=out, max_length=args["seq"], per_device_train_batch_size=args["batch"],
                       max_steps=args["steps"], learning_rate=2e-4, logging_steps=1, save_strategy="no",
                       report_to="none", bf16=dtype == torch.bfloat16, use_cpu=not torch.cuda.is_available(),
                       shuffle_dataset=False, seed=0))
else:
    from qlora_pipe import train as stage
    from qlora_pipe.config import load_recipe
    today = ["model.frozen_dtype=float32", "train.loss_chunk_tokens=4096"]
    recipe = load_recipe(args["recipe"], today if stack == "today" else [])
    trainer, _ = stage.build_trainer(recipe)
clock, peak = Clock(), MeasurePeak(lambda: trainer.optimizer, step=args["warmup"] + 1)
trainer.add_callback(clock)
trainer.add_callback(peak)
batches = []
collate = trainer.data_collator
orig = collate.torch_call
def counting(examples):
    batch = orig(examples)
    real = sum(len(e["input_ids"]) for e in examples)
    batches.append((real, batch["input_ids"].numel()))
    return batch
collate.torch_call = counting
trainer.train()
timed = clock.times[args["warmup"]:]
real = sum(r for r, _ in batches[args["warmup"]:len(clock.times)])
total = sum(t for _, t in batches[args["warmup"]:len(clock.times)])
print("RESULT " + json.dumps({"stack": stack, "seconds": sum(timed), "real_tokens": real, "tokens_in_batches": total,
      "tokens_per_second": real / sum(timed), "padding_share": 1 - real / total, "peak_bytes": peak.peak,
      "steps": len(timed)}))
"""


def make_data(path: Path, examples: int, seq: int, seed: int = 0, completion_share: float = 0.25) -> None:
    """Prompt-completion examples whose total lengths spread evenly over about [seq/16, seq] tokens (the demo
    tokenizer spends ~1.5 tokens per word), `completion_share` of each in the completion."""
    rng = random.Random(seed)
    words = ["match", "goal", "soup", "bread", "laptop", "screen", "the", "a", "good", "bad", "team", "dinner"]
    rows = []
    for _ in range(examples):
        length = int(rng.randint(seq // 16, seq) / 1.5)
        answer = max(4, int(length * completion_share))
        rows.append(
            {
                "prompt": " ".join(rng.choice(words) for _ in range(length - answer)),
                "completion": " " + " ".join(rng.choice(words) for _ in range(answer)),
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_model(out: Path, shape: dict) -> None:
    sys.path.insert(0, str(ROOT / "tests"))  # the tiny-model builder
    from tiny_models import random_llama

    random_llama(out, {"max_position_embeddings": 8192, **shape})


def launch(stack: str, base: Path, data: Path, out: Path, args: dict) -> subprocess.CompletedProcess:
    """One stack's training, in a child process of its own (its memory and timing untouched by the others)."""
    code = STACK.replace("sys.path.insert(0, ROOT)", f"sys.path.insert(0, {str(ROOT)!r})")
    return subprocess.run(
        [sys.executable, "-c", code, stack, str(base), str(data), str(out), json.dumps(args)],
        capture_output=True,
        text=True,
    )


def run(stack: str, base: Path, data: Path, work: Path, args: dict) -> dict:
    proc = launch(stack, base, data, work / stack, args)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{stack} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4, help="vanilla: examples per batch")
    parser.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    parser.add_argument("--packing", choices=("true", "false"), default="true", help="ours: padding-free packing")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument(
        "--stacks", default="vanilla,ours", help="which of vanilla, today, ours to run; ratios are against the first"
    )
    parser.add_argument("--layers", type=int, help="override the shape's number of layers")
    parser.add_argument("--completion-share", type=float, default=0.25, help="share of each example in the answer")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="--gpu: the GPU's dense bf16 peak, for MFU")
    args = parser.parse_args()
    shape = dict(SHAPES["gpu" if args.gpu else "quick" if args.quick else "cpu"])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_train_"))
    work.mkdir(parents=True, exist_ok=True)
    base, data = work / "base", work / "data.jsonl"
    if not (base / "config.json").exists():
        make_model(base, shape)
    warmup = 1
    make_data(data, args.batch * (args.steps + warmup) * 2, args.seq, completion_share=args.completion_share)
    dtype = "bfloat16" if args.gpu else "auto"
    from qlora_pipe.model import resolve_compute_dtype

    dtype = str(resolve_compute_dtype(dtype)).removeprefix("torch.")
    rows = max(1, args.batch // 2) if args.packing == "true" else args.batch  # packed rows hold ~2 examples
    recipe = {
        "model": {"base": str(base), "compute_dtype": dtype},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "data": {
            "train": str(data),
            "eval_fraction": 0.0,
            "format": "prompt-completion",
            "max_seq_length": args.seq,
            "max_truncated": 1.0,
        },
        "train": {
            "max_steps": args.steps + warmup,
            "batch_size": rows,
            "grad_accumulation": 1,
            "packing": args.packing == "true",
            "save_steps": 10_000,
            "logging_steps": 1,
            "learning_rate": 2e-4,
            "report_to": "none",
        },
        "output_dir": str(work / "ours"),
    }
    import yaml

    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    common = {
        "seq": args.seq,
        "batch": args.batch,
        "steps": args.steps + warmup,
        "warmup": warmup,
        "dtype": dtype,
        "recipe": str(work / "recipe.yaml"),
        "gpu_cap_gib": 24 if args.gpu else None,
    }
    results = {stack: run(stack, base, data, work, common) for stack in args.stacks.split(",")}
    print(f"shape {shape}, seq {args.seq}, compute {dtype}, packing {args.packing}")
    for name, r in results.items():
        print(
            f"{name:>8}: {r['tokens_per_second']:8.1f} tokens/s ({r['real_tokens']} real tokens in "
            f"{r['seconds']:.1f} s over {r['steps']} steps), padding {r['padding_share']:.0%}, peak step memory "
            f"{r['peak_bytes'] / 2**30:.2f} GiB"
        )
    first, *others = results
    for name in others:
        v, o = results[first], results[name]
        print(
            f"ratio {name}/{first}: tokens/s {o['tokens_per_second'] / v['tokens_per_second']:.2f}x, "
            f"peak memory {o['peak_bytes'] / v['peak_bytes']:.2f}x"
        )
    if args.gpu:
        flops = flops_per_token(base, work / "recipe.yaml")
        for name, r in results.items():
            r["mfu"] = flops * r["tokens_per_second"] / (args.peak_tflops * 1e12)
            r["longest_seq_batch_1"] = longest_sequence(name, base, work, common)
            print(
                f"{name:>8}: MFU {r['mfu']:.1%}, longest sequence at batch 1 under the cap: "
                f"{r['longest_seq_batch_1']} tokens"
            )
    (work / "results.json").write_text(json.dumps(results, indent=2))


def flops_per_token(base: Path, recipe_path: Path) -> float:
    from qlora_pipe.config import load_recipe
    from qlora_pipe.estimate import estimate

    return estimate(load_recipe(recipe_path), device="cuda").flops_per_token


def longest_sequence(stack: str, base: Path, work: Path, common: dict) -> int:
    """Largest power-of-two-step sequence length (512 … 65536) that trains at batch 1 without running out of memory
    under the cap."""
    import yaml

    best, seq = 0, 512
    while seq <= 65536:
        data = work / f"long_{seq}.jsonl"
        make_data(data, 8, seq)
        recipe = yaml.safe_load((work / "recipe.yaml").read_text())
        recipe["data"] |= {"train": str(data), "max_seq_length": seq}
        recipe["train"] |= {"batch_size": 1, "max_steps": 2}
        recipe["output_dir"] = str(work / f"ours_{seq}")
        (work / f"recipe_{seq}.yaml").write_text(yaml.safe_dump(recipe))
        args = common | {"seq": seq, "batch": 1, "steps": 2, "warmup": 1, "recipe": str(work / f"recipe_{seq}.yaml")}
        if launch(stack, base, data, work / f"{stack}_{seq}", args).returncode != 0:
            break
        best, seq = seq, seq * 2
    return best


if __name__ == "__main__":
    main()
