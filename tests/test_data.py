"""Data: each format reaches TRL in the right shape; the loss covers exactly assistant/completion tokens and eos.

The rows are read as `train` hands them to TRL (data.prepare_data: the tokenized, masked splits of the data check),
without loading a model."""

from __future__ import annotations

import json

import pytest
from conftest import CHAT, write_jsonl

from qlora_pipe import UserError, cli
from qlora_pipe.config import load_recipe
from qlora_pipe.data import prepare_data


def tokenized(recipe) -> tuple:
    """(training rows as TRL receives them, the manifest's data facts, tokenizer)."""
    tokenizer, data, checked = prepare_data(recipe, recipe.model.base)
    return checked.tokenized["train"], {"data": data.facts()}, tokenizer


def prepared(write_recipe, tiny_model, tmp_path, rows: list[dict], fmt: str = "auto"):
    """The first example as TRL will train on it: (input text, trained text, tokenizer)."""
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    data = {"train": str(data), "eval": None, "format": fmt, "eval_fraction": 0.0}
    recipe = load_recipe(write_recipe(tiny_model("llama"), data=data))
    rows, facts, tok = tokenized(recipe)
    example = rows[0]
    trained = [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != -100]
    return tok.decode(example["input_ids"]), tok.decode(trained), tok, facts


def test_messages_train_only_assistant_turns_and_eos(write_recipe, tiny_model, tmp_path):
    text, trained, tok, facts = prepared(write_recipe, tiny_model, tmp_path, [{"messages": CHAT}] * 4)
    assert facts["data"]["format"] == "messages" and facts["data"]["assistant_only_loss"]
    assert text == tok.apply_chat_template(CHAT, tokenize=False)
    assert trained == f"yes{tok.eos_token}no{tok.eos_token}"


def test_prompt_completion_trains_completion_and_eos(write_recipe, tiny_model, tmp_path):
    rows = [{"prompt": "Capital of France?", "completion": " Paris"}] * 4
    text, trained, tok, facts = prepared(write_recipe, tiny_model, tmp_path, rows)
    assert facts["data"]["format"] == "prompt-completion"
    assert text == f"Capital of France? Paris{tok.eos_token}"
    assert trained == f" Paris{tok.eos_token}"


def test_alpaca_becomes_a_chat_turn_and_trains_the_output(write_recipe, tiny_model, tmp_path):
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}] * 4
    text, trained, tok, facts = prepared(write_recipe, tiny_model, tmp_path, rows)
    assert facts["data"]["format"] == "alpaca"
    assert "Add the numbers.\n\n2 and 3" in text
    assert trained.startswith("5" + tok.eos_token)


def test_text_trains_every_token_and_appends_eos(write_recipe, tiny_model, tmp_path):
    text, trained, tok, facts = prepared(write_recipe, tiny_model, tmp_path, [{"text": "just some words"}] * 4)
    assert facts["data"]["format"] == "text"
    assert text == f"just some words{tok.eos_token}"
    assert trained == text


def test_missing_columns_name_the_format_and_file(write_recipe, tiny_model, tmp_path):
    with pytest.raises(UserError, match=r"data.format is 'alpaca' but column\(s\) instruction, output are missing"):
        prepared(write_recipe, tiny_model, tmp_path, [{"text": "x"}], fmt="alpaca")
    with pytest.raises(UserError, match="cannot tell the data format from columns question, answer"):
        prepared(write_recipe, tiny_model, tmp_path, [{"question": "x", "answer": "y"}])


def test_broken_json_line_is_reported_with_file_and_line(write_recipe, tiny_model, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "ok"}\n{"text": broken}\n')
    recipe = load_recipe(write_recipe(tiny_model("llama"), data={"train": str(data), "eval": None}))
    with pytest.raises(UserError, match=rf"{data}:2: not valid JSON"):
        tokenized(recipe)


def test_empty_data_file_is_refused(write_recipe, tiny_model, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("")
    recipe = load_recipe(write_recipe(tiny_model("llama"), data={"train": str(data), "eval": None}))
    with pytest.raises(UserError, match="contains no examples"):
        tokenized(recipe)


def test_sharegpt_becomes_messages(write_recipe, tiny_model, tmp_path):
    rows = [
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Say yes."},
                {"from": "gpt", "value": "yes"},
            ]
        }
    ] * 4
    text, trained, tok, facts = prepared(write_recipe, tiny_model, tmp_path, rows)
    assert facts["data"]["format"] == "sharegpt" and facts["data"]["assistant_only_loss"]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say yes."},
        {"role": "assistant", "content": "yes"},
    ]
    assert text == tok.apply_chat_template(messages, tokenize=False)
    assert trained == f"yes{tok.eos_token}"


def test_column_mapping_and_directories(write_recipe, tiny_model, tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"question": "Capital of France?", "answer": " Paris"}] * 2)
    write_jsonl(folder / "b.jsonl", [{"question": "Capital of Italy?", "answer": " Rome"}] * 2)
    data = {
        "train": str(folder),
        "eval": None,
        "eval_fraction": 0.0,
        "columns": {"prompt": "question", "completion": "answer"},
    }
    rows, facts, _ = tokenized(load_recipe(write_recipe(tiny_model("llama"), data=data)))
    examples = len(rows)
    assert facts["data"]["format"] == "prompt-completion" and examples == 4
    assert len(facts["data"]["train"]["sha256"]) == 2


def test_column_mapping_names_a_missing_column(write_recipe, tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"q": "x", "a": "y"}])
    recipe = load_recipe(
        write_recipe(tiny_model("llama"), data={"train": str(data), "eval": None, "columns": {"prompt": "question"}})
    )
    with pytest.raises(UserError, match=r"data.columns: .* has no column 'question'"):
        tokenized(recipe)


def test_the_held_out_split_keeps_every_copy_of_an_example_on_one_side(write_recipe, tiny_model, tmp_path, capsys):
    # 200 rows with 2 duplicates and no data.eval: the tool's own split must not leak (datasets' row split would put
    # a copy on each side and then refuse the data as leaked)
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(198)]
    rows += [rows[3], rows[150]]
    data = {"train": str(write_jsonl(tmp_path / "d.jsonl", rows)), "eval": None, "eval_fraction": 0.1}
    recipe = load_recipe(write_recipe(tiny_model("llama"), data=data))
    for seed in range(5):
        recipe.train.seed = seed
        _, prepared_data, checked = prepare_data(recipe, recipe.model.base)
        train = {json.dumps(r, sort_keys=True) for r in prepared_data.train}
        held_out = [json.dumps(r, sort_keys=True) for r in prepared_data.eval]
        assert not train & set(held_out) and len(train) + len(set(held_out)) == 198
        assert len(prepared_data.train) + len(held_out) == 200 and len(set(held_out)) == 20
        assert prepared_data.sources["eval"]["duplicates"] == 2 and checked.report["eval"]["also_in_train"] == 0
        assert not checked.fatal
    assert cli.main(["check-data", str(write_recipe(tiny_model("llama"), data=data))]) == 0
    assert "held out of data.train by content, every copy of an example on one side (2 duplicate rows" in (
        capsys.readouterr().out
    )


def test_an_eval_file_that_repeats_training_examples_is_refused_with_what_to_do(write_recipe, tiny_model, tmp_path):
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(40)]
    data = {
        "train": str(write_jsonl(tmp_path / "t.jsonl", rows)),
        "eval": str(write_jsonl(tmp_path / "e.jsonl", rows[:5] + [{"prompt": "new", "completion": "one"}])),
    }
    recipe = load_recipe(write_recipe(tiny_model("llama"), data=data))
    (message,) = prepare_data(recipe, recipe.model.base)[2].fatal
    assert "eval: 5 of 6 examples" in message and "remove those examples from data.eval" in message
    assert "leave data.eval out" in message and "split by content" in message
