"""manifest.json: what produced an output directory, from what, with which versions, so the next stage needs no
argument but the directory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from qlora_pipe import UserError, __version__

MANIFEST = "manifest.json"
PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "accelerate",
    "datasets",
    "trl",
    "safetensors",
    "gguf",
    "diffusers",
)
# A fingerprint reads this many evenly spaced chunks of each weight file, plus its size and safetensors header:
# fine-tunes of the same architecture share the header but differ in every chunk, and hashing 14 GB would take minutes.
FINGERPRINT_CHUNKS = 16
CHUNK_BYTES = 1 << 16


def package_versions() -> dict[str, str]:
    versions = {"qlora_pipe": __version__}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def fingerprint_file(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        if path.suffix == ".safetensors":
            header_len = int.from_bytes(f.read(8), "little")
            digest.update(f.read(min(header_len, size)))
        for i in range(FINGERPRINT_CHUNKS):
            f.seek(max(0, size * i // FINGERPRINT_CHUNKS))
            digest.update(f.read(CHUNK_BYTES))
        f.seek(max(0, size - CHUNK_BYTES))
        digest.update(f.read(CHUNK_BYTES))
    return digest.hexdigest()


def fingerprint_weights(files: list[Path]) -> dict[str, str]:
    return {p.name: fingerprint_file(p) for p in files}


def write_manifest(out_dir: Path, stage: str, **payload) -> Path:
    manifest = {
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": package_versions(),
        **payload,
    }
    return write_json(out_dir / MANIFEST, manifest)


def write_json(path: Path, content: dict) -> Path:
    """Write JSON atomically: a reader (or a resumed run) sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(run_dir: str | Path, stage: str | None = None) -> dict:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{run_dir}: no {MANIFEST}; expected the output directory of `qlora-pipe {stage or 'train'}`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno}); the run directory is damaged") from None
    if stage and manifest.get("stage") != stage:
        raise UserError(f"{run_dir}: written by `qlora-pipe {manifest.get('stage')}`, expected a `{stage}` output")
    return manifest


@contextmanager
def atomic_dir(final: Path):
    """Yield a temporary sibling of `final`; on success replace `final` with it, on failure remove it."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
