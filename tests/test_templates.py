"""Chat templates, eos and pad per model family, and the data check: every assistant turn (and only those) is trained,
each ends with the eos the model will stop on, and check-data flags the silent failures."""

from __future__ import annotations

import shutil

import pytest
from conftest import CHAT, write_jsonl

from qlora_pipe.config import load_recipe
from qlora_pipe.data import TRAINED_CLOSE, TRAINED_OPEN, prepare_data

SHAREGPT = [
    {"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]} for m in CHAT
]

# family facts dir, built-in template, eos the turns end with, expected pad, text of one trained assistant turn
FAMILIES = {
    "llama-2": ("recipes/llama-2-7b", "llama-2", "</s>", "<unk>", " {}</s>"),
    "mistral": ("recipes/mistral-7b", "mistral", "</s>", "<unk>", " {}</s>"),
    "llama-3": ("recipes/llama-3.1-8b", "llama-3", "<|eot_id|>", "<|finetune_right_pad_id|>", "{}<|eot_id|>"),
    "chatml": ("recipes/qwen2.5-7b", "chatml", "<|im_end|>", "<|endoftext|>", "{}<|im_end|>"),
}


def checked(tmp_path, write_recipe, base, rows, **data):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    recipe = load_recipe(write_recipe(base, data={"train": str(path), "eval": None, "eval_fraction": 0.0, **data}))
    return prepare_data(recipe, str(base))


def trained_spans(tokenizer, example) -> list[str]:
    ids, labels = example["input_ids"], example["labels"]
    spans, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != -100:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    return spans + ([tokenizer.decode(current)] if current else [])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", ["messages", "sharegpt"])
def test_builtin_template_trains_every_assistant_turn_and_its_eos(family, fmt, tiny_like, write_recipe, tmp_path):
    facts, template, eos, pad, turn = FAMILIES[family]
    row = {"messages": CHAT} if fmt == "messages" else {"conversations": SHAREGPT}
    tok, prepared, result = checked(tmp_path, write_recipe, tiny_like(facts), [row] * 3, chat_template=template)
    assert not result.fatal
    assert tok.eos_token == eos and tok.pad_token == pad and tok.pad_token != tok.eos_token
    example = result.tokenized["train"][0]
    assert trained_spans(tok, example) == [turn.format("yes"), turn.format("no")]
    text = tok.decode(example["input_ids"])
    assert text == tok.apply_chat_template(CHAT, tokenize=False)
    assert "Be brief." in text and text.count("Say") == 2
    report = result.report["train"]
    assert report["eos_not_trained"] == 0 and report["empty_loss_mask"] == 0
    assert f"{TRAINED_OPEN}{turn.format('yes')}{TRAINED_CLOSE}" in report["example"]


@pytest.mark.parametrize("family", FAMILIES)
def test_alpaca_on_a_builtin_template_trains_the_output(family, tiny_like, write_recipe, tmp_path):
    facts, template, _, _, turn = FAMILIES[family]
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}] * 3
    tok, _, result = checked(tmp_path, write_recipe, tiny_like(facts), rows, chat_template=template)
    assert not result.fatal
    example = result.tokenized["train"][0]
    assert trained_spans(tok, example) == [turn.format("5")]
    assert "Add the numbers.\n\n2 and 3" in tok.decode(example["input_ids"])


def test_plain_text_and_prompt_completion_end_with_a_trained_eos(tiny_like, write_recipe, tmp_path):
    base = tiny_like("recipes/llama-2-7b")  # prepends bos to plain text, like the real tokenizer
    tok, _, result = checked(tmp_path, write_recipe, base, [{"prompt": "2+3=", "completion": " 5"}] * 3)
    example = result.tokenized["train"][0]
    assert example["input_ids"][0] == tok.bos_token_id and trained_spans(tok, example) == [" 5</s>"]
    tok, _, result = checked(tmp_path, write_recipe, base, [{"text": "some words"}] * 3)
    assert trained_spans(tok, result.tokenized["train"][0])[-1].endswith("</s>") and not result.fatal


def test_gpt2_pads_with_eos_and_still_trains_it(tiny_like, write_recipe, tmp_path):
    tok, _, result = checked(tmp_path, write_recipe, tiny_like("recipes/seeds/gpt2"), [{"text": "a b c"}] * 3)
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"  # GPT-2 has no other special token
    assert result.report["train"]["eos_not_trained"] == 0 and not result.fatal


def test_a_template_that_ends_turns_with_its_own_token_makes_it_the_eos(tiny_like, write_recipe, tmp_path):
    # Qwen2.5 base: its own template ends turns with <|im_end|>, but its eos is <|endoftext|>: the token the model
    # must learn to stop on becomes the eos, as with the built-in templates.
    tok, prepared, result = checked(tmp_path, write_recipe, tiny_like("recipes/qwen2.5-7b"), [{"messages": CHAT}] * 3)
    assert prepared.assistant_only_loss and prepared.mask_method == "template prefixes"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert trained_spans(tok, result.tokenized["train"][0]) == ["yes<|im_end|>", "no<|im_end|>"]
    assert result.report["train"]["eos_not_trained"] == 0 and not result.fatal


def test_template_whose_turns_end_without_a_token_is_fatal(tiny_model, write_recipe, tmp_path):
    base = shutil.copytree(tiny_model("llama"), tmp_path / "base")
    template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    (base / "chat_template.jinja").write_text(template)
    tok, prepared, result = checked(tmp_path, write_recipe, base, [{"messages": CHAT}] * 3)
    assert prepared.mask_method == "template prefixes"
    assert trained_spans(tok, result.tokenized["train"][0]) == ["yes", "no"]
    assert result.report["train"]["eos_not_trained"] == 3
    assert any("not with the eos token" in p and "data.chat_template" in p for p in result.fatal)


def test_builtin_template_missing_its_tokens_is_a_user_error(tiny_like, write_recipe, tmp_path):
    from qlora_pipe import UserError

    with pytest.raises(UserError, match="chatml needs the token"):
        checked(tmp_path, write_recipe, tiny_like("recipes/llama-2-7b"), [{"messages": CHAT}], chat_template="chatml")


def test_check_flags_empty_masks_and_truncation(tiny_model, write_recipe, tmp_path):
    rows = [{"messages": CHAT}] * 3 + [{"messages": [{"role": "user", "content": "hello"}]}]
    _, _, result = checked(tmp_path, write_recipe, tiny_model("llama"), rows)
    assert result.report["train"]["empty_loss_mask"] == 1 and result.report["train"]["first_rows"][
        "empty_loss_mask"
    ] == [3]
    assert any("1 of 4 examples have no trained token (rows [3])" in p for p in result.fatal)

    _, _, result = checked(tmp_path, write_recipe, tiny_model("llama"), [{"messages": CHAT}] * 4, max_seq_length=12)
    assert result.report["train"]["trained_tokens_cut"] == 4
    assert any("lose trained tokens to data.max_seq_length=12" in p for p in result.fatal)
    _, _, result = checked(
        tmp_path, write_recipe, tiny_model("llama"), [{"messages": CHAT}] * 4, max_seq_length=12, max_truncated=1.0
    )
    assert not result.fatal
