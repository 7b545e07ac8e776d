"""`make demo`: the whole chain on this CPU with a tiny local model — build it, check the data, train, merge,
evaluate, generate, export to GGUF, summarise.

Runs the same commands a user types (`qlora-pipe check-data/train/merge/eval/generate/export`), in one process.
"""

from __future__ import annotations

import json
import shutil
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
PROMPT = "Classify the sentiment of this review as positive or negative.\nReview: The soup was wonderful and superb."


def run(*argv: str) -> None:
    print(f"\n$ qlora-pipe {' '.join(argv)}", flush=True)
    if main(list(argv)) != 0:
        sys.exit(f"demo stopped: `qlora-pipe {' '.join(argv)}` failed")


def main_demo() -> None:
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


if __name__ == "__main__":
    main_demo()
