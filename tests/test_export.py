"""GGUF export: the file llama.cpp and Ollama read carries the model's hyper-parameters, tokenizer and chat template,
and computes what the merged model computes (read back by transformers here; by llama.cpp itself in the slow test)."""

from __future__ import annotations

import importlib.resources
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jinja2
import pytest
import real_material
import torch
from conftest import CHAT, DEMO_DATA
from gguf import GGUFReader
from huggingface_hub.errors import StrictDataclassFieldValidationError
from real_material import llama_cpp_logits, llama_cpp_tokens
from tiny_models import CHAT_TEMPLATE, SPECIAL, build_tokenizer, corpus_lines, llama_speaking
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

import qlora_pipe.export as export_module
from qlora_pipe import UserError, cli
from qlora_pipe.config import load_recipe
from qlora_pipe.export import (
    GENERATION_TAG,
    MODELFILE,
    Turns,
    checked_turns,
    export,
    go_template,
    merge_scores,
    permute_rotary,
    strip_bos,
    unpermute_rotary,
    without_generation_tags,
)
from qlora_pipe.run import EXPORT_REPORT
from qlora_pipe.train import train

ARCHS = ("llama", "mistral", "qwen2", "gpt2")
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}
PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello world!  Two spaces, digits 1234567 and café naïve.\nA new line\n\n\tand a tab",
    "<|im_start|>user\nSay yes.<|im_end|>\n<|im_start|>assistant\n",
)


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    """exported(arch, qtype, verify) -> the GGUF file of the tiny model of `arch` (written once per module)."""
    cache: dict[tuple, Path] = {}

    def get(arch: str, qtype: str = "f16", verify: str = "full") -> Path:
        key = (arch, qtype, verify)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"gguf-{arch}") / f"{arch}-{qtype}.gguf"
            cache[key] = export(tiny_model(arch), qtype=qtype, out=out, verify=verify)
        return cache[key]

    return get


def report_of(path: Path) -> dict:
    return json.loads((path.parent / EXPORT_REPORT).read_text())[path.name]


def field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_read_back_by_transformers_matches_the_model(arch, exported):
    report = report_of(exported(arch))
    assert report["passed"] and report["verify"] == "full"
    assert report["figures"]["relative_error"] <= 2e-3
    assert report["figures"]["top1_agreement"] >= 0.99
    assert report["figures"]["config_mismatches"] == []


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_metadata_carries_hyperparameters_tokenizer_and_template(arch, exported, tiny_model):
    reader = GGUFReader(exported(arch))
    model_dir = tiny_model(arch)
    tok = AutoTokenizer.from_pretrained(model_dir)
    config = AutoModelForCausalLM.from_pretrained(model_dir).config
    name = GGUF_ARCH[arch]
    assert field(reader, "general.architecture") == name
    layers = config.n_layer if arch == "gpt2" else config.num_hidden_layers
    assert field(reader, f"{name}.block_count") == layers
    assert field(reader, f"{name}.embedding_length") == (config.n_embd if arch == "gpt2" else config.hidden_size)
    if arch != "gpt2":
        assert field(reader, f"{name}.attention.head_count_kv") == config.num_key_value_heads
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    # The tiny tokenizers split with GPT-2's regex, except that transformers' Qwen2Tokenizer puts back Qwen2's own
    assert field(reader, "tokenizer.ggml.pre") == ("qwen2" if arch == "qwen2" else "gpt-2")
    ids = list(range(min(len(tok), config.vocab_size)))  # Qwen2Tokenizer adds one token past the embeddings
    assert field(reader, "tokenizer.ggml.tokens") == tok.convert_ids_to_tokens(ids)
    assert len(field(reader, "tokenizer.ggml.merges")) > 0
    assert field(reader, "tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert field(reader, "tokenizer.ggml.padding_token_id") == tok.pad_token_id
    assert field(reader, "tokenizer.chat_template") == without_generation_tags(tok.chat_template)
    control = {i for i, t in enumerate(field(reader, "tokenizer.ggml.token_type")) if t == 3}
    assert control == {i for i in tok.all_special_ids if i < config.vocab_size}
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) == (not config.tie_word_embeddings)
    assert not any(n.endswith("attn.bias") and "attn_" not in n for n in names)


def test_f32_is_exact_and_q8_0_keeps_the_top_token_at_half_the_size(exported):
    f32, f16, q8 = (report_of(exported("llama", t)) for t in ("f32", "f16", "q8_0"))
    assert f32["figures"]["relative_error"] <= 1e-5
    assert q8["passed"] and q8["figures"]["top1_agreement"] >= 0.9
    assert q8["bytes"] < 0.6 * f16["bytes"] < 0.31 * f32["bytes"]
    assert q8["tensor_types"] == ["f32", "q8_0"]  # 1-D tensors stay f32


def test_streaming_read_back_checks_every_tensor(exported):
    path = exported("qwen2", "f16", verify="tensors")
    report = report_of(path)
    assert report["passed"] and report["verify"] == "tensors"
    assert report["figures"]["tensors"] == len(GGUFReader(path).tensors)
    assert 0 < report["figures"]["max_tensor_relative_error"] <= 1e-3


def rope_half(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """transformers' rotary embedding: dimension i pairs with i + d/2."""
    half = x.shape[-1] // 2
    cos, sin = torch.cos(angles).repeat(2), torch.sin(angles).repeat(2)
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def rope_pairs(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """llama.cpp's rotary embedding for the llama graph: dimensions 2i and 2i+1 pair."""
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = torch.cos(angles), torch.sin(angles)
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], -1).flatten(-2)


def test_rotary_permutation_turns_transformers_rope_into_llama_cpp_rope():
    heads, dim, hidden = 4, 16, 32
    weight, x = torch.randn(heads * dim, hidden, dtype=torch.float64), torch.randn(hidden, dtype=torch.float64)
    angles = 7 * 10000 ** (-torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))  # position 7
    hf = torch.stack([rope_half(q, angles) for q in (weight @ x).view(heads, dim)])
    cpp = torch.stack([rope_pairs(q, angles) for q in (permute_rotary(weight, heads) @ x).view(heads, dim)])
    # Same rotated vectors, only laid out differently: attention scores (q·k) are the same in both.
    assert torch.allclose(unpermute_rotary(cpp.reshape(-1, 1), heads).view(heads, dim), hf)
    assert torch.equal(unpermute_rotary(permute_rotary(weight, 2), 2), weight)


# ------------------------------------------------------------------------------------------- chained from a run
@pytest.fixture(scope="module")
def trained_run(tiny_model, tmp_path_factory) -> Path:
    import yaml

    tmp = tmp_path_factory.mktemp("export-run")
    recipe = {
        "model": {"base": str(tiny_model("llama")), "compute_dtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(DEMO_DATA / "train.jsonl"), "eval": str(DEMO_DATA / "eval.jsonl"), "max_seq_length": 96},
        "train": {"max_steps": 2, "batch_size": 4, "grad_accumulation": 1, "logging_steps": 1, "save_steps": 100},
        "output_dir": str(tmp / "run"),
    }
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return train(load_recipe(tmp / "recipe.yaml"))


def test_export_of_a_run_merges_first_and_chains_through_the_manifest(trained_run, capsys):
    assert cli.main(["export", str(trained_run), "--type", "f32"]) == 0
    assert "ollama create NAME -f" in capsys.readouterr().out
    assert (trained_run / "merged" / "manifest.json").is_file()  # merged, verified, then exported
    assert cli.main(["export", str(trained_run / "merged"), "--type", "f16"]) == 0
    out = trained_run / "gguf"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "export" and manifest["source_run"] == str(trained_run.resolve())
    assert sorted(manifest["files"]) == ["run-f16.gguf", "run-f32.gguf"]
    f32 = report_of(out / "run-f32.gguf")
    assert f32["figures"]["relative_error"] <= 1e-5
    assert f32["figures"]["positions"] > 100  # the run's held-out examples, not the fixed probe texts
    assert (out / MODELFILE).read_text().startswith("FROM ./run-f16.gguf\n")
    assert not list(out.glob(".*tmp"))


def test_k_quants_are_refused_with_the_types_offered(tiny_model, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["export", str(tiny_model("llama")), "--type", "q4_k_m"])
    assert stop.value.code == 2
    assert "invalid choice: 'q4_k_m' (choose from 'f32', 'f16', 'bf16', 'q8_0')" in capsys.readouterr().err


def test_a_failed_check_leaves_no_file(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(export_module.LIMITS, "f16", {"relative_error": 0.0, "top1_agreement": 1.0})
    out = tmp_path / "m.gguf"
    with pytest.raises(UserError, match="does not compute what"):
        export(tiny_model("gpt2"), out=out)
    assert not out.exists() and not list(tmp_path.glob(".*tmp"))
    assert report_of(out)["passed"] is False


# ------------------------------------------------------------------------------------------- tokenizers
def retokenized(model_dir: Path, dest: Path, tokenizer: PreTrainedTokenizerFast) -> Path:
    """A copy of a tiny model whose tokenizer is replaced (the vocabulary fits in its embeddings)."""
    shutil.copytree(model_dir, dest)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (dest / name).unlink(missing_ok=True)
    tokenizer.save_pretrained(dest)
    return dest


def split_tokenizer(pattern: str | None, vocab_size: int, ignore_merges: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE (retrained, so no hash llama.cpp knows) that splits with `pattern` first, as Llama 3 and Qwen2
    tokenizers do; `pattern` None: single digits, then GPT-2's rule, as SmolLM's and StarCoder's do."""
    tok = Tokenizer(models.BPE())
    first = pre_tokenizers.Split(Regex(pattern), "isolated") if pattern else pre_tokenizers.Digits(True)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [first, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pattern is None)]
    )
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = list(SPECIAL.values())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet)
    tok.train_from_iterator(corpus_lines(DEMO_DATA / "train.jsonl"), trainer)
    spec = json.loads(tok.to_str())
    spec["model"]["ignore_merges"] = ignore_merges  # Llama 3's takes a word that is a token whole
    tok = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHAT_TEMPLATE, **fast_specials())


def fast_specials() -> dict:
    return {
        "bos_token": SPECIAL["bos"],
        "eos_token": SPECIAL["eos"],
        "pad_token": SPECIAL["pad"],
        "additional_special_tokens": [SPECIAL["start"]],
    }


def sentencepiece_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Llama 2 / Mistral style: BPE with byte fallback, spaces as ▁ and one prepended."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(
        corpus_lines(DEMO_DATA / "train.jsonl"), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials)
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])  # bos first
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


SPLIT_RULES = [
    (LLAMA3_SPLIT, True, "llama-bpe"),
    (LLAMA3_SPLIT, False, "smaug-bpe"),  # Llama 3's rule, merged word by word
    (QWEN2_SPLIT, False, "qwen2"),
    (None, False, "smollm"),
]


@pytest.mark.parametrize(("pattern", "ignore_merges", "pre"), SPLIT_RULES)
def test_a_tokenizer_the_hash_table_lacks_is_exported_by_its_splitting_rule(
    pattern, ignore_merges, pre, tiny_model, tmp_path
):
    model_dir = retokenized(tiny_model("llama"), tmp_path / "m", split_tokenizer(pattern, 512, ignore_merges))
    out = export(model_dir, out=tmp_path / "m.gguf", verify="none")
    assert field(GGUFReader(out), "tokenizer.ggml.pre") == pre
    assert report_of(out)["tokenizer"]["pre_chosen_by"] == "splitting rule"


def test_a_pre_tokenizer_llama_cpp_lacks_is_refused_before_anything_is_written(tiny_model, tmp_path):
    model_dir = retokenized(tiny_model("llama"), tmp_path / "m", split_tokenizer(r"\w+|[^\w\s]+", 512))
    with pytest.raises(UserError, match=r"splits text with \['\\\\w\+\|\[\^\\\\w\\\\s\]\+', 'ByteLevel'\], none of"):
        export(model_dir, out=tmp_path / "m.gguf", verify="none")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp"))
    assert not (tmp_path / EXPORT_REPORT).exists()


def test_sentencepiece_tokenizers_get_scores_that_reproduce_the_merge_order(tiny_model, tmp_path):
    tok = sentencepiece_tokenizer(512)
    model_dir = retokenized(tiny_model("llama"), tmp_path / "m", tok)
    reader = GGUFReader(export(model_dir, out=tmp_path / "m.gguf", verify="none"))
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert field(reader, "tokenizer.ggml.add_space_prefix") is True
    assert (
        field(reader, "tokenizer.ggml.add_bos_token") is True
        and field(reader, "tokenizer.ggml.add_eos_token") is False
    )
    types = field(reader, "tokenizer.ggml.token_type")
    assert [types[tok.convert_tokens_to_ids(f"<0x{i:02X}>")] for i in (0, 65, 255)] == [6, 6, 6]  # BYTE
    assert types[tok.unk_token_id] == 2  # UNKNOWN
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    scores, merges = field(reader, "tokenizer.ggml.scores"), spec["model"]["merges"]
    first, later = ("".join(m.split(" ") if isinstance(m, str) else m) for m in (merges[0], merges[-1]))
    assert scores[tok.convert_tokens_to_ids(first)] > scores[tok.convert_tokens_to_ids(later)]
    assert merge_scores(spec, [first, "a"]) == [0.0, 0.0]


# ------------------------------------------------------------------------------------------- Ollama template
def chat_tokenizer(template: str) -> PreTrainedTokenizerFast:
    tok = build_tokenizer(corpus_lines(DEMO_DATA / "train.jsonl"), 512)
    tok.chat_template = template
    return tok


def trl_template(name: str) -> str:
    return (importlib.resources.files("trl") / "chat_templates" / f"{name}.jinja").read_text()


@pytest.mark.parametrize("name", ["chatml", "qwen2_5", "llama3", "phi3"])
def test_ollama_template_renders_what_the_chat_template_renders(name):
    tok = chat_tokenizer(CHAT_TEMPLATE if name == "chatml" else trl_template(name))
    turns, passed = checked_turns(tok)
    assert turns is not None
    assert {"user", "user+assistant+user"} <= set(passed)
    assert (turns.system is not None) == ("system+user" in passed)
    convo = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."}]
    convo.append({"role": "user", "content": "Bye"})
    assert turns.render(convo) == tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
    go = go_template(turns)
    assert go.count("{{") == go.count("}}") and '.Role "user"' in go and '.Role "assistant"' in go


def test_a_template_that_folds_the_system_message_into_a_turn_drops_system_messages():
    mistral_like = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{% set sys = m['content'] %}"
        "{% elif m['role'] == 'user' %}"
        "{{ '[INST] ' + ((sys + '\\n\\n') if sys is defined and loop.index == 2 else '') "
        "+ m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
    )
    tok = chat_tokenizer(mistral_like)
    turns, passed = checked_turns(tok)
    assert turns is not None and turns.system is None and "system+user" not in passed
    assert strip_bos(turns, tok, add_bos=True).head == ""


TRAINING_TEMPLATES = sorted(
    p.name.removesuffix(".jinja")
    for p in (importlib.resources.files("trl") / "chat_templates").iterdir()
    if p.name.endswith("_training.jinja")
)


def rendered(tok, template: str) -> list[str]:
    """The template on conversations with and without a system turn, ending on an answer or asking for one (a
    conversation the template refuses renders as its error's type)."""
    out = []
    for convo, prompt in ((CHAT, False), (CHAT[:4], True), (CHAT[1:3], False)):
        try:
            out.append(
                tok.apply_chat_template(convo, chat_template=template, tokenize=False, add_generation_prompt=prompt)
            )
        except Exception as e:  # noqa: BLE001 - templates that need images or refuse a system turn
            out.append(type(e).__name__)
    return out


@pytest.mark.parametrize("name", TRAINING_TEMPLATES)
def test_trl_training_templates_lose_their_generation_tags_and_render_the_same(name):
    template = trl_template(name)
    plain = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])  # llama.cpp's engine has loop controls too
    with pytest.raises(jinja2.TemplateSyntaxError, match="generation"):
        plain.parse(template)
    stripped = without_generation_tags(template)
    assert not GENERATION_TAG.search(stripped)
    plain.parse(stripped)
    tok = chat_tokenizer(CHAT_TEMPLATE)
    assert rendered(tok, stripped) == rendered(tok, template)


def test_generation_tags_keep_their_whitespace_control_when_stripped():
    template = (
        "{% for m in messages %}\n"
        "  {% generation %}\n"  # alone on its line: lstrip_blocks and trim_blocks remove the line
        "[{{ m['content'] }}]  \n\t{%- endgeneration -%}  \n"
        "<{{ m['role'] }}>{%+ generation +%}\n{{ 'x' }}{%- endgeneration %}\n"
        "{% endfor %}"
    )
    stripped = without_generation_tags(template)
    assert "generation" not in stripped
    tok = chat_tokenizer(CHAT_TEMPLATE)
    assert rendered(tok, stripped) == rendered(tok, template)
    assert without_generation_tags([{"name": "default", "template": template}]) == [
        {"name": "default", "template": stripped}
    ]


def test_the_exported_chat_template_and_modelfile_carry_no_generation_tags(tiny_model, tmp_path):
    tok = chat_tokenizer(trl_template("qwen2_5_training"))
    model_dir = retokenized(tiny_model("llama"), tmp_path / "m", tok)
    out = export(model_dir, out=tmp_path / "m.gguf", verify="none")
    template = field(GGUFReader(out), "tokenizer.chat_template")
    assert not GENERATION_TAG.search(template) and "{% generation" in tok.chat_template
    assert rendered(tok, template) == rendered(tok, tok.chat_template)
    modelfile = (tmp_path / MODELFILE).read_text()
    assert "TEMPLATE" in modelfile and "generation" not in modelfile


def test_go_literals_survive_braces_and_trimming():
    turns = Turns(head="", system=None, user=("{{user}}\n", "\n"), assistant=("A: ", "\n\n"))
    go = go_template(turns)
    assert '{{ "{{user}}\\n" }}' in go and '{{ "\\n\\n" }}' in go


# ------------------------------------------------------------------------------------------- llama.cpp itself
@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_computes_what_the_model_computes(arch, llama_cpp, exported, tiny_model):
    path, model_dir = exported(arch, "f32"), tiny_model(arch)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert llama_cpp_tokens(llama_cpp, path, PROMPTS) == [tok(t).input_ids for t in PROMPTS]
    ids = tok(PROMPTS[0] + " " + PROMPTS[1]).input_ids[:60]  # inside Mistral's 64-token sliding window
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(torch.tensor([ids])).logits[0]
    got = llama_cpp_logits(llama_cpp, path, ids)
    limit = 1e-3 if arch == "gpt2" else 1e-4  # llama.cpp's GELU reads an fp16 table (GGML_GELU_FP16)
    assert ((got - want).norm() / want.norm()).item() <= limit
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama3", "llama3-whole-words", "qwen2", "single-digits", "sentencepiece"])
def test_llama_cpp_tokenizes_as_the_hf_tokenizer(kind, llama_cpp, tiny_model, tmp_path):
    tok = {
        "llama3": lambda: split_tokenizer(LLAMA3_SPLIT, 512),
        "llama3-whole-words": lambda: split_tokenizer(LLAMA3_SPLIT, 512, ignore_merges=True),
        "qwen2": lambda: split_tokenizer(QWEN2_SPLIT, 512),
        "single-digits": lambda: split_tokenizer(None, 512),
        "sentencepiece": lambda: sentencepiece_tokenizer(512),
    }[kind]()
    model_dir = retokenized(tiny_model("llama"), tmp_path / "m", tok)
    path = export(model_dir, out=tmp_path / "m.gguf", verify="none")
    texts = [*PROMPTS[:2], "Numbers 12345678 and 3.14; CAPS and MiXeD, don't won't I'M", "  leading spaces"]
    hf = [AutoTokenizer.from_pretrained(model_dir)(t).input_ids for t in texts]
    assert llama_cpp_tokens(llama_cpp, path, texts) == hf


# ------------------------------------------------------------------------------------------- real vocabularies
# llama.cpp's vocabularies with the ids their original tokenizers give (.inp/.out), read by transformers. Its GGUF
# reader drops part of some original pre-tokenizers, and its tokenizer classes rebuild others (Qwen2Tokenizer and
# GPT2Tokenizer put back their own rule); where the original is known it is put back into tokenizer.json and the
# class is left out (checked against .out), so that the export starts from the original tokenizer.
def split_step(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def pre_tokenized(*steps: dict) -> Callable[[dict], None]:
    def restore(spec: dict) -> None:
        spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": list(steps)}

    return restore


def as_read(spec: dict) -> None:
    """tokenizer.json as transformers' GGUF reader writes it (Qwen3.5's rule), not as Qwen2Tokenizer rebuilds it."""


def whole_words(spec: dict) -> None:
    spec["model"]["ignore_merges"] = True  # Meta's tokenizer.json says so; the reader leaves it out


DIGITS_STEP = {"type": "Digits", "individual_digits": True}


def original_splits(*regexes: str) -> Callable[[dict], None]:
    """Splits by each regex in turn, then bytes: how DeepSeek's and Falcon's own tokenizer.json pre-tokenize (the
    regexes are the ones llama-vocab.cpp also splits with; .out proves them the original)."""
    return pre_tokenized(*map(split_step, regexes), byte_level(False))


@dataclass(frozen=True)
class RealVocab:
    pre: str | None  # what the export writes; None: SentencePiece, which has none
    restore: Callable[[dict], None] | None = None


REAL_VOCABS = {
    "gpt-2": RealVocab("gpt-2"),
    "qwen2": RealVocab("qwen2"),
    "qwen35": RealVocab("qwen2", as_read),  # the hash's choice: on this vocabulary Qwen2's and Qwen3.5's rules agree
    "phi-3": RealVocab(None),
    "llama-spm": RealVocab(None),
    "llama-bpe": RealVocab("llama-bpe", whole_words),
    "starcoder": RealVocab("starcoder", pre_tokenized(DIGITS_STEP, byte_level(True))),
    "falcon": RealVocab("falcon", original_splits(*export_module.FALCON)),
    "deepseek-coder": RealVocab("deepseek-coder", original_splits(*export_module.DEEPSEEK_CODER)),
    "deepseek-llm": RealVocab("deepseek-llm", original_splits(*export_module.DEEPSEEK_LLM)),
    # transformers reads these two with its GGUF tokenizer converter only (see `vocabulary`)
    "command-r": RealVocab("command-r", pre_tokenized(DIGITS_STEP, byte_level(True))),
    "refact": RealVocab("refact", pre_tokenized(DIGITS_STEP, byte_level(True))),
}
# transformers cannot read these: BERT's is WordPiece (an encoder's, which no causal-LM export carries) and its
# converter fails on Gemma 4's.
UNREADABLE = ("bert-bge", "gemma-4")
# MPT's is read, but without its user-defined tokens (GPT-NeoX's runs of spaces), which the tokenizers library gives
# back only with a second spelling in the vocabulary (then the ids of both spellings are ambiguous): not tested.
UNTESTED = ("mpt",)


def real_models_dir() -> Path:
    try:
        return real_material.llama_cpp_models()
    except RuntimeError as e:  # no package index here
        pytest.skip(f"llama.cpp's vocabularies are not available: {e}")


@pytest.mark.slow
def test_every_real_vocabulary_is_covered_or_unreadable_by_transformers():
    real_models_dir()  # or skip where they cannot be had
    names = {p.name.removeprefix("ggml-vocab-").removesuffix(".gguf") for p in real_material.vocabularies()}
    assert names == {*REAL_VOCABS, *UNREADABLE, *UNTESTED}
    for name in UNREADABLE:
        with pytest.raises((ValueError, TypeError, AssertionError, StrictDataclassFieldValidationError)):
            vocabulary(name)


def vocab_cases(name: str) -> tuple[list[str], list[list[int]]]:
    """The vocabulary's test texts and the ids its original tokenizer gives, read as llama.cpp's test reads them."""
    path = real_models_dir() / f"ggml-vocab-{name}.gguf"
    texts = path.with_suffix(".gguf.inp").read_bytes().decode().split("\n__ggml_vocab_test__\n")[:-1]
    ids = [[int(i) for i in line.split()] for line in path.with_suffix(".gguf.out").read_text().splitlines()]
    assert len(texts) == len(ids)
    return texts, ids


def vocabulary(name: str) -> PreTrainedTokenizerFast:
    """The real vocabulary `name` as transformers reads it. AutoTokenizer loads the file's config too, and knows no
    config of some architectures (command-r, mpt, refact) whose tokenizer its GGUF converter does read."""
    path = real_models_dir() / f"ggml-vocab-{name}.gguf"
    try:
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except ValueError as e:
        if "is not supported yet" not in str(e):
            raise
    architecture, tokens, config = get_gguf_tokenizer(str(path))
    backend, _ = convert_gguf_tokenizer(architecture, tokens)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config)


def tiny_llama_with(name: str, dest: Path, restore: Callable[[dict], None] | None = None) -> Path:
    """A one-layer Llama with the real vocabulary `name` (restored), embeddings as many as its tokens."""
    vocabulary(name).save_pretrained(dest)
    if restore is not None:
        restored(dest, restore)
    return tiny_llama_for(AutoTokenizer.from_pretrained(dest), dest)


def restored(tokenizer_dir: Path, restore: Callable[[dict], None]) -> None:
    """tokenizer.json restored, and read as it is written (no tokenizer class to rebuild it)."""
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    restore(spec)
    (tokenizer_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(config | {"tokenizer_class": "TokenizersBackend"}))


def tiny_llama_for(tok, dest: Path) -> Path:
    """A one-layer random Llama beside the tokenizer saved in `dest`, with an embedding for each of its tokens."""
    shape = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    return llama_speaking(tok, dest, False, **shape, max_position_embeddings=2048, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def real_export(tmp_path_factory):
    """real_export(name) -> (GGUF file, transformers tokenizer) of a tiny Llama with that real vocabulary."""
    cache: dict[str, tuple[Path, object]] = {}

    def get(name: str):
        if name not in cache:
            model_dir = tiny_llama_with(name, tmp_path_factory.mktemp(name) / "m", REAL_VOCABS[name].restore)
            path = export(model_dir, out=model_dir.parent / f"{name}.gguf", verify="none")
            cache[name] = path, AutoTokenizer.from_pretrained(model_dir)
        return cache[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", REAL_VOCABS)
def test_real_vocabularies_get_the_pre_tokenizer_llama_cpp_names_for_them(name, real_export):
    path, tok = real_export(name)
    reader = GGUFReader(path)
    case = REAL_VOCABS[name]
    assert field(reader, "tokenizer.ggml.model") == ("gpt2" if case.pre else "llama")
    assert field(reader, "tokenizer.ggml.pre") == case.pre if case.pre else "tokenizer.ggml.pre" not in reader.fields
    if case.restore is not None:  # the restored tokenizer is the original: it gives .out's ids
        texts, ids = vocab_cases(name)
        assert [tok.encode(t, add_special_tokens=False) for t in texts] == ids


@pytest.mark.slow
@pytest.mark.parametrize("name", REAL_VOCABS)
def test_llama_cpp_tokenizes_real_vocabularies_as_their_tokenizers(name, real_export, llama_cpp):
    path, tok = real_export(name)
    texts, ids = vocab_cases(name)
    got = llama_cpp_tokens(llama_cpp, path, texts, specials=False)
    assert got == ids
    differ = [t for t, g in zip(texts, got, strict=True) if g != tok.encode(t, add_special_tokens=False)]
    if name == "llama-spm":
        # transformers' Metaspace (prepend_scheme "first") puts no ▁ before a text's leading space; SentencePiece,
        # whose ids .out holds (asserted above), and llama.cpp do. A limit of the SentencePiece path, left as it is.
        assert differ and all(t.startswith(" ") for t in differ)
    else:
        assert differ == []


def smollm2_tokenizer_dir(dest: Path, digits: bool) -> Path:
    """SmolLM2-135M-Instruct's tokenizer as its own tokenizer.json has it (and the cached checkpoint), or without its
    single-digit step, as transformers' GGUF reader writes it."""
    try:
        source = real_material.smollm2()
    except RuntimeError as e:
        pytest.skip(f"SmolLM2 is not available here: {e}")
    AutoTokenizer.from_pretrained(source).save_pretrained(dest)
    if not digits:
        restored(dest, lambda spec: spec.update(pre_tokenizer=spec["pre_tokenizer"]["pretokenizers"][1]))
    return tiny_llama_for(AutoTokenizer.from_pretrained(dest), dest)


@pytest.mark.parametrize(
    ("digits", "chosen_by"),
    [
        (False, "check-text hash (tokenizer.json's splitting rule is gpt-2's)"),
        (True, "check-text hash and splitting rule"),
    ],
)
def test_the_check_text_hash_picks_smollm_for_smollm2(digits, chosen_by, tmp_path, caplog):
    model_dir = smollm2_tokenizer_dir(tmp_path / "m", digits)
    out = export(model_dir, out=tmp_path / "m.gguf", verify="none")
    assert field(GGUFReader(out), "tokenizer.ggml.pre") == "smollm"
    assert report_of(out)["tokenizer"]["pre_chosen_by"] == chosen_by
    assert ("are those of `smollm`" in caplog.text) == (not digits)  # the disagreement is said


@pytest.mark.slow
def test_llama_cpp_splits_digits_one_by_one_for_smollm2(llama_cpp, tmp_path):
    model_dir = smollm2_tokenizer_dir(tmp_path / "m", digits=True)
    path = export(model_dir, out=tmp_path / "m.gguf", verify="none")
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [*PROMPTS, "Numbers 12345678, 3.14 and ½; don't WON'T", "2024-01-31: 1,000,000 in 365 days"]
    assert llama_cpp_tokens(llama_cpp, path, texts) == [tok(t).input_ids for t in texts]
