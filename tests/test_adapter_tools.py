"""The adapter tools. `adapter inspect`: the spectrum of ΔW from its r × r core equals a full SVD's, the effective
ranks, norms, amplification and subspace similarity equal their definitions computed directly, and the command
reports a trained run against the weights it was trained on. `adapter combine`: `cat` gives exactly Σ wᵢ·ΔWᵢ, `svd`
the best rank-R approximation of it (also from bf16 adapters), the result merges exactly, and mismatched inputs are
refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import yaml
from conftest import DEMO_DATA
from safetensors.torch import save_file

import qlora_pipe.evaluate as evaluate_module
from qlora_pipe import UserError, cli, model
from qlora_pipe.adapters import load_adapter
from qlora_pipe.analysis import effective_rank, module_summary, similarity, spectrum
from qlora_pipe.config import load_recipe
from qlora_pipe.run import check_adapter_bases
from qlora_pipe.train import train

SHAPES = [(16, 4, 24), (40, 8, 6), (5, 8, 30), (64, 16, 48)]  # (out, r, in): r above in or out too


def low_rank(out: int, r: int, inp: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, inp, generator=g, dtype=torch.float64), torch.randn(out, r, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("shape", SHAPES)
def test_spectrum_from_the_core_equals_a_full_svd(shape):
    a, b = low_rank(*shape, seed=0)
    found = spectrum(a, b, scale=0.5)
    delta = 0.5 * b @ a
    full = torch.linalg.svdvals(delta)
    k = len(found.values)
    assert k == min(shape)
    torch.testing.assert_close(found.values, full[:k], rtol=1e-10, atol=1e-12)
    assert all(float(x) < 1e-10 for x in full[k:])  # ΔW has no more directions than the core
    torch.testing.assert_close(found.u @ torch.diag(found.values) @ found.v.T, delta, rtol=1e-10, atol=1e-10)
    for share in (0.9, 0.99):
        energy = full.square().cumsum(0) / full.square().sum()
        assert effective_rank(found.values, share) == int((energy < share - 1e-12).sum()) + 1


def test_effective_rank_of_a_known_spectrum():
    values = torch.tensor([3.0, 1.0, 0.0, 0.0])  # energy 9 and 1: 90 % in the first direction, 100 % in two
    assert effective_rank(values, 0.9) == 1 and effective_rank(values, 0.99) == 2
    assert effective_rank(torch.zeros(4), 0.9) == 0


def test_norms_and_amplification_equal_their_definitions():
    out, r, inp = 32, 4, 24
    a, b = low_rank(out, r, inp, seed=1)
    weight = torch.randn(out, inp, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    summary = module_summary(spectrum(a, b, 2.0), r, weight)
    delta = 2.0 * b @ a
    u, _, vh = torch.linalg.svd(delta)
    assert summary["delta_norm"] == pytest.approx(float(delta.norm()), rel=1e-12)
    assert summary["relative_to_weight"] == pytest.approx(float(delta.norm() / weight.norm()), rel=1e-12)
    projected = u[:, :r].T @ weight @ vh[:r].T
    assert summary["amplification"] == pytest.approx(float(delta.norm() / projected.norm()), rel=1e-10)


def test_subspace_similarity_equals_its_definition():
    a8, _ = low_rank(1, 8, 40, seed=3)
    a4 = a8[:4] + 0.1 * low_rank(1, 4, 40, seed=4)[0]
    phi = similarity(a8, a4)
    right8 = torch.linalg.svd(a8, full_matrices=False).Vh.T
    right4 = torch.linalg.svd(a4, full_matrices=False).Vh.T
    for i, j in ((1, 1), (3, 2), (8, 4), (5, 4)):
        direct = (right8[:, :i].T @ right4[:, :j]).norm().square() / min(i, j)
        assert float(phi[i - 1, j - 1]) == pytest.approx(float(direct), rel=1e-10)
    assert phi.shape == (8, 4) and float(phi.min()) >= 0 and float(phi.max()) <= 1 + 1e-12
    itself = similarity(a8, a8)
    torch.testing.assert_close(torch.diagonal(itself), torch.ones(8, dtype=torch.float64))


def write_adapter(
    path,
    r: int,
    delta_rank: int,
    base: str = "tiny",
    dtype=torch.float32,
    seed: int = 10,
    rslora: bool = False,
    dora: bool = False,
) -> Path:
    """A PEFT LoRA adapter directory on two layers whose updates have `delta_rank` directions at rank `r`."""
    path.mkdir()
    tensors = {}
    for i, module in enumerate(("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj")):
        a, b = low_rank(32, r, 32, seed=seed + i)
        b[:, delta_rank:] = 0
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.to(dtype)
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.to(dtype)
        if dora:
            tensors[f"base_model.model.{module}.lora_magnitude_vector"] = torch.ones(32, dtype=dtype)
    save_file(tensors, path / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": ["q_proj"],
        "use_rslora": rslora,
        "base_model_name_or_path": base,
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def deltas(path: Path) -> dict[str, torch.Tensor]:
    adapter = load_adapter(path)
    return {m: adapter.delta(m, False).double() for m in adapter.lora}


def test_advice_names_a_smaller_rank_when_few_directions_are_used(tmp_path, capsys):
    write_adapter(tmp_path / "wide", r=16, delta_rank=3)
    assert cli.main(["adapter", "inspect", str(tmp_path / "wide")]) == 0
    out = capsys.readouterr().out
    assert "rank 16 uses at most 3 directions for 90 % of the update in every module: r=4 is enough" in out
    report = json.loads((tmp_path / "wide_analysis" / "adapter_report.json").read_text())
    module = report["modules"]["model.layers.0.self_attn.q_proj"]
    assert module["effective_rank_99"] <= 3 and "relative_to_weight" not in module  # no base beside a bare adapter
    assert sorted(module["singular_values"], reverse=True) == module["singular_values"]


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> dict[int, Path]:
    """Two short training runs on one tiny base: rank 8 and rank 4 (different seeds)."""
    tmp = tmp_path_factory.mktemp("runs")
    found = {}
    for r in (8, 4):
        recipe = {
            "model": {"base": str(tiny_model("llama")), "compute_dtype": "float32"},
            "lora": {"r": r, "alpha": 2 * r},
            "data": {"train": str(DEMO_DATA / "train.jsonl"), "eval": str(DEMO_DATA / "eval.jsonl")},
            "train": {"max_steps": 3, "batch_size": 4, "learning_rate": 5e-3, "seed": r, "save_steps": 100},
            "output_dir": str(tmp / f"r{r}"),
        }
        (tmp / f"r{r}.yaml").write_text(yaml.safe_dump(recipe))
        found[r] = train(load_recipe(tmp / f"r{r}.yaml"))
    return found


def test_inspect_a_run_against_its_trained_weights_and_compare_two_ranks(runs, tmp_path, capsys):
    assert cli.main(["adapter", "inspect", str(runs[8]), "--compare", str(runs[4] / "adapter")]) == 0
    out = capsys.readouterr().out
    analysis = runs[8] / "adapter_analysis"
    assert f"report and figures: {analysis}" in out and "rank 8" in out
    report = json.loads((analysis / "adapter_report.json").read_text())
    assert {p.name for p in analysis.iterdir()} >= {"spectra.png", "effective_rank.png", "similarity.png"}

    # ‖W‖ is the norm of the weight training multiplied by: the NF4 base's dequantization
    net, _, _ = model.load_for_inference(runs[8])
    layer = net.get_submodule("base_model.model.model.layers.1.mlp.down_proj").base_layer
    assert isinstance(layer, bnb.nn.Linear4bit)
    trained = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).double()
    module = report["modules"]["model.layers.1.mlp.down_proj"]
    assert module["weight_norm"] == pytest.approx(float(trained.norm()), rel=1e-12)
    assert module["relative_to_weight"] == pytest.approx(module["delta_norm"] / float(trained.norm()), rel=1e-12)
    phi = module["subspace_similarity"]
    assert len(phi) == 8 and len(phi[0]) == 4 and all(0 <= x <= 1 for row in phi for x in row)

    assert cli.main(["adapter", "inspect", str(tmp_path / "nowhere")]) == 2
    assert "not a training run or a PEFT adapter directory" in capsys.readouterr().err


def test_cat_gives_the_exact_weighted_sum_and_merges_exactly(runs, tmp_path, capsys):
    out = tmp_path / "cat"
    argv = ["adapter", "combine", str(runs[8]), str(runs[4] / "adapter"), "--weights", "0.7", "-0.3"]
    assert cli.main([*argv, "--method", "cat", "--out", str(out)]) == 0
    ours, first, second = deltas(out), deltas(runs[8] / "adapter"), deltas(runs[4] / "adapter")
    assert ours.keys() == first.keys()
    for module, delta in ours.items():
        expected = 0.7 * first[module] - 0.3 * second[module]
        assert float((delta - expected).norm() / expected.norm()) <= 1e-6, module
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "combine" and manifest["rank"] == 12 and manifest["method"] == "cat"
    assert [s["weight"] for s in manifest["sources"]] == [0.7, -0.3]
    assert manifest["base"] == json.loads((runs[8] / "manifest.json").read_text())["base"]

    assert cli.main(["merge", str(out), "--dtype", "float32"]) == 0  # takes the combined adapter as it takes a run
    report = json.loads((out / "merged" / "merge_report.json").read_text())
    assert report["modes"]["dequantized"]["relative_error"] <= 1e-5
    capsys.readouterr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_svd_gives_the_best_rank_r_approximation_of_the_sum(dtype, tmp_path):
    a = write_adapter(tmp_path / "a", r=8, delta_rank=8, dtype=dtype, seed=20)
    b = write_adapter(tmp_path / "b", r=4, delta_rank=4, dtype=dtype, seed=30, rslora=True)
    argv = ["adapter", "combine", str(a), str(b), "--weights", "1.0", "0.5", "--method", "svd", "--rank", "6"]
    assert cli.main([*argv, "--out", str(tmp_path / "svd")]) == 0
    ours, first, second = deltas(tmp_path / "svd"), deltas(a), deltas(b)
    for module, delta in ours.items():
        exact = first[module] + 0.5 * second[module]  # rank 12
        u, values, vh = torch.linalg.svd(exact)
        best = u[:, :6] @ torch.diag(values[:6]) @ vh[:6]
        assert float((delta - best).norm() / best.norm()) <= 1e-5, module
    assert load_adapter(tmp_path / "svd").lora[module][0].shape[0] == 6


def test_combine_refuses_what_it_cannot_combine(tmp_path, capsys):
    a = write_adapter(tmp_path / "a", r=8, delta_rank=8)
    other_base = write_adapter(tmp_path / "b", 8, 8, base="other")
    cases = {
        "trained on different bases": [str(a), str(other_base), "--method", "cat"],
        "needs --density": [str(a), str(a), "--method", "ties"],
        "must have the same r value": [str(a), str(write_adapter(tmp_path / "c", 4, 4)), "--method", "linear"],
        "2 weight(s) for 3 adapters": [str(a), str(a), str(a), "--method", "cat"],
        "a DoRA adapter": [str(a), str(write_adapter(tmp_path / "d", 8, 8, dora=True)), "--method", "cat"],
    }
    for message, args in cases.items():
        weights = ["--weights", "1", "1"]
        assert cli.main(["adapter", "combine", *args, *weights, "--out", str(tmp_path / "out")]) == 2, message
        assert message in capsys.readouterr().err, message
        assert not (tmp_path / "out").exists()


def test_several_adapters_on_one_base_equal_each_alone(runs, monkeypatch, capsys):
    from qlora_pipe.evaluate import evaluate, evaluate_adapters
    from qlora_pipe.generate import generate, generate_with_adapters

    loads = []
    load_run_base = model.load_run_base
    monkeypatch.setattr(model, "load_run_base", lambda *a: loads.append(a) or load_run_base(*a))
    results = evaluate_adapters(runs[8], {"r4": runs[4] / "adapter"})
    assert list(results) == ["base", "r8", "r4"] and len(loads) == 1  # the base is loaded once
    for name, run in (("r8", runs[8]), ("r4", runs[4])):
        alone = evaluate(run)
        assert results[name]["loss"] == pytest.approx(alone["loss"], rel=1e-6), name
    assert results["base"]["loss"] > max(results["r8"]["loss"], results["r4"]["loss"])

    replies = generate_with_adapters(runs[8], {"r4": runs[4]}, "Classify: great food", max_new_tokens=8)
    assert replies["r4"] == generate(runs[4], "Classify: great food", max_new_tokens=8)

    assert cli.main(["eval", str(runs[8]), "--adapter", f"r4={runs[4]}"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in ("base", "r8", "r4"))
    assert cli.main(["generate", str(runs[8]), "--prompt", "hi", "--adapter", f"train={runs[4]}"]) == 2
    assert "not usable as a PEFT adapter name" in capsys.readouterr().err
    assert cli.main(["generate", str(runs[8]), "--prompt", "hi", "--adapter", "r4"]) == 2
    assert "give NAME=DIR" in capsys.readouterr().err


def test_eval_refuses_by_name_an_adapter_of_another_base(runs, tiny_model, tmp_path, monkeypatch, capsys):
    """`eval --adapter` takes the adapters that `adapter combine` takes together with the evaluated run's: a LoftQ
    run's adapter (trained on its backbone) beside a plain NF4 run, the plain run's adapter beside the LoftQ run, or
    one trained on the unquantized base, is refused by its name with one message, before any model is loaded."""
    loftq_recipe = {
        **yaml.safe_load((runs[4].parent / "r4.yaml").read_text()),
        "lora": {"r": 4, "alpha": 8, "init": "loftq", "loftq_svd": "exact", "loftq_iters": 1},
        "output_dir": str(tmp_path / "loftq"),
    }
    (tmp_path / "loftq.yaml").write_text(yaml.safe_dump(loftq_recipe))
    loftq_run = train(load_recipe(tmp_path / "loftq.yaml"))
    unquantized = tmp_path / "unquantized"  # runs[4] as if trained on the bf16 base, not NF4
    shutil.copytree(runs[4], unquantized)
    manifest = json.loads((unquantized / "manifest.json").read_text())
    manifest["quantization"] = {"method": "none", "load_dtype": "bfloat16", "compute_dtype": "bfloat16"}
    (unquantized / "manifest.json").write_text(json.dumps(manifest))
    loaded = []
    monkeypatch.setattr(evaluate_module, "load_with_adapters", lambda *a: loaded.append(a))
    capsys.readouterr()  # the LoftQ run's own output

    cases = [
        (runs[8], "loftq", loftq_run, "the weights' fingerprints differ"),
        (loftq_run, "r8", runs[8], "the weights' fingerprints differ"),
        (runs[8], "bf16", unquantized, "the quantization differs"),
    ]
    for path, name, where, why in cases:
        fits = [] if path == loftq_run else ["--adapter", f"r4={runs[4]}"]  # one that fits, named first
        assert cli.main(["eval", str(path), *fits, "--adapter", f"{name}={where}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert f"--adapter {name}={where}: trained on" in err and why in err, err
        assert ("the LoftQ backbone" in err) == (loftq_run in (path, where)), err
    # the very check `adapter combine` makes
    weights = ["--weights", "1", "1", "--method", "cat", "--out", str(tmp_path / "combined")]
    assert cli.main(["adapter", "combine", str(runs[8]), str(loftq_run), *weights]) == 2
    assert "trained on different bases (the weights' fingerprints differ)" in capsys.readouterr().err
    # a plain model directory is compared by its weights: the NF4 runs' adapters fit their base, LoftQ's does not
    check_adapter_bases(tiny_model("llama"), {"r4": runs[4], "r8": runs[8] / "adapter"}, model.weight_files)
    with pytest.raises(UserError, match="--adapter loftq=.*the weights' fingerprints differ"):
        check_adapter_bases(tiny_model("llama"), {"r4": runs[4], "loftq": loftq_run}, model.weight_files)
    assert loaded == []
