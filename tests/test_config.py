"""Recipes: every problem reported together, each naming its key and the fix; overrides apply."""

from __future__ import annotations

import pytest

from qlora_pipe import UserError
from qlora_pipe.config import load_recipe


def recipe_file(tmp_path, text: str):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_valid_recipe_loads_with_defaults(tmp_path):
    recipe = load_recipe(recipe_file(tmp_path, "model: {base: some/model}\ndata: {train: d.jsonl}\n"))
    assert recipe.lora.target_modules == "all-linear"
    assert recipe.model.quantization == "nf4"
    assert recipe.train.gradient_checkpointing is True
    assert recipe.output_dir == "runs/r"


def test_all_problems_are_reported_together_with_keys_and_fixes(tmp_path):
    path = recipe_file(
        tmp_path,
        """
model: {bse: x}
lora: {r: 0, alpha: big, dropout: 1.5}
data: {train: d.jsonl, max_seq_length: 0, fromat: text}
train: {batch_size: 2.5, learning_rate: -1}
""",
    )
    with pytest.raises(UserError) as err:
        load_recipe(path)
    message = str(err.value)
    for expected in [
        "model.bse: unknown key; did you mean `model.base`?",
        "data.fromat: unknown key; did you mean `data.format`?",
        "lora.r: must be a positive integer, got 0",
        "lora.alpha: expected a number, got 'big'",
        "lora.dropout: must be in [0, 1)",
        "data.max_seq_length: must be a positive integer",
        "train.batch_size: expected an integer, got 2.5",
        "train.learning_rate: must be positive",
        "model.base: is required",
    ]:
        assert expected in message


def test_choices_are_listed_for_literal_fields(tmp_path):
    with pytest.raises(UserError, match=r"model.quantization: expected one of 'nf4', 'none', got 'int8'"):
        load_recipe(recipe_file(tmp_path, "model: {base: a/b, quantization: int8}\ndata: {train: d.jsonl}\n"))


def test_loftq_needs_nf4_and_positive_iterations(tmp_path):
    text = "model: {base: a/b, quantization: none}\nlora: {init: loftq, loftq_iters: 0}\ndata: {train: d.jsonl}\n"
    with pytest.raises(UserError) as err:
        load_recipe(recipe_file(tmp_path, text))
    assert "lora.init: loftq fits the adapter to the NF4 quantization error" in str(err.value)
    assert "lora.loftq_iters: must be a positive integer, got 0" in str(err.value)


def test_overrides_apply_with_yaml_types(tmp_path):
    path = recipe_file(tmp_path, "model: {base: a/b}\ndata: {train: d.jsonl}\n")
    recipe = load_recipe(
        path,
        [
            "lora.r=8",
            "train.learning_rate=1e-4",
            "lora.target_modules=[q_proj, v_proj]",
            "lora.alpha=1e1",
            "train.eval_steps=5",
            "output_dir=elsewhere",
        ],
    )
    assert recipe.lora.r == 8
    assert recipe.train.learning_rate == 1e-4
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.train.eval_steps == 5
    assert recipe.lora.alpha == 10.0
    assert recipe.output_dir == "elsewhere"


def test_override_of_unknown_key_is_an_error(tmp_path):
    path = recipe_file(tmp_path, "model: {base: a/b}\ndata: {train: d.jsonl}\n")
    with pytest.raises(UserError, match=r"lora.rank: unknown key; did you mean `lora.r`\?"):
        load_recipe(path, ["lora.rank=8"])
    with pytest.raises(UserError, match="not of the form key.sub=value"):
        load_recipe(path, ["lora.r"])


def test_malformed_yaml_names_the_line(tmp_path):
    with pytest.raises(UserError, match=r"not valid YAML at line 2"):
        load_recipe(recipe_file(tmp_path, "model:\n  base: a: b\n"))


def test_unknown_section_suggests_the_closest(tmp_path):
    with pytest.raises(UserError, match=r"trian: unknown key; did you mean `train`\?"):
        load_recipe(recipe_file(tmp_path, "model: {base: a/b}\ndata: {train: d.jsonl}\ntrian: {seed: 1}\n"))
