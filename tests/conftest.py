"""Fixtures: tiny random models of several architectures, built locally (no hub), and recipe writing."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

# The suite runs offline: the hub clients read this when they are imported (below), so a hub id fails at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from tiny_models import build, build_like, small_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
DEMO_DATA = ROOT / "data" / "tiny"
# A conversation with a system turn and two assistant turns.
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say yes."},
    {"role": "assistant", "content": "yes"},
    {"role": "user", "content": "Say no."},
    {"role": "assistant", "content": "no"},
]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(arch) -> directory of a tiny random model of that architecture (built once per session)."""
    cache: dict[str, Path] = {}

    def get(arch: str = "llama") -> Path:
        if arch not in cache:
            cache[arch] = build(tmp_path_factory.mktemp(arch), arch, seed=0, num_layers=2, vocab_size=512)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def tiny_like(tmp_path_factory):
    """tiny_like("recipes/llama-2-7b") -> tiny random model with that base's architecture and tokenizer facts."""
    cache: dict[str, Path] = {}

    def get(facts_dir: str) -> Path:
        if facts_dir not in cache:
            cache[facts_dir] = build_like(tmp_path_factory.mktemp(Path(facts_dir).name), ROOT / facts_dir)
        return cache[facts_dir]

    return get


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """tiny_sd() -> a tiny random Stable Diffusion pipeline (epsilon); tiny_sd("recipes/seeds/stable-diffusion-2-1")
    -> one with that base's scheduler (v-prediction) and attention layout (built once per session)."""
    from tiny_diffusion import build_sd

    cache: dict[str | None, Path] = {}

    def get(facts_dir: str | None = None) -> Path:
        if facts_dir not in cache:
            name = Path(facts_dir).name if facts_dir else "sd"
            cache[facts_dir] = build_sd(tmp_path_factory.mktemp(name), facts=ROOT / facts_dir if facts_dir else None)
        return cache[facts_dir]

    return get


@pytest.fixture(scope="session")
def llama_cpp():
    """llama-cpp-python, built once per machine (real_material.llama_cpp_python); skipped where it cannot be."""
    import real_material

    try:
        return real_material.llama_cpp_python()
    except RuntimeError as e:
        pytest.skip(str(e))


@pytest.fixture
def add_callback(monkeypatch):
    """add_callback(callback): the trainers the train stage builds in this test get `callback` too."""
    from qlora_pipe import train as train_stage

    def add(callback) -> None:
        build = train_stage.build_trainer

        def build_with_callback(recipe):
            trainer, facts = build(recipe)
            trainer.add_callback(callback)
            return trainer, facts

        monkeypatch.setattr(train_stage, "build_trainer", build_with_callback)

    return add


@pytest.fixture
def write_recipe(tmp_path):
    """write_recipe(base, **sections) -> path of a small fast recipe (fp32 compute, a few steps) in tmp_path."""

    def write(base: Path, **sections) -> Path:
        return small_recipe(tmp_path / "recipe.yaml", base, **sections)

    return write


# Lines of a script run as `qlora-pipe train` that add the callback `Interrupt` (the script defines it first) to the
# trainer the train stage builds.
WITH_INTERRUPT = """
build = train.build_trainer
def build_with_interrupt(recipe):
    trainer, facts = build(recipe)
    trainer.add_callback(Interrupt())
    return trainer, facts
train.build_trainer = build_with_interrupt
"""


def slow(*cases) -> list:
    """Parameter cases that run with the complete suite only (`pytest -m "not slow"` leaves them out): the rest of an
    architecture matrix whose first case stays in the fast tier."""
    return [pytest.param(*c if isinstance(c, tuple) else (c,), marks=pytest.mark.slow) for c in cases]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
