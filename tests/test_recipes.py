"""Every recipe in recipes/ is valid and works: it loads, and a dry run on a tiny random model of the same
architecture (same model_type, architecture class, tokenizer special tokens and chat template) trains a few steps
and merges into a checkpoint equal, layer by layer, to the trained model. A recipe added without the base facts
this needs (config.json and special_tokens.json beside it) fails here."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEMO_DATA, ROOT

from qlora_pipe import data
from qlora_pipe.config import DIFFUSION_TASKS, load_recipe
from qlora_pipe.estimate import GIB, estimate
from qlora_pipe.merge import merge
from qlora_pipe.run import MERGE_REPORT
from qlora_pipe.train import train

# recipes/accelerate/ holds launcher configs (tests/test_distributed.py uses them), not recipes.
RECIPES = sorted(p for p in ROOT.glob("recipes/**/*.yaml") if p.parent.name != "accelerate")


def facts_dir(path: Path, base: str) -> Path | None:
    """A recipe's base facts: beside it (recipes/<model>/), or in a folder named after the base (recipes/seeds/);
    config.json for a language model, model_index.json for a diffusers pipeline."""
    for candidate in (path.parent, path.parent / Path(base).name):
        if (candidate / "config.json").exists() or (candidate / "model_index.json").exists():
            return candidate
    return None


def test_there_are_recipes_for_each_family_and_seed_task():
    names = {str(p.relative_to(ROOT / "recipes")) for p in RECIPES}
    for model in ("llama-2-7b", "mistral-7b", "qwen2.5-7b", "llama-3.1-8b"):
        assert {f"{model}/qlora_sft.yaml", f"{model}/loftq_sft.yaml"} <= names
    assert {"llama-3.1-8b/qlora_sft_12gb.yaml", "mistral-7b/qlora_sft_12gb.yaml"} <= names
    assert {
        "seeds/gpt2_causal_lm.yaml",
        "seeds/bloomz_twitter_complaints.yaml",
        "seeds/bert_sst2_seq_cls.yaml",
        "seeds/bloomz_rank_8.yaml",
        "seeds/bloomz_rank_64.yaml",
        "seeds/sd21_text_to_image_lora.yaml",
        "seeds/sd21_dreambooth_lora.yaml",
    } <= names


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_recipe_dry_run_trains_and_merges(path, tiny_like, tiny_model, tiny_sd, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name data relative to the repository root
    recipe = load_recipe(path)
    facts = facts_dir(path, recipe.model.base)
    if recipe.task in DIFFUSION_TASKS:
        assert facts is not None, f"{path}: add the pipeline's model_index.json, scheduler and unet configs beside it"
        dry_run_images(recipe, tiny_sd(str(facts.relative_to(ROOT))), tmp_path)
        return
    if facts is not None:
        config = json.loads((facts / "config.json").read_text())
        assert (facts / "special_tokens.json").exists(), f"{facts}: special_tokens.json is missing"
        base = tiny_like(str(facts.relative_to(ROOT)))
        assert json.loads((base / "config.json").read_text())["model_type"] == config["model_type"]
    elif recipe.model.base.startswith(".tiny/"):  # the demo recipes, on the model `make demo` builds
        base = tiny_model("llama")
    else:
        pytest.fail(f"{path}: add the base's config.json and special_tokens.json beside the recipe")
    d = recipe.data
    if not data.is_local(d.train):  # hub data sets: the shipped sample in the same (messages) format
        d = dataclasses.replace(d, train=str(DEMO_DATA / "train.jsonl"), eval=str(DEMO_DATA / "eval.jsonl"))
    elif "--stdlib" in path.read_text():  # data made on the machine, as the recipe's header says
        made = tmp_path / "stdlib"
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_demo_data.py"), str(made), "--stdlib"], check=True)
        d = dataclasses.replace(d, train=str(made / "train.jsonl"), eval=str(made / "eval.jsonl"))
    offload = recipe.train.activation_offloading and torch.cuda.is_available()  # CUDA only
    t = dataclasses.replace(
        recipe.train,
        max_steps=2,
        batch_size=2,
        grad_accumulation=1,
        eval_steps=None,
        logging_steps=1,
        save_steps=100,
        activation_offloading=offload,
    )
    recipe = dataclasses.replace(
        recipe,
        model=dataclasses.replace(recipe.model, base=str(base)),
        data=d,
        train=t,
        output_dir=str(tmp_path / "run"),
    )
    run = train(recipe)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 2
    merged = merge(run, verify="layers")
    report = json.loads((merged / MERGE_REPORT).read_text())["modes"]["dequantized"]
    assert report["layers"] > 0 and report["max_relative_error"] < 1e-5


def dry_run_images(recipe, base: Path, tmp_path: Path) -> None:
    """An image recipe on a tiny pipeline like its base: its hub images replaced by a few generated ones, 32 px, two
    steps, then the merge, verified."""
    from tiny_diffusion import captioned_images, instance_images

    from qlora_pipe.merge_diffusion import merge as merge_pipeline
    from qlora_pipe.train_diffusion import train as train_images

    d = recipe.data
    if not data.is_local(d.train):
        make = instance_images if recipe.task == "dreambooth" else captioned_images
        d = dataclasses.replace(d, train=str(make(tmp_path / "images", 4, 40)), columns=None)
    g = dataclasses.replace(
        recipe.diffusion,
        resolution=32,
        num_class_images=min(recipe.diffusion.num_class_images, 2),
        num_validation_images=1,
        validation_inference_steps=2,
    )
    t = dataclasses.replace(recipe.train, max_steps=2, batch_size=1, grad_accumulation=1, eval_steps=1, save_steps=100)
    model = dataclasses.replace(recipe.model, base=str(base), compute_dtype="float32")
    run = train_images(
        dataclasses.replace(recipe, model=model, data=d, diffusion=g, train=t, output_dir=str(tmp_path / "run"))
    )
    assert json.loads((run / "manifest.json").read_text())["metrics"]["steps"] == 2
    assert len(list((run / "validation").glob("step-*.png"))) == 2
    report = json.loads((merge_pipeline(run) / MERGE_REPORT).read_text())["components"]
    assert report["unet"]["relative_error"] <= 1e-5


HEADED = [p for p in RECIPES if "# Expected peak GPU memory:" in p.read_text()]


@pytest.mark.parametrize("path", HEADED, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_recipe_header_states_the_peak_the_estimate_predicts(path):
    stated = float(re.search(r"# Expected peak GPU memory: ([\d.]+) GiB", path.read_text()).group(1))
    predicted = estimate(load_recipe(path), device="cuda", facts_dir=path.parent).total / GIB
    assert stated == round(predicted, 2), f"{path}: header out of date; run python tools/recipe_headers.py"


@pytest.mark.parametrize("name", ["llama-3.1-8b/qlora_sft_12gb.yaml", "mistral-7b/qlora_sft_12gb.yaml"])
def test_12gb_recipes_fit_12_gib_with_the_cuda_context(name):
    path = ROOT / "recipes" / name
    assert estimate(load_recipe(path), device="cuda", facts_dir=path.parent).total <= 11 * GIB  # and a GiB to spare


@pytest.mark.slow
def test_the_rank_question_seed_trains_both_ranks_and_compares_them(tiny_like, tmp_path, monkeypatch, capsys):
    """recipes/seeds/bloomz_rank_{8,64}.yaml on a tiny BLOOM, then `adapter inspect r8 --compare r64` as the recipes'
    header says: the paper's similarity figure and φ for every module."""
    from qlora_pipe import cli

    monkeypatch.chdir(ROOT)
    base = tiny_like("recipes/seeds/bloomz-560m")
    runs = {}
    for r in (8, 64):
        recipe = load_recipe(ROOT / "recipes" / "seeds" / f"bloomz_rank_{r}.yaml")
        t = dataclasses.replace(recipe.train, max_steps=3, batch_size=4, logging_steps=1, save_steps=100)
        model = dataclasses.replace(recipe.model, base=str(base))
        runs[r] = train(dataclasses.replace(recipe, model=model, train=t, output_dir=str(tmp_path / f"r{r}")))
    assert cli.main(["adapter", "inspect", str(runs[8]), "--compare", str(runs[64])]) == 0
    assert "rank 8" in capsys.readouterr().out
    analysis = runs[8] / "adapter_analysis"
    assert (analysis / "similarity.png").stat().st_size > 0
    modules = json.loads((analysis / "adapter_report.json").read_text())["modules"]
    for name, module in modules.items():
        phi = module["subspace_similarity"]
        assert len(phi) == 8 and 8 <= len(phi[0]) <= 64, name
        assert all(0 <= x <= 1 + 1e-9 for row in phi for x in row), name
