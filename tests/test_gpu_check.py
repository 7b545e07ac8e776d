"""tools/gpu_check.py, the one command for a CUDA machine: without CUDA (or with --cpu) its CPU-safe parts run on
tiny shapes with figures in the report, and the CUDA-only parts are reported as skipped with the reason."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402

CPU_PARTS = ("train_compare", "chain")


def test_every_part_is_cpu_safe_or_cuda_only():
    assert set(gpu_check.PARTS) == {*CPU_PARTS, *gpu_check.CUDA_ONLY}
    assert set(gpu_check.RUNNERS) == set(gpu_check.NEEDS) == set(gpu_check.PARTS)


def test_cuda_only_parts_are_skipped_with_the_reason_and_the_run_exits_0(tmp_path, capsys):
    out = tmp_path / "report.json"
    parts = ",".join(sorted(gpu_check.CUDA_ONLY))
    assert gpu_check.main(["--cpu", "--parts", parts, "--out", str(out), "--workdir", str(tmp_path / "work")]) == 0
    report = json.loads(out.read_text())
    assert list(report["parts"]) == list(gpu_check.PARTS)
    for name in gpu_check.CUDA_ONLY:
        assert report["parts"][name]["status"] == "skipped: no CUDA device (--cpu)"
    for name in CPU_PARTS:
        assert report["parts"][name]["status"] == "skipped: not in --parts"
    assert report["device"]["cuda"] is False and report["packages"]["torch"]
    assert "skipped: no CUDA device" in capsys.readouterr().out


def test_a_missing_package_is_reported_with_the_command_that_installs_it():
    text = gpu_check.error_text(ModuleNotFoundError("No module named 'yaml'"))
    assert text.startswith("missing package yaml: pip install 'pyyaml")
    assert "pip install -e '.[dev]'" in text


@pytest.mark.slow
def test_cpu_parts_run_on_tiny_shapes_and_report_their_figures(tmp_path):
    """The whole command as a user runs it (about 75 s on 2 cores): both stacks of part 1 train and are measured,
    the chain trains, merges and exports."""
    out = tmp_path / "report.json"
    command = [sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--quick", "--cpu", "--out", str(out)]
    done = subprocess.run(command + ["--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    parts = json.loads(out.read_text())["parts"]
    compare = parts["train_compare"]
    assert compare["status"] == "passed", compare.get("error")
    for stack in ("ours", "plain"):
        figures = compare[stack]
        assert figures["tokens_per_second"] > 0 and figures["peak_step_bytes"] > 0
        assert figures["gradient_checkpointing"] and len(figures["losses"]) == 4
        assert figures["trainable_parameters"] == compare["ours"]["trainable_parameters"]  # the same LoRA
    assert set(compare["ratios_ours_over_plain"]) == {"tokens_per_second", "peak_step_memory"}
    chain = parts["chain"]
    assert chain["status"] == "passed", chain.get("error")
    assert chain["trained_on"] == "cpu" and chain["merge"]["dequantized"]["relative_error"] < 1e-4
    assert chain["export"]["passed"] and chain["export"]["top1_agreement"] > 0.95
    for name in gpu_check.CUDA_ONLY:
        assert parts[name]["status"] == "skipped: no CUDA device (--cpu)"
    assert "train_compare  passed" in done.stdout and "chain          passed" in done.stdout
