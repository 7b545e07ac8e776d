"""One command for a CUDA machine: what only a GPU can show, measured in one run, into one report.

    python tools/gpu_check.py                    # on one GPU, about 8 minutes at most; writes gpu_check.json
    python tools/gpu_check.py --layers 32        # part 1 at Llama-3.1-8B's full depth (longer)
    python tools/gpu_check.py --quick --cpu      # the CPU-safe parts on tiny shapes, even where a GPU exists

Parts, each in processes of its own (a crash, an out-of-memory or a hung kernel in one leaves the others' results in
the report, with the error text):

1. `train_compare`: a training step of a random model of Llama-3.1-8B's shape (recipes/llama-3.1-8b/config.json,
   built on the GPU, `--layers` of its 32 layers: memory and time per step grow by one layer's share per layer) in
   NF4, LoRA r=16 all-linear, gradient checkpointing, bf16, through qlora_pipe's train stage with the settings of
   recipes/llama-3.1-8b/qlora_sft.yaml, beside plain PEFT + TRL (prepare_model_for_kbit_training, SFTTrainer) on the
   same model, LoRA, optimizer, batch and rows: tokens/s and peak step memory of each, and the ratios ours / plain.
   Step 1 is a warm-up, step 2 is measured for memory, the steps after it are timed.
2. `chain`: train → merge → export (GGUF f16) of a tiny Llama through `qlora_pipe.cli.main`, with the merge report's
   relative error and the export's read-back figures; on CUDA also the merge re-quantized on the CPU, against the
   CUDA-trained model and tensor by tensor against the CUDA merge.
3. `offloading` (CUDA only): `train.activation_offloading: true` on a small model, its peak step memory and losses
   beside the same run without it.
4. `diffusion_nf4` (CUDA only): a tiny Stable Diffusion pipeline with `model.quantization: nf4` trains two steps and
   merges.
5. `gpu_tests` (CUDA only): `python -m pytest -m gpu -q`, with its pass / fail / skip counts.

Without CUDA (or with `--cpu`) parts 1 and 2 run on tiny shapes in fp32 and the others are marked skipped; the exit
status is 0 unless a part that ran failed. A package that is missing is named in the report with the command that
installs it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tools")]  # qlora_pipe, the tiny-model builders

LLAMA_8B = ROOT / "recipes" / "llama-3.1-8b"
PARTS = ("train_compare", "chain", "offloading", "diffusion_nf4", "gpu_tests")
CUDA_ONLY = {"offloading", "diffusion_nf4", "gpu_tests"}
# Import names each part needs, beside torch; the pip name when it differs.
NEEDS = {
    "train_compare": ["transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "yaml", "tokenizers"],
    "chain": ["transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "yaml", "tokenizers", "gguf"],
    "offloading": ["transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "yaml", "tokenizers"],
    "diffusion_nf4": ["transformers", "peft", "bitsandbytes", "accelerate", "diffusers", "PIL", "yaml", "tokenizers"],
    "gpu_tests": ["pytest"],
}
PIP_NAMES = {"yaml": "pyyaml", "PIL": "pillow"}
# Seconds each child process may take at most (the whole run is bounded by --budget as well).
CAPS = {"build": 150, "stack": 240, "chain": 150, "offload": 120, "diffusion": 120, "gpu_tests": 240}
# Part 1 on the CPU: Llama-3.1-8B's proportions (intermediate 3.5 × hidden, 4 query heads per KV head) at hidden 128.
CPU_SHAPE = {"hidden_size": 128, "intermediate_size": 448, "num_attention_heads": 4, "num_key_value_heads": 1}
# Part 3: a small model whose checkpointed layer inputs (8 layers × 4096 tokens × 1024 × bf16 = 64 MiB) show.
OFFLOAD_SPEC = {"hidden": 1024, "intermediate": 3584, "heads": 16, "kv_heads": 4, "vocab": 32000, "layers": 8}
GIB = 2**30


# ------------------------------------------------------------------------------------------------ packages, device
def install_hint(module: str) -> str:
    """The pip command for an import name, with the version pyproject.toml asks for."""
    name = PIP_NAMES.get(module, module)
    spec = name
    try:
        import tomllib

        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        wanted = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
        spec = next((r for r in wanted if re.split(r"[<>=!~\[ ]", r)[0].lower() == name.lower()), name)
    except (ImportError, KeyError, OSError):
        pass
    return f"pip install '{spec}'  (or everything: pip install -e '.[dev]')"


def missing_modules(modules: list[str]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def package_versions() -> dict[str, str]:
    names = ["torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "diffusers", "gguf"]
    versions = {}
    for name in [*names, "pytest"]:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = f"missing: {install_hint(name)}"
    return versions


def device_facts(use_cuda: bool) -> dict:
    import torch

    facts = {"python": sys.version.split()[0], "torch_cuda": torch.version.cuda, "cuda": use_cuda}
    if use_cuda:
        props = torch.cuda.get_device_properties(0)
        facts |= {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / GIB, 1),
            "devices": torch.cuda.device_count(),
            "bf16": torch.cuda.is_bf16_supported(),
        }
    return facts


# ------------------------------------------------------------------------------------------------ child processes
class ChildFailed(RuntimeError):
    pass


def run_child(kind: str, spec: dict, ctx: dict) -> dict:
    """One piece of a part in a fresh process (`--child KIND`): its GPU memory, allocator peaks and any crash stay
    its own. Returns what the child printed after RESULT."""
    timeout = min(CAPS[kind], ctx["deadline"] - time.monotonic())
    if timeout < 10:
        raise ChildFailed(f"not started: the time budget (--budget {ctx['budget']:.0f} s) is spent")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--spec", json.dumps(spec)]
    code, out, err = run_process(cmd, timeout, ctx["env"], ctx["logs"] / f"{spec.get('name', kind)}.log")
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if code is None:
        raise ChildFailed(f"{kind}: timed out after {timeout:.0f} s\n{err[-2500:]}")
    if code != 0 or not lines:
        raise ChildFailed(f"{kind}: exit status {code}\n{err[-2500:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def run_process(cmd: list[str], timeout: float, env: dict, log: Path) -> tuple[int | None, str, str]:
    """Run `cmd` in a session of its own, so that a timeout ends it and anything it started; None as the status
    when it timed out. Its output is kept in `log`."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        code = None
    log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{out}\n--- stderr\n{err}")
    return code, out, err


def error_text(e: BaseException) -> str:
    """The error as the report keeps it, with the install command when a package was missing."""
    text = str(e) if isinstance(e, ChildFailed) else f"{type(e).__name__}: {e}"
    found = re.findall(r"No module named '([\w.]+)'", text)
    if found:
        module = found[-1].split(".")[0]
        text = f"missing package {module}: {install_hint(module)}\n{text}"
    return text.strip()


# ------------------------------------------------------------------------------------------------ part 1
def shape_8b(layers: int, cpu: bool) -> dict:
    """Llama-3.1-8B's config fields (rope scaling included) at `layers` layers; on the CPU at CPU_SHAPE's widths and
    a 8192-entry vocabulary."""
    config = json.loads((LLAMA_8B / "config.json").read_text())
    dropped = ("architectures", "model_type", "torch_dtype", "bos_token_id", "eos_token_id", "tie_word_embeddings")
    config = {k: v for k, v in config.items() if k not in dropped} | {"num_hidden_layers": layers}
    return config | (CPU_SHAPE | {"vocab_size": 8192} if cpu else {})


def part_train_compare(ctx: dict) -> dict:
    cuda, quick = ctx["cuda"], ctx["quick"]
    layers = ctx["layers"] or (2 if quick or not cuda else 8)
    seq, batch = (1024 if quick else 2048, 2) if cuda else (128, 2)
    steps = 2 + (2 if quick or not cuda else 4)  # warm-up, memory, timed
    work = ctx["work"] / "train_compare"
    work.mkdir(parents=True, exist_ok=True)
    config = shape_8b(layers, cpu=not cuda)
    data = work / "rows.jsonl"
    build = {"name": "build_8b", "out": str(work / "base"), "config": config, "cuda": cuda}
    built = run_child("build", build | {"data": str(data), "seq": seq, "rows": batch * steps}, ctx)
    dtype = "bfloat16" if cuda else "float32"
    overrides = [
        f"model.base={work / 'base'}",
        f"model.compute_dtype={dtype}",
        f"data.train={data}",
        "data.format=text",
        "data.chat_template=auto",
        "data.eval_fraction=0.0",
        f"data.max_seq_length={seq}",
        "data.max_truncated=1.0",
        f"train.max_steps={steps}",
        f"train.batch_size={batch}",
        "train.grad_accumulation=1",
        "train.packing=false",  # rows of max_seq_length tokens each: the same batches as the plain stack's
        "train.eval_steps=null",
        "train.save_steps=100000",
        "train.logging_steps=1",
        "train.warmup_ratio=0.0",
        "train.report_to=none",
        f"output_dir={work / 'ours'}",
    ]
    if not cuda:
        overrides.append("train.optimizer=auto")  # paged 8-bit AdamW needs CUDA
    from qlora_pipe.config import load_recipe, optimizer_name

    recipe = load_recipe(LLAMA_8B / "qlora_sft.yaml", overrides)
    common = {
        "base": str(work / "base"),
        "data": str(data),
        "seq": seq,
        "batch": batch,
        "steps": steps,
        "dtype": dtype,
        "cuda": cuda,
        "lora": {"r": recipe.lora.r, "alpha": recipe.lora.alpha, "dropout": recipe.lora.dropout},
        "optimizer": optimizer_name(recipe.train.optimizer, "cuda" if cuda else "cpu"),
        "learning_rate": recipe.train.learning_rate,
        "max_grad_norm": recipe.train.max_grad_norm,
        "seed": recipe.train.seed,
    }
    result = {
        "shape": {k: config[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads")}
        | {k: config[k] for k in ("num_key_value_heads", "vocab_size", "num_hidden_layers")},
        "full_depth_layers": 32,
        "note": (
            f"{layers} of Llama-3.1-8B's 32 layers: each layer adds the same NF4 weights, LoRA states, checkpointed "
            "input and compute; the embeddings, LM head and loss head are the full model's"
            if cuda and layers != 32
            else "CPU: a tiny shape of Llama-3.1-8B's proportions in fp32, to check the comparison runs; the ratios "
            "say nothing of a GPU (TRL casts the plain stack's QLoRA adapters to bf16, slow on most CPUs)"
            if not cuda
            else "Llama-3.1-8B's full shape"
        ),
        "base": built,
        "rows": f"{batch} × {seq} tokens per step, {steps} steps (1 warm-up, 1 for memory, {steps - 2} timed)",
        "recipe": str((LLAMA_8B / "qlora_sft.yaml").relative_to(ROOT)),
        "overrides": overrides,
        "compute_dtype": dtype,
        "optimizer": common["optimizer"],
    }
    errors = []
    for stack in ("ours", "plain"):
        spec = common | {"name": f"stack_{stack}", "stack": stack, "out": str(work / stack)}
        spec |= {"recipe": str(LLAMA_8B / "qlora_sft.yaml"), "overrides": overrides} if stack == "ours" else {}
        try:
            result[stack] = run_child("stack", spec, ctx)
        except Exception as e:
            result[stack] = {"error": error_text(e)}
            errors.append(f"{stack}: {result[stack]['error']}")
    if not errors:
        ours, plain = result["ours"], result["plain"]
        result["ratios_ours_over_plain"] = {
            "tokens_per_second": round(ours["tokens_per_second"] / plain["tokens_per_second"], 3),
            "peak_step_memory": round(ours["peak_step_bytes"] / plain["peak_step_bytes"], 3),
        }
    shutil.rmtree(work / "base", ignore_errors=True)
    if errors:
        raise PartFailed(result, "\n".join(errors))
    return result


class PartFailed(RuntimeError):
    """A part that failed after measuring something: the partial result goes into the report with the error."""

    def __init__(self, partial: dict, message: str):
        super().__init__(message)
        self.partial = partial


def child_build(spec: dict) -> dict:
    """The random base (bf16, built on the GPU when there is one) and rows of max_seq_length tokens for it."""
    import measure_memory
    from tiny_models import random_llama

    start = time.perf_counter()
    random_llama(Path(spec["out"]), spec["config"], "cuda" if spec["cuda"] else "cpu")
    size = sum(f.stat().st_size for f in Path(spec["out"]).glob("*.safetensors"))
    measure_memory.write_data(Path(spec["data"]), spec["seq"], spec["rows"], 1.0)
    return {"parameters": size // 2, "bytes_bf16": size, "seconds": round(time.perf_counter() - start, 1)}


class Counting:
    """The trainer's collator, counting the real (not padding) tokens of every batch."""

    def __init__(self, collate):
        self.collate, self.tokens = collate, []

    def __call__(self, examples):
        batch = self.collate(examples)
        mask = batch.get("attention_mask")
        self.tokens.append(int(mask.sum()) if mask is not None else batch["input_ids"].numel())
        return batch


def plain_trainer(spec: dict):
    """What a user of plain PEFT + TRL writes for QLoRA: NF4 with double quant, prepare_model_for_kbit_training,
    SFTTrainer with a LoraConfig (TRL's defaults: gradient checkpointing on, no packing)."""
    import datasets
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    dtype = getattr(torch, spec["dtype"])
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    net = AutoModelForCausalLM.from_pretrained(
        spec["base"], dtype=dtype, quantization_config=quant, device_map={"": 0} if spec["cuda"] else None
    )
    net = peft.prepare_model_for_kbit_training(net)
    lora = spec["lora"]
    return SFTTrainer(
        model=net,
        processing_class=AutoTokenizer.from_pretrained(spec["base"]),
        train_dataset=datasets.load_dataset("json", data_files=spec["data"], split="train"),
        peft_config=peft.LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
        args=SFTConfig(
            output_dir=spec["out"],
            max_length=spec["seq"],
            per_device_train_batch_size=spec["batch"],
            gradient_accumulation_steps=1,
            max_steps=spec["steps"],
            learning_rate=spec["learning_rate"],
            max_grad_norm=spec["max_grad_norm"],
            optim=spec["optimizer"],
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            bf16=dtype == torch.bfloat16,
            use_cpu=not spec["cuda"],
            seed=spec["seed"],
        ),
    )


def child_stack(spec: dict) -> dict:
    """Train `spec['steps']` steps with one stack; step 2's peak memory, the later steps' tokens/s."""
    import torch
    from transformers import TrainerCallback

    from qlora_pipe.estimate import MeasurePeak

    cuda = spec["cuda"]

    class Clock(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

    start = time.perf_counter()
    if spec["stack"] == "ours":
        from qlora_pipe import train as stage
        from qlora_pipe.config import load_recipe

        trainer, _ = stage.build_trainer(load_recipe(spec["recipe"], spec["overrides"]))
    else:
        trainer = plain_trainer(spec)
    loaded = time.perf_counter() - start
    clock, peak = Clock(), MeasurePeak(lambda: trainer.optimizer, step=2)
    trainer.add_callback(clock)
    trainer.add_callback(peak)
    trainer.data_collator = counting = Counting(trainer.data_collator)
    trainer.train()
    timed = clock.times[2:]
    tokens = sum(counting.tokens[2 : len(clock.times)])
    net = trainer.model
    trainable = [p for p in net.parameters() if p.requires_grad]
    return {
        "load_seconds": round(loaded, 1),
        "step_seconds": [round(t, 4) for t in clock.times],
        "timed_tokens": tokens,
        "tokens_per_second": round(tokens / sum(timed), 1),
        "peak_step_bytes": peak.peak,
        "peak_step_gib": round(peak.peak / GIB, 3),
        "peak_memory_gib_whole_run": round(torch.cuda.max_memory_allocated() / GIB, 3) if cuda else None,
        "losses": [round(r["loss"], 4) for r in trainer.state.log_history if "loss" in r],
        "gradient_checkpointing": bool(net.is_activation_checkpointing),
        "embedding_dtype": str(net.get_input_embeddings().weight.dtype).removeprefix("torch."),
        "adapter_dtype": str(trainable[0].dtype).removeprefix("torch."),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "optimizer": str(trainer.args.optim.value if hasattr(trainer.args.optim, "value") else trainer.args.optim),
    }


# ------------------------------------------------------------------------------------------------ parts 2 and 3
def write_recipe(path: Path, base: Path, output_dir: Path, compute_dtype: str, **sections) -> Path:
    """A small recipe as the tests write theirs: the demo's chat data, a few steps."""
    from tiny_models import small_recipe

    train = {"report_to": "none", **sections.pop("train", {})}
    model = {"compute_dtype": compute_dtype}
    return small_recipe(path, base, output_dir=str(output_dir), model=model, train=train, **sections)


def cli(*argv: str) -> None:
    from qlora_pipe.cli import main

    status = main(list(argv))
    if status != 0:
        raise RuntimeError(f"`qlora-pipe {' '.join(argv)}` exited with status {status} (its message is above)")


def child_chain(spec: dict) -> dict:
    """Train → merge → export with the command line's functions, on a tiny Llama."""
    from tiny_models import build

    work, cuda = Path(spec["work"]), spec["cuda"]
    base = build(work / "tiny_llama", "llama", seed=0, num_layers=2, vocab_size=512)
    run = work / "run"
    recipe = write_recipe(
        work / "recipe.yaml", base, run, "auto" if cuda else "float32", train={"max_steps": spec["steps"]}
    )
    timings = {}
    for stage, argv in (
        ("train", ["train", str(recipe)]),
        ("merge", ["merge", str(run)]),
        ("export", ["export", str(run), "--format", "gguf", "--type", "f16"]),
    ):
        start = time.perf_counter()
        cli(*argv)
        timings[stage] = round(time.perf_counter() - start, 1)
    manifest = json.loads((run / "manifest.json").read_text())
    merge_report = json.loads((run / "merged" / "merge_report.json").read_text())
    export_report = json.loads((run / "gguf" / "export_report.json").read_text())
    name, gguf = next(iter(export_report.items()))
    metrics = manifest["metrics"]
    result = {
        "seconds": timings,
        "trained_on": manifest["quantization"]["device_kind"],
        "compute_dtype": manifest["quantization"]["compute_dtype"],
        "train_loss": [metrics.get("train_loss_first"), metrics.get("train_loss_last")],
        "eval_loss": [metrics.get("eval_loss_before"), metrics.get("eval_loss_after")],
        "merge": {
            "verify": merge_report["verify"],
            **{
                mode: pick(n, "relative_error", "top1_agreement", "max_relative_error")
                for mode, n in merge_report.get("modes", {}).items()
            },
        },
        "export": {
            "file": name,
            "bytes": gguf["bytes"],
            "passed": gguf.get("passed"),
            **pick(
                gguf.get("figures", {}), "relative_error", "top1_agreement", "positions", "max_tensor_relative_error"
            ),
        },
    }
    if cuda:  # bitsandbytes' CUDA and CPU quantizers are different kernels: does a CPU merge round the same?
        start = time.perf_counter()
        cli("merge", str(run), "--device", "cpu", "--out", str(work / "merged_cpu"))
        report = json.loads((work / "merged_cpu" / "merge_report.json").read_text())
        result["merge_quantized_on_cpu"] = {
            "seconds": round(time.perf_counter() - start, 1),
            **pick(report.get("modes", {}).get("dequantized", {}), "relative_error", "top1_agreement"),
            "vs_cuda_merge": compare_checkpoints(run / "merged", work / "merged_cpu"),
        }
    return result


def pick(d: dict, *keys: str) -> dict:
    return {k: d[k] for k in keys if k in d}


def compare_checkpoints(a: Path, b: Path) -> dict:
    """Tensor by tensor: how many of two checkpoints' tensors differ, and by how much at most."""
    from safetensors.torch import load_file

    first = {k: v for f in sorted(a.glob("*.safetensors")) for k, v in load_file(f).items()}
    second = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in load_file(f).items()}
    differing = [k for k in first if not first[k].equal(second[k])]
    worst = max(((first[k].float() - second[k].float()).abs().max().item() for k in differing), default=0.0)
    return {
        "tensors": len(first),
        "differing": len(differing),
        "max_abs_diff": worst,
        "first_differing": differing[:5],
    }


def child_offload(spec: dict) -> dict:
    """A few steps of a small model with or without activation offloading."""
    import measure_memory

    work = Path(spec["work"])
    base = measure_memory.build_base(work, OFFLOAD_SPEC)
    data = work / "rows.jsonl"
    if not data.exists():
        measure_memory.write_data(data, spec["seq"], 4 * spec["batch"], 1.0)
    out = work / f"offload_{spec['offload']}"
    recipe = write_recipe(
        work / f"recipe_{spec['offload']}.yaml",
        base,
        out,
        "bfloat16",
        data={"train": str(data), "eval": None, "eval_fraction": 0.0, "format": "text", "max_truncated": 1.0}
        | {"max_seq_length": spec["seq"]},
        train={"max_steps": 4, "batch_size": spec["batch"], "activation_offloading": spec["offload"]},
    )
    cli("train", str(recipe))
    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {
        "peak_step_gib": metrics["peak_step_memory_measured_gib"],
        "peak_step_predicted_gib": metrics["peak_step_memory_predicted_gib"],
        "peak_memory_gib": metrics["peak_memory_gib"],
        "tokens_per_second": metrics["tokens_per_second"],
        "losses": [r["loss"] for r in log if "loss" in r],
    }


def part_chain(ctx: dict) -> dict:
    work = ctx["work"] / "chain"
    work.mkdir(parents=True, exist_ok=True)
    steps = 3 if ctx["quick"] or not ctx["cuda"] else 10
    return run_child("chain", {"name": "chain", "work": str(work), "cuda": ctx["cuda"], "steps": steps}, ctx)


def part_offloading(ctx: dict) -> dict:
    work = ctx["work"] / "offloading"
    work.mkdir(parents=True, exist_ok=True)
    seq = 1024 if ctx["quick"] else 2048
    spec = {"work": str(work), "seq": seq, "batch": 2}
    runs = {o: run_child("offload", spec | {"name": f"offload_{o}", "offload": o}, ctx) for o in (False, True)}
    off, on = runs[False], runs[True]
    return {
        "model": OFFLOAD_SPEC | {"rows": f"2 × {seq} tokens"},
        "without": off,
        "with": on,
        "peak_step_saved_gib": round(off["peak_step_gib"] - on["peak_step_gib"], 3),
        "tokens_per_second_ratio": round(on["tokens_per_second"] / off["tokens_per_second"], 3),
        "losses_equal": on["losses"] == off["losses"],
    }


# ------------------------------------------------------------------------------------------------ parts 4 and 5
def child_diffusion(spec: dict) -> dict:
    """Two steps of a tiny Stable Diffusion pipeline with an NF4 UNet, then its merge."""
    from tiny_diffusion import build_sd, captioned_images, small_image_recipe

    work = Path(spec["work"])
    pipeline = build_sd(work / "sd")
    images = captioned_images(work / "shapes", count=8, size=40)
    run = work / "run"
    model = {"compute_dtype": "auto", "quantization": "nf4"}
    train = {"max_steps": 2, "max_grad_norm": 0.3, "report_to": "none"}  # 0.3: the recipe default
    small_image_recipe(work / "recipe.yaml", pipeline, images, model=model, train=train, output_dir=str(run))
    cli("train", str(work / "recipe.yaml"))
    cli("merge", str(run))
    manifest = json.loads((run / "manifest.json").read_text())
    report = json.loads((run / "merged" / "merge_report.json").read_text())
    metrics = manifest["metrics"]
    return {
        "compute_dtype": manifest["quantization"].get("compute_dtype"),
        "quantized_modules": len(manifest["quantization"].get("quantized_modules") or []),
        "steps": metrics.get("steps"),
        **pick(metrics, "denoise_loss_before", "denoise_loss_after", "images_per_second", "peak_memory_gib"),
        "merge_relative_error": {k: v.get("relative_error") for k, v in report.get("components", {}).items()},
    }


def part_diffusion(ctx: dict) -> dict:
    work = ctx["work"] / "diffusion"
    work.mkdir(parents=True, exist_ok=True)
    return run_child("diffusion", {"name": "diffusion", "work": str(work)}, ctx)


def part_gpu_tests(ctx: dict) -> dict:
    timeout = min(CAPS["gpu_tests"], ctx["deadline"] - time.monotonic())
    if timeout < 10:
        raise ChildFailed(f"not started: the time budget (--budget {ctx['budget']:.0f} s) is spent")
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    code, out, err = run_process(cmd, timeout, ctx["env"], ctx["logs"] / "gpu_tests.log")
    summary = (out.strip().splitlines() or [""])[-1]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)}
    result = {"command": "python -m pytest -m gpu -q", "summary": summary, "counts": counts, "exit_status": code}
    failures = [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))]
    if code is None or code not in (0, 5) or counts.get("failed") or counts.get("error") or counts.get("errors"):
        message = f"timed out after {timeout:.0f} s" if code is None else "\n".join(failures) or err[-2500:]
        raise PartFailed(result | {"failures": failures}, message)
    return result


RUNNERS = {
    "train_compare": part_train_compare,
    "chain": part_chain,
    "offloading": part_offloading,
    "diffusion_nf4": part_diffusion,
    "gpu_tests": part_gpu_tests,
}
CHILDREN = {
    "build": child_build,
    "stack": child_stack,
    "chain": child_chain,
    "offload": child_offload,
    "diffusion": child_diffusion,
}


# ------------------------------------------------------------------------------------------------ the report
def run_part(name: str, ctx: dict) -> dict:
    if name in CUDA_ONLY and not ctx["cuda"]:
        return {"status": "skipped: no CUDA device" + (" (--cpu)" if ctx["forced_cpu"] else "")}
    missing = missing_modules(["torch", *NEEDS[name]])
    if missing:
        return {"status": "failed", "missing": missing, "error": "; ".join(f"{m}: {install_hint(m)}" for m in missing)}
    start = time.monotonic()
    try:
        entry = {"status": "passed", **RUNNERS[name](ctx)}
    except PartFailed as e:
        entry = {"status": "failed", **e.partial, "error": error_text(e)}
    except Exception as e:  # any failure of one part is reported, and the next part runs
        entry = {"status": "failed", "error": error_text(e)}
    return entry | {"seconds": round(time.monotonic() - start, 1)}


def figures(name: str, entry: dict) -> str:
    """One line of the key figures of a part, for the printed table."""
    if "error" in entry:
        return entry["error"].splitlines()[0][:110]
    if name == "train_compare":
        ours, plain, ratio = entry["ours"], entry["plain"], entry["ratios_ours_over_plain"]
        return (
            f"L{entry['shape']['num_hidden_layers']}: ours {ours['tokens_per_second']:.0f} tok/s "
            f"{ours['peak_step_gib']:.2f} GiB, plain {plain['tokens_per_second']:.0f} tok/s "
            f"{plain['peak_step_gib']:.2f} GiB; ours/plain {ratio['tokens_per_second']:.2f}x tok/s, "
            f"{ratio['peak_step_memory']:.2f}x memory"
        )
    if name == "chain":
        merge, export = entry["merge"].get("dequantized", {}), entry["export"]
        return (
            f"merge rel. error {merge.get('relative_error', merge.get('max_relative_error', float('nan'))):.2e}, "
            f"GGUF f16 read-back rel. error "
            f"{export.get('relative_error', export.get('max_tensor_relative_error', float('nan'))):.2e}, "
            f"top-1 {export.get('top1_agreement', float('nan')):.3f}"
        )
    if name == "offloading":
        return (
            f"peak step {entry['without']['peak_step_gib']:.3f} → {entry['with']['peak_step_gib']:.3f} GiB, "
            f"tokens/s {entry['tokens_per_second_ratio']:.2f}x, losses equal: {entry['losses_equal']}"
        )
    if name == "diffusion_nf4":
        return (
            f"{entry['quantized_modules']} NF4 modules, loss {entry.get('denoise_loss_before', 0):.3f} → "
            f"{entry.get('denoise_loss_after', 0):.3f}, merged UNet rel. error "
            f"{entry['merge_relative_error'].get('unet', float('nan')):.2e}"
        )
    if name == "gpu_tests":
        return entry["summary"][:110]
    return ""


def print_table(report: dict) -> None:
    print(f"\ngpu_check on {report['device'].get('name', 'the CPU')} ({report['total_seconds']:.0f} s)")
    for name, entry in report["parts"].items():
        status = entry["status"]
        seconds = f"{entry['seconds']:.0f} s" if "seconds" in entry else ""
        print(
            f"  {name:<14} {status:<34} {seconds:>6}  {'' if status.startswith('skipped') else figures(name, entry)}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON report")
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer steps")
    parser.add_argument("--cpu", action="store_true", help="run the CPU-safe parts only, as without a GPU")
    parser.add_argument("--layers", type=int, help="part 1: layers of Llama-3.1-8B's 32 (default 8 on CUDA)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--budget", type=float, default=470, help="seconds for the whole run")
    parser.add_argument("--workdir", type=Path, help="where models and runs go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, runs)")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        print("RESULT " + json.dumps(CHILDREN[args.child](json.loads(args.spec))), flush=True)
        return 0
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")

    start = time.monotonic()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    try:
        import torch

        cuda = torch.cuda.is_available() and not args.cpu
        device = device_facts(cuda)
    except ImportError as e:
        cuda, device = False, {"error": error_text(e)}
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    remove = args.workdir is None and not args.keep
    (work / "logs").mkdir(parents=True, exist_ok=True)
    ctx = {
        "cuda": cuda,
        "forced_cpu": args.cpu,
        "quick": args.quick,
        "layers": args.layers,
        "work": work,
        "logs": work / "logs",
        "env": env,
        "budget": args.budget,
        "deadline": start + args.budget,
    }
    report = {
        "command": " ".join(["python tools/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "device": device,
        "packages": package_versions(),
        "work_dir": None if remove else str(work),
        "parts": {},
    }
    wanted = args.parts.split(",")
    for name in PARTS:
        if name not in wanted:
            report["parts"][name] = {"status": "skipped: not in --parts"}
            continue
        print(f"gpu_check: {name} ...", flush=True)
        report["parts"][name] = run_part(name, ctx)
        report["total_seconds"] = round(time.monotonic() - start, 1)
        args.out.write_text(json.dumps(report, indent=2) + "\n")  # a part that hangs the machine leaves the others
    report["total_seconds"] = round(time.monotonic() - start, 1)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"report: {args.out}" + ("" if remove else f"; logs and runs in {work}"))
    if remove:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(e["status"] == "failed" for e in report["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
