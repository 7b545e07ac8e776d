"""Property: damaged recipes and data files, run through the CLI in-process, never end in a traceback. Each is either
refused (exit 2, one message, nothing written) or accepted: it reaches the point where the model would be loaded.

The default suite draws 300 cases; the `slow` run draws 2,000 (docs/messy_inputs.md has its result)."""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_pipe import cli, loftq, train

ROWS = {
    "messages": lambda i: {
        "messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"answer {i}"}]
    },
    "sharegpt": lambda i: {"conversations": [{"from": "human", "value": f"Q{i}"}, {"from": "gpt", "value": f"A{i}"}]},
    "prompt-completion": lambda i: {"prompt": f"Question {i}?", "completion": f" answer {i}"},
    "alpaca": lambda i: {"instruction": f"Do {i}.", "input": "", "output": f"done {i}"},
    "text": lambda i: {"text": f"Some text number {i}."},
}
JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
RECIPE_KEYS = [
    "model.base",
    "model.compute_dtype",
    "model.quantization",
    "lora.r",
    "lora.alpha",
    "lora.dropout",
    "lora.target_modules",
    "lora.init",
    "lora.use_rslora",
    "data.train",
    "data.eval",
    "data.format",
    "data.columns",
    "data.chat_template",
    "data.max_seq_length",
    "data.eval_fraction",
    "data.max_truncated",
    "data.max_empty_replies",
    "data.skip_invalid_rows",
    "train.seed",
    "train.learning_rate",
    "train.epochs",
    "train.max_steps",
    "train.batch_size",
    "train.warmup_ratio",
    "train.packing",
    "train.loss_chunk_tokens",
    "train.eval_steps",
    "train.optimizer",
    "train.report_to",
    "train.activation_offloading",
    "task",
    "output_dir",
    "unknown_section",
]
SPECIAL = st.sampled_from([".nan", ".inf", -1, 0, 10**12, "a/módel", "x" * 300, "nan", "", [], {}, "./", "1e-4"])


class Accepted(Exception):
    """The input passed every check: the model would be loaded now."""


@st.composite
def damaged_data(draw) -> tuple[bytes, str]:
    fmt = draw(st.sampled_from(sorted(ROWS)))
    rows = [ROWS[fmt](i) for i in range(8)]
    lines = [json.dumps(row).encode() for row in rows]
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        how = draw(st.sampled_from(["set", "drop", "other format", "garbage", "not utf-8", "not an object", "empty"]))
        row = rows[i]
        if how in ("set", "drop") and not row:
            how = "other format"
        if how == "set":
            key = draw(st.sampled_from(sorted(row)))
            turns = row[key] if isinstance(row[key], list) else []
            turn = turns[draw(st.integers(0, len(turns) - 1))] if turns else None
            if isinstance(turn, dict) and turn and draw(st.booleans()):
                turn[draw(st.sampled_from(sorted(turn)))] = draw(JUNK)
            else:
                row[key] = draw(JUNK)
        elif how == "drop":
            row.pop(draw(st.sampled_from(sorted(row))))
        elif how == "other format":
            rows[i] = ROWS[draw(st.sampled_from(sorted(ROWS)))](i)
        elif how == "empty":
            rows[i] = (
                {"prompt": "Q", "completion": "   "}
                if fmt != "messages"
                else {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ""}]}
            )
        lines[i] = {
            "garbage": draw(st.binary(max_size=12)).replace(b"\n", b""),
            "not utf-8": b'{"text": "\xff\xfe"}',
            "not an object": json.dumps(draw(JUNK)).encode(),
        }.get(how, json.dumps(rows[i]).encode())
    separator = b"\r\n" if draw(st.booleans()) else b"\n"
    text = separator.join(lines) + separator
    if draw(st.booleans()):
        text = b"\xef\xbb\xbf" + text
    return text, fmt


@st.composite
def damaged_recipe(draw, data: Path, base: Path, out: Path) -> str:
    recipe = {
        "model": {"base": str(base), "compute_dtype": "float32"},
        "lora": {"r": 8, "alpha": 16},
        "data": {"train": str(data), "max_seq_length": 64, "eval_fraction": 0.25},
        "train": {"max_steps": 2, "batch_size": 2},
        "output_dir": str(out),
    }
    for _ in range(draw(st.integers(0, 2))):
        *sections, leaf = draw(st.sampled_from(RECIPE_KEYS)).split(".")
        node = recipe
        for section in sections:
            node = node.setdefault(section, {})
        if draw(st.booleans()):
            node[leaf] = draw(JUNK | SPECIAL)
        else:
            node.pop(leaf, None)
    text = yaml.safe_dump(recipe, allow_unicode=True)
    if draw(st.integers(0, 19)) == 7:  # a file that is hardly YAML (hypothesis favours the ends of a range)
        text = draw(st.text(max_size=40))
    return text


def run_damaged(data, tiny_model) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text, _ = data.draw(damaged_data())
        (tmp / "data.jsonl").write_bytes(text)
        out = tmp / "run"
        (tmp / "recipe.yaml").write_text(data.draw(damaged_recipe(tmp / "data.jsonl", tiny_model("llama"), out)))
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                status = cli.main(["train", str(tmp / "recipe.yaml")])
        except Accepted:
            return
        assert status == 2, err.getvalue()
        assert len([line for line in err.getvalue().splitlines() if "error:" in line]) == 1, err.getvalue()
        assert not out.exists(), "a refused input wrote its output directory"


@pytest.fixture
def accept_before_loading(monkeypatch):
    """Stop where the model (or the LoftQ stage) would be loaded: everything before it is validation."""

    def accept(*args, **kwargs):
        raise Accepted

    monkeypatch.setattr(train, "adapted_model", accept)
    monkeypatch.setattr(loftq, "loftq_outputs", accept)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_inputs_are_refused_or_accepted_never_a_traceback(data, tiny_model, accept_before_loading):
    run_damaged(data, tiny_model)


@pytest.mark.slow
@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_inputs_2000_cases(data, tiny_model, accept_before_loading):
    run_damaged(data, tiny_model)
