"""User errors: exit status 2, one clear message naming the key or file, no traceback, nothing written."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from qlora_pipe import cli
from qlora_pipe.config import Recipe, field_docs


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qlora_pipe.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr


def test_bad_recipe_exits_2_with_all_problems(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {base: a/b, quantisation: nf4}\nlora: {r: -1}\ndata: {train: d.jsonl}\n")
    assert_user_error(
        run_cli("train", str(recipe)),
        "model.quantisation: unknown key; did you mean `model.quantization`?",
        "lora.r: must be a positive integer, got -1",
    )


def test_missing_base_dir_exits_2(write_recipe, tmp_path):
    result = run_cli("train", str(write_recipe(tmp_path / "no_such_model")))
    assert_user_error(result, "model.base: directory not found", "no_such_model")
    assert not (tmp_path / "run").exists()


def test_missing_data_file_exits_2(write_recipe, tiny_model, tmp_path):
    result = run_cli("train", str(write_recipe(tiny_model("llama"), data={"train": str(tmp_path / "gone.jsonl")})))
    assert_user_error(result, "data file not found", "gone.jsonl")
    assert not (tmp_path / "run").exists()


def test_adapter_dir_given_as_base_exits_2(write_recipe, tmp_path):
    fake_adapter = tmp_path / "adapter"
    fake_adapter.mkdir()
    (fake_adapter / "adapter_config.json").write_text("{}")
    assert_user_error(run_cli("train", str(write_recipe(fake_adapter))), "is a LoRA adapter, not a base model")


def test_missing_recipe_and_non_run_dirs_exit_2(tmp_path):
    assert_user_error(run_cli("train", str(tmp_path / "nope.yaml")), "recipe file not found")
    assert_user_error(run_cli("merge", str(tmp_path)), "no manifest.json")
    assert_user_error(run_cli("generate", str(tmp_path), "--prompt", "hi"), "not a merged model")


def test_print_config_shows_the_resolved_recipe(write_recipe, tmp_path, capsys):
    assert cli.main(["train", str(write_recipe(tmp_path / "m")), "lora.r=4", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "r: 4" in out and "target_modules: all-linear" in out


def test_every_recipe_field_is_documented_in_help():
    text = cli.recipe_help()
    for section in dataclasses.fields(Recipe):
        assert f"  {section.name}:" in text
        if dataclasses.is_dataclass(section.type) or section.default_factory is not dataclasses.MISSING:
            for name, doc in field_docs(section.default_factory).items():
                assert f"    {name} (default " in text and doc, name


@pytest.mark.parametrize(
    "command", ["train", "check-data", "eval", "loftq", "merge", "generate", "chat", "report", "estimate"]
)
def test_each_command_has_help(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0 and "usage: qlora-pipe" in result.stdout


def test_a_single_problem_is_one_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {base: a/b}\nlora: {r: 0}\ndata: {train: d.jsonl}\n")
    result = run_cli("train", str(recipe))
    assert_user_error(result, "lora.r: must be a positive integer, got 0")
    assert len(result.stderr.strip().splitlines()) == 1


def test_check_data_passes_good_data_and_train_refuses_what_it_flags(write_recipe, tiny_model, tmp_path, capsys):
    recipe = write_recipe(tiny_model("llama"))
    assert cli.main(["check-data", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "train: 480 examples" in out and "⟦" in out and "data check passed" in out
    assert cli.main(["check-data", str(recipe), "data.max_seq_length=16"]) == 2
    assert "lose trained tokens to data.max_seq_length=16" in capsys.readouterr().err
    assert_user_error(
        run_cli("train", str(recipe), "data.max_seq_length=16"),
        "the data check failed",
        "lose trained tokens to data.max_seq_length=16",
    )
    assert not (tmp_path / "run").exists()


def test_output_to_a_log_has_no_progress_bars_or_library_notices(write_recipe, tiny_model):
    """stderr is a file here, not a terminal: one line per stage, no bars redrawn with \\r, no library warnings."""
    for argv in (
        ["check-data", str(write_recipe(tiny_model("llama")))],
        ["generate", str(tiny_model("llama")), "--prompt", "hi", "--max-new-tokens", "2"],
    ):
        result = run_cli(*argv)
        assert result.returncode == 0, result.stderr
        assert "\r" not in result.stderr and "it/s]" not in result.stderr, result.stderr
        assert "Warning" not in result.stderr, result.stderr
