"""Every case of tests/bad_inputs/cases.yaml: exit status 2, one message naming the key/file/line and the fix, no
traceback, and nothing written or changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DEMO_DATA, ROOT

from qlora_pipe import cli
from qlora_pipe.config import load_recipe
from qlora_pipe.train import train

CASES = yaml.safe_load((ROOT / "tests" / "bad_inputs" / "cases.yaml").read_text())
GOOD = {
    "model": {"base": "{tiny}", "compute_dtype": "float32"},
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
    "data": {"train": "{data}/train.jsonl", "eval": "{data}/eval.jsonl", "max_seq_length": 96},
    "train": {"max_steps": 2, "batch_size": 4, "grad_accumulation": 1, "logging_steps": 1, "save_steps": 100},
    "output_dir": "{tmp}/run",
}


@pytest.fixture(scope="session")
def finished_run(tiny_model, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("finished")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(fill(GOOD, {"tiny": tiny_model("llama"), "data": DEMO_DATA, "tmp": tmp})))
    return train(load_recipe(recipe))


def fill(value, ctx: dict):
    if isinstance(value, dict):
        return {k: fill(v, ctx) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, ctx) for v in value]
    return value.format(**ctx) if isinstance(value, str) else value


def merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def prepare(setup: str | None, tmp: Path, tiny: Path, finished_run: Path) -> None:
    base = tmp / "base"
    if setup in ("no_config_base", "weightless_base", "pickle_base", "adapter_as_base"):
        base.mkdir()
    if setup == "no_config_base":
        shutil.copy(tiny / "model.safetensors", base)
    elif setup == "weightless_base":
        shutil.copy(tiny / "config.json", base)
    elif setup == "pickle_base":
        shutil.copy(tiny / "config.json", base)
        torch.save({"w": torch.zeros(1)}, base / "pytorch_model.bin")
    elif setup == "adapter_as_base":
        (base / "adapter_config.json").write_text("{}")
    elif setup == "latin1_data":  # a spreadsheet export saved in Latin-1: the second row is not UTF-8
        (tmp / "d.jsonl").write_bytes('{"text": "a"}\n{"text": "café"}\n'.encode("latin-1"))
    elif setup in ("run", "changed_base_run"):
        shutil.copytree(finished_run, tmp / "run_copy")
    if setup == "changed_base_run":  # the run's base, then changed where the fingerprint samples it
        shutil.copytree(Path(json.loads((finished_run / "manifest.json").read_text())["base"]["path"]), base)
        manifest = json.loads((tmp / "run_copy" / "manifest.json").read_text())
        manifest["base"]["path"] = str(base)
        (tmp / "run_copy" / "manifest.json").write_text(json.dumps(manifest))
        weights = base / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
        weights.write_bytes(bytes(data))


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 30 and len({c["name"] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_bad_input_is_answered_clearly(case, tmp_path, tiny_model, finished_run, monkeypatch, capsys):
    if case.get("needs_no_cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    ctx = {
        "tmp": tmp_path,
        "tiny": tiny_model("llama"),
        "data": DEMO_DATA,
        "run": tmp_path / "run_copy",
        "recipe": tmp_path / "recipe.yaml",
    }
    prepare(case.get("setup"), tmp_path, ctx["tiny"], finished_run)
    for name, content in case.get("files", {}).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    recipe = case.get("recipe_text") or yaml.safe_dump(fill(merged(GOOD, case.get("recipe", {})), ctx))
    ctx["recipe"].write_text(recipe)
    if case.get("low_disk"):
        monkeypatch.setattr("qlora_pipe.merge.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, 0))
    outside = snapshot(finished_run)
    before = snapshot(tmp_path)

    status = cli.main(fill(case["argv"], ctx))

    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1, err
    for needle in case["expect"]:
        assert needle in err, f"{needle!r} not in {err!r}"
    assert snapshot(tmp_path) == before and snapshot(finished_run) == outside
