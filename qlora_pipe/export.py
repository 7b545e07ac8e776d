"""Export stage: a merged model as one GGUF file for llama.cpp, Ollama and LM Studio, an Ollama Modelfile beside it,
and the proof that the file computes what the merged model computes.

Why our own converter, on the `gguf` package (the llama.cpp authors' writer, reader, tensor-name map, special-token
reader and quantizers): llama.cpp's convert_hf_to_gguf.py pins transformers 4.x, so it needs an environment of its own,
and it recognises a BPE tokenizer only by the hash of its output on a test text, so a retrained or extended tokenizer
stops it. We read the splitting rule itself (the pre-tokenizer's regex in tokenizer.json) and map it to the
llama.cpp pre-tokenizer that implements the same regex; hyper-parameters and tensor layouts are written as the
converter writes them for each supported family. Tensors stream one at a time, and every export is read back.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from qlora_pipe import UserError
from qlora_pipe.config import GGUF_TYPES, Recipe
from qlora_pipe.manifest import MANIFEST, read_manifest, write_json, write_manifest
from qlora_pipe.merge import check_disk, compare, fits_in_half_the_free_ram, logits_on, merge, report_prompts
from qlora_pipe.model import load_tokenizer
from qlora_pipe.run import EXPORT_DIR, EXPORT_REPORT, MERGED, RUN_STAGES, load_run
from qlora_pipe.shards import TensorRef, checkpoint_files, read_index, read_tensor

logger = logging.getLogger(__name__)

MODELFILE = "Modelfile"
QTYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
# What the read-back must show, per type: logits relative error (whole models) and top-1 agreement.
LIMITS = {
    "f32": {"relative_error": 1e-5, "top1_agreement": 0.999},
    "f16": {"relative_error": 2e-3, "top1_agreement": 0.99},
    "bf16": {"relative_error": 1e-2, "top1_agreement": 0.95},
    "q8_0": {"relative_error": None, "top1_agreement": 0.9},
}
# Streaming read-back (models too large for whole-model logits): relative error of each tensor.
TENSOR_LIMITS = {"f32": 1e-6, "f16": 1e-3, "bf16": 8e-3, "q8_0": 1.5e-2}
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Fine-tuning adapts a pre-trained model to a new task with little data.",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 3.14159, 2718, and 1,000,000 — plus émigré café naïve.",
)


# ------------------------------------------------------------------------------------------------ families
@dataclass(frozen=True)
class Family:
    """How llama.cpp's graph for one transformers model_type expects its tensors."""

    arch: gguf.MODEL_ARCH
    rope_permute: bool  # llama.cpp's llama graph rotates interleaved pairs; HF Llama rotates halves
    conv1d: tuple[str, ...] = ()  # GPT-2 keeps these weights as (in, out); GGUF wants (out, in)
    activations: tuple[str, ...] = ("silu",)


FAMILIES = {
    "llama": Family(gguf.MODEL_ARCH.LLAMA, rope_permute=True),
    "mistral": Family(gguf.MODEL_ARCH.LLAMA, rope_permute=True),  # llama.cpp runs Mistral on its llama graph
    "qwen2": Family(gguf.MODEL_ARCH.QWEN2, rope_permute=False),
    "gpt2": Family(
        gguf.MODEL_ARCH.GPT2,
        rope_permute=False,
        conv1d=(".c_attn.weight", ".c_proj.weight", ".c_fc.weight"),
        activations=("gelu_new", "gelu_pytorch_tanh"),
    ),
}
SKIPPED = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")  # buffers, not weights


def family_of(config) -> Family:
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise UserError(
            f"GGUF export supports the {', '.join(FAMILIES)} families; this model is `{config.model_type}`. Use "
            "llama.cpp's convert_hf_to_gguf.py on the merged directory for other architectures"
        )
    act = getattr(config, "hidden_act", None) or getattr(config, "activation_function", None)
    if act not in family.activations:
        raise UserError(f"{config.model_type} with activation `{act}`: llama.cpp computes {family.activations}")
    if getattr(config, "mlp_bias", False) or getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise UserError(f"this {config.model_type} variant (MLP biases or layer-scaled attention) has no GGUF graph")
    return family


def rope_parameters(config) -> dict:
    """transformers 5 keeps theta and scaling in `rope_parameters`; older configs in `rope_theta`/`rope_scaling`."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def write_hyperparameters(writer: gguf.GGUFWriter, config, qtype: str) -> None:
    """The keys llama.cpp's converter writes for these families (TextModel.set_gguf_parameters)."""
    writer.add_file_type(FILE_TYPES[qtype])
    writer.add_vocab_size(config.vocab_size)
    if config.model_type == "gpt2":
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    rope = rope_parameters(config)
    writer.add_rope_freq_base(rope["rope_theta"])
    write_rope_scaling(writer, rope, config)


def write_rope_scaling(writer: gguf.GGUFWriter, rope: dict, config) -> None:
    kind = rope["rope_type"]
    if kind in ("default", "llama3"):  # llama3's scaling travels as the rope_freqs tensor
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        original = rope.get("original_max_position_embeddings", config.max_position_embeddings)
        writer.add_rope_scaling_orig_ctx_len(original)
    else:
        raise UserError(f"rope scaling `{kind}` has no GGUF equivalent here (supported: linear, yarn, llama3)")


def llama3_rope_factors(config) -> torch.Tensor:
    """Per-frequency divisors of Llama 3.1's rope scaling, computed as llama.cpp's converter does."""
    rope, dim = rope_parameters(config), head_dim(config)
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ tensor plan
@dataclass
class Item:
    """One GGUF tensor: where it comes from and how it is stored."""

    name: str
    ref: TensorRef | None  # None: computed (rope_freqs)
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        return math.prod(gguf.quant_shape_to_byte_shape(self.shape, self.qtype))


def permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotate-half layout → llama.cpp's interleaved pairs (convert_hf_to_gguf's `permute`), rows per head."""
    rows = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, rows, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    rows = weight.shape[0] // heads // 2
    return weight.reshape(heads, rows, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def storage_type(shape: tuple[int, ...], qtype: str) -> gguf.GGMLQuantizationType:
    """1-D tensors (norms, biases) stay f32 as llama.cpp expects; q8_0 needs rows in blocks of 32, else f16."""
    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    if qtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[QTYPES["q8_0"]][0]:
        return gguf.GGMLQuantizationType.F16
    return QTYPES[qtype]


def plan_tensors(model_dir: Path, config, family: Family, qtype: str) -> list[Item]:
    refs = read_index(checkpoint_files(model_dir))
    names = gguf.get_tensor_name_map(family.arch, getattr(config, "num_hidden_layers", None) or config.n_layer)
    tied = getattr(config, "tie_word_embeddings", False)
    items, unknown = [], []
    for ref in refs:
        if ref.key.endswith(SKIPPED):
            continue
        name = names.get_name(ref.key, try_suffixes=(".weight", ".bias"))
        if name is None:
            unknown.append(ref.key)
            continue
        if name == "output.weight" and tied:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        shape = tuple(ref.shape[::-1]) if ref.key.endswith(family.conv1d) else tuple(ref.shape)
        items.append(Item(name, ref, shape, storage_type(shape, qtype)))
    if unknown:
        raise UserError(
            f"{model_dir}: tensors llama.cpp's {family.arch.name.lower()} graph has no place for: "
            f"{', '.join(unknown[:5])}; this variant of `{config.model_type}` cannot be exported"
        )
    found = {i.name for i in items}
    if "output.weight" not in found and not tied:
        raise UserError(f"{model_dir}: the checkpoint has no lm_head weight and its embeddings are not tied")
    if rope_parameters(config)["rope_type"] == "llama3" and family.rope_permute:
        items.append(Item("rope_freqs.weight", None, (head_dim(config) // 2,), gguf.GGMLQuantizationType.F32))
    return items


def rotary_heads(item: Item, config, family: Family) -> int | None:
    """The head count whose rows a q/k projection is permuted by, or None for every other tensor."""
    if family.rope_permute and item.name.endswith(("attn_q.weight", "attn_q.bias")):
        return config.num_attention_heads
    if family.rope_permute and item.name.endswith(("attn_k.weight", "attn_k.bias")):
        return config.num_key_value_heads or config.num_attention_heads
    return None


def gguf_tensor(item: Item, config, family: Family) -> torch.Tensor:
    """The fp32 tensor as llama.cpp reads it (before storage quantization)."""
    if item.ref is None:
        return llama3_rope_factors(config)
    tensor = read_tensor(item.ref).float()
    if item.ref.key.endswith(family.conv1d):
        return tensor.T.contiguous()
    heads = rotary_heads(item, config, family)
    return permute_rotary(tensor, heads) if heads else tensor


def stored(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    array = tensor.numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return array
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, qtype)


# ------------------------------------------------------------------------------------------------ tokenizer
# llama.cpp pre-tokenizer types by the regex tokenizer.json splits with (llama-vocab.cpp keeps its own copies).
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {
    GPT2_REGEX: "gpt-2",
    CONTRACTIONS + r"\p{N}{1,3}" + REST: "llama-bpe",  # Llama 3
    CONTRACTIONS + r"\p{N}" + REST: "qwen2",
}


def pre_tokenizer_steps(spec: dict | None) -> list[dict]:
    if not spec:
        return []
    return (
        [s for step in spec.get("pretokenizers", [spec]) for s in pre_tokenizer_steps(step)]
        if (spec["type"] == "Sequence")
        else [spec]
    )


def byte_level_pre(tokenizer_json: dict) -> str:
    """The llama.cpp pre-tokenizer that splits text as this byte-level BPE tokenizer does."""
    steps = pre_tokenizer_steps(tokenizer_json.get("pre_tokenizer"))
    regexes = [s["pattern"].get("Regex") or re.escape(s["pattern"]["String"]) for s in steps if s["type"] == "Split"]
    byte_level = [s for s in steps if s["type"] == "ByteLevel"]
    if any(s.get("add_prefix_space") for s in byte_level):
        raise UserError("tokenizer.json: byte-level BPE with add_prefix_space has no llama.cpp pre-tokenizer")
    regexes += [GPT2_REGEX for s in byte_level if s.get("use_regex", True)]
    kinds = {s["type"] for s in steps} - {"Split", "ByteLevel"}
    if len(regexes) != 1 or kinds or regexes[0] not in PRE_TOKENIZERS:
        found = regexes or sorted(kinds) or ["no pre-tokenizer"]
        raise UserError(
            f"tokenizer.json splits text with {found}; llama.cpp implements this pre-tokenization only for "
            f"{', '.join(sorted(set(PRE_TOKENIZERS.values())))}, so its tokens would differ"
        )
    return PRE_TOKENIZERS[regexes[0]]


def is_sentencepiece(tokenizer_json: dict) -> bool:
    """Llama 2 / Mistral tokenizers: SentencePiece BPE converted to tokenizer.json (byte fallback, ▁ for spaces)."""
    return tokenizer_json["model"]["type"] == "BPE" and bool(tokenizer_json["model"].get("byte_fallback"))


@dataclass
class Vocab:
    model: str  # llama.cpp tokenizer model: gpt2 (byte-level BPE) or llama (SentencePiece)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    pre: str | None = None
    add_space_prefix: bool | None = None


def vocab_of(model_dir: Path, tokenizer, n_vocab: int) -> Vocab:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{model_dir}: no tokenizer.json; GGUF export reads the fast tokenizer's definition")
    spec = json.loads(path.read_text())
    if len(tokenizer) > n_vocab:  # the model cannot embed them either: an id past its embeddings fails there too
        extra = tokenizer.convert_ids_to_tokens(list(range(n_vocab, len(tokenizer))))
        logger.warning("tokens past the model's %d embeddings are left out of the GGUF vocabulary: %s", n_vocab, extra)
    tokens, types = token_table(tokenizer, n_vocab)
    if not is_sentencepiece(spec):
        if spec["model"]["type"] != "BPE":
            raise UserError(f"tokenizer.json: a {spec['model']['type']} tokenizer; GGUF export handles BPE tokenizers")
        return Vocab("gpt2", tokens, types, pre=byte_level_pre(spec))
    byte = re.compile(r"<0x[0-9A-Fa-f]{2}>")
    types = [gguf.TokenType.BYTE if byte.fullmatch(t) else k for t, k in zip(tokens, types, strict=True)]
    unk = tokenizer.unk_token_id
    if unk is not None:
        types[unk] = gguf.TokenType.UNKNOWN
    return Vocab("llama", tokens, types, merge_scores(spec, tokens), add_space_prefix=prepends_space(spec))


def token_table(tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    """Token texts and types by id, as convert_hf_to_gguf's get_vocab_base writes them; ids past the tokenizer are
    padding rows of the embedding ([PADi], unused)."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added and (added[i].special or (token.startswith("<|") and token.endswith("|>"))):
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL)
        elif i in added:
            tokens.append(token.replace("\u2581", " "))  # llama.cpp matches user-defined tokens pre-normalized
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def merge_scores(spec: dict, tokens: list[str]) -> list[float]:
    """SentencePiece scores from the BPE merges: llama.cpp merges the adjacent pair whose result scores highest,
    HF the pair with the lowest merge rank; scoring each merge result by minus its first rank makes them agree."""
    rank = {}
    for i, pair in enumerate(spec["model"].get("merges", [])):
        left, right = pair.split(" ", 1) if isinstance(pair, str) else pair
        rank.setdefault(left + right, i)
    unreachable = -float(len(rank) + 1)
    return [-float(rank[t]) if t in rank else (0.0 if len(t) == 1 else unreachable) for t in tokens]


def prepends_space(spec: dict) -> bool:
    steps = pre_tokenizer_steps(spec.get("pre_tokenizer"))
    meta = [s for s in steps if s["type"] == "Metaspace"]
    if meta:
        return meta[0].get("prepend_scheme", "always") != "never" and meta[0].get("add_prefix_space", True)
    normalizer = spec.get("normalizer") or {}
    parts = normalizer.get("normalizers", [normalizer])
    return any(p.get("type") == "Prepend" for p in parts)


def adds_specials(tokenizer) -> tuple[bool, bool]:
    """Whether encoding a text puts bos in front and eos at the end."""
    plain = tokenizer("a", add_special_tokens=False).input_ids
    ids = tokenizer("a").input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(ids) > len(plain) and ids[0] == bos
    add_eos = eos is not None and len(ids) > len(plain) and ids[-1] == eos
    return add_bos, add_eos


def write_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, tokenizer, n_vocab: int, eot: int | None) -> Vocab:
    vocab = vocab_of(model_dir, tokenizer, n_vocab)
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    # Merges, bos/eos/unk/pad ids, add_bos/add_eos and the chat template, read as llama.cpp's converter reads them.
    special = gguf.SpecialVocab(model_dir, load_merges=vocab.model == "gpt2", n_vocab=n_vocab)
    special.chat_template = without_generation_tags(special.chat_template)
    special.add_to_gguf(writer, quiet=True)
    # Whether bos/eos are added comes from what the tokenizer does: when the key is absent, llama.cpp guesses by
    # tokenizer type (bos for SentencePiece and Llama 3, none for GPT-2), which need not be what this tokenizer does.
    add_bos, add_eos = adds_specials(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    if eot is not None:
        writer.add_eot_token_id(eot)
    return vocab


# TRL's assistant-only loss reads `{% generation %}` blocks, a transformers extension of Jinja that plain Jinja2 and
# llama.cpp's template engine reject; the exported template is the same template without them.
GENERATION_TAG = re.compile(r"\{%([-+]?)\s*(?:end)?generation\s*([-+]?)%\}")


def without_generation_tags(template: str | list | None) -> str | list | None:
    """The chat template (or gguf's list of named templates) without generation tags, rendering the same text."""
    if isinstance(template, list):
        return [{**t, "template": without_generation_tags(t["template"])} for t in template]
    if not template:
        return template
    out, rest = [], 0
    for tag in GENERATION_TAG.finditer(template):
        out.append(trimmed_before(template, rest, tag))
        rest = after_trim(template, tag)
    return "".join(out) + template[rest:]


def trimmed_before(template: str, start: int, tag: re.Match) -> str:
    """The text from `start` to the tag, less what the tag's left side trims: all whitespace with `{%-`; with a plain
    `{%`, the spaces before it on its own line (transformers renders with lstrip_blocks, as llama.cpp does)."""
    text, left = template[start : tag.start()], tag.group(1)
    if left == "-":
        return text.rstrip()
    line = template[: tag.start()].rpartition("\n")[2]
    return text.rstrip(" \t") if not left and not line.strip(" \t") else text


def after_trim(template: str, tag: re.Match) -> int:
    """Where the text after the tag resumes: past all whitespace with `-%}`, past one newline with a plain `%}`
    (trim_blocks)."""
    end, right = tag.end(), tag.group(2)
    if right == "-":
        return len(template) - len(template[end:].lstrip())
    return end + 1 if not right and template.startswith("\n", end) else end


# ------------------------------------------------------------------------------------------------ Ollama Modelfile
@dataclass
class Turns:
    """A chat template seen as fixed text around each message, which is what an Ollama TEMPLATE can express."""

    head: str
    system: tuple[str, str] | None  # (before, after) the content; None: the template takes no system message
    user: tuple[str, str]
    assistant: tuple[str, str]

    def render(self, messages: list[dict], generation_prompt: bool = True) -> str:
        """What the Go template written by `go_template` renders (used to check it against the chat template)."""
        text = self.head
        for i, message in enumerate(messages):
            before, after = getattr(self, message["role"])
            last = i == len(messages) - 1
            text += before + message["content"] + ("" if last and message["role"] == "assistant" else after)
        return text + (self.assistant[0] if generation_prompt and messages[-1]["role"] == "user" else "")


SENTINELS = {"system": "QPSYSTEMQP", "user": "QPUSERQP", "assistant": "QPASSISTANTQP", "user2": "QPUSERTWOQP"}


def render(tokenizer, roles: list[str], generation_prompt: bool) -> str:
    messages = [{"role": r.rstrip("2"), "content": SENTINELS[r]} for r in roles]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def cut_is_clean(text: str, cut: int, specials: list[str]) -> bool:
    """Whether position `cut` of `text` falls outside every special token in it (<|im_end|> is never split)."""
    return not any(m.start() < cut < m.end() for t in specials for m in re.finditer(re.escape(t), text))


def common_suffix(a: str, b: str, specials: list[str]) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    while n and not (cut_is_clean(a, len(a) - n, specials) and cut_is_clean(b, len(b) - n, specials)):
        n -= 1
    return a[len(a) - n :]


def common_prefix(a: str, b: str, specials: list[str]) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    while n and not (cut_is_clean(a, n, specials) and cut_is_clean(b, n, specials)):
        n -= 1
    return a[:n]


def split_turns(tokenizer) -> Turns | None:
    """Read the text around each message off a render of a sentinel conversation; None when it is not fixed text.
    Only the sums (user after + assistant before, assistant after + user before) are fixed by the render; they are
    split where the end-of-turn text is shared, which renders the same either way."""
    s = SENTINELS
    try:
        chat = render(tokenizer, ["user", "assistant", "user2"], True)
    except Exception:  # a template that cannot render a plain conversation (a jinja error is the template's own)
        return None
    parts = re.split("|".join((s["user"], s["assistant"], s["user2"])), chat)
    if len(parts) != 4 or parts[1] != parts[3]:
        return None
    specials = special_texts(tokenizer)
    user_before = common_suffix(parts[0], parts[2], specials)
    head = parts[0][: len(parts[0]) - len(user_before)]
    assistant_after = parts[2][: len(parts[2]) - len(user_before)]
    user_after = common_prefix(parts[1], assistant_after, specials)
    assistant = (parts[1][len(user_after) :], assistant_after)
    return Turns(head, system_turn(tokenizer, head, user_before), (user_before, user_after), assistant)


def special_texts(tokenizer) -> list[str]:
    return sorted({*tokenizer.all_special_tokens, *tokenizer.get_added_vocab()}, key=len, reverse=True)


def system_turn(tokenizer, head: str, user_before: str) -> tuple[str, str] | None:
    try:
        text = render(tokenizer, ["system", "user"], False)
    except Exception:  # templates that refuse a system message
        return None
    before, _, rest = text.partition(SENTINELS["system"])
    between = rest.partition(SENTINELS["user"])[0]
    if not before.startswith(head) or not between.endswith(user_before):
        return None
    return before[len(head) :], between[: len(between) - len(user_before)]


CHECK_CONVERSATIONS = (
    ["user"],
    ["user", "assistant", "user2"],
    ["system", "user"],
    ["system", "user", "assistant", "user2"],
)


def checked_turns(tokenizer) -> tuple[Turns | None, list[str]]:
    """The turns, and the conversations (by roles) whose Go-template rendering matches the chat template exactly."""
    turns = split_turns(tokenizer)
    if turns is None:
        return None, []
    passed = []
    for roles in CHECK_CONVERSATIONS:
        if "system" in roles and turns.system is None:
            continue
        messages = [{"role": r.rstrip("2"), "content": SENTINELS[r]} for r in roles]
        if turns.render(messages) == render(tokenizer, roles, True):
            passed.append("+".join(r.rstrip("2") for r in roles))
    if "user" not in passed or "user+assistant+user" not in passed:
        return None, passed
    if turns.system is not None and len(passed) < len(CHECK_CONVERSATIONS):
        turns.system = None  # system prompts that the template folds into a turn: leave them out, documented
    return turns, passed


def go_literal(text: str) -> str:
    """Fixed text as a Go template action, so that `{{-` trimming and braces in the text cannot change it."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def go_template(turns: Turns) -> str:
    """Ollama's Messages form (as its own llama3/chatml templates are written)."""
    lines = [go_literal(turns.head), "{{- range $i, $_ := .Messages }}"]
    lines.append("{{- $last := eq (len (slice $.Messages $i)) 1 }}")
    branches = [("system", turns.system), ("user", turns.user), ("assistant", turns.assistant)]
    keyword = "if"
    for role, parts in branches:
        if parts is None:
            continue
        before, after = parts
        if role == "assistant":
            body = f"{go_literal(before)}{{{{ .Content }}}}{{{{ if not $last }}}}{go_literal(after)}{{{{ end }}}}"
        elif role == "user":
            body = f"{go_literal(before)}{{{{ .Content }}}}{go_literal(after)}"
            body += f"{{{{ if $last }}}}{go_literal(turns.assistant[0])}{{{{ end }}}}"
        else:
            body = f"{go_literal(before)}{{{{ .Content }}}}{go_literal(after)}"
        lines.append(f'{{{{- {keyword} eq .Role "{role}" }}}}{body}')
        keyword = "else if"
    lines += ["{{- end }}", "{{- end }}"]
    return "\n".join(lines)


def stop_words(tokenizer, turns: Turns | None) -> list[str]:
    """The eos token, and the special tokens that end an assistant turn."""
    words = [tokenizer.eos_token] if tokenizer.eos_token else []
    if turns is not None:
        words += [t for t in special_texts(tokenizer) if t in turns.assistant[1] and t not in words][:2]
    return words


def end_of_turn(tokenizer, turns: Turns | None) -> int | None:
    """The token that ends an assistant turn when it is not eos (<|im_end|>, <|eot_id|>)."""
    for word in stop_words(tokenizer, turns)[1:]:
        return tokenizer.convert_tokens_to_ids(word)
    return None


def strip_bos(turns: Turns | None, tokenizer, add_bos: bool) -> Turns | None:
    """llama.cpp and Ollama put bos in front themselves when the GGUF says add_bos; the template must not repeat it."""
    if turns is not None and add_bos and tokenizer.bos_token and turns.head.startswith(tokenizer.bos_token):
        turns.head = turns.head[len(tokenizer.bos_token) :]
    return turns


def modelfile(gguf_name: str, turns: Turns | None, stops: list[str]) -> str:
    lines = [f"FROM ./{gguf_name}"]
    if turns is not None:
        lines.append('TEMPLATE """' + go_template(turns) + '"""')
    lines += [f"PARAMETER stop {json.dumps(word, ensure_ascii=False)}" for word in stops]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ writing
def write_gguf(path: Path, model_dir: Path, config, tokenizer, qtype: str, items: list[Item], name: str) -> dict:
    """Stream the checkpoint into one GGUF file: metadata first, then each tensor as it is read."""
    family = family_of(config)
    if sliding_window(config):
        logger.warning(
            "llama.cpp runs Mistral on its llama graph, which attends to the whole context: beyond the sliding window "
            "of %d tokens the GGUF model computes differently from this one",
            sliding_window(config),
        )
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[family.arch])
    writer.add_name(name)
    write_hyperparameters(writer, config, qtype)
    turns, passed = checked_turns(tokenizer) if tokenizer.chat_template else (None, [])
    vocab = write_tokenizer(writer, model_dir, tokenizer, config.vocab_size, end_of_turn(tokenizer, turns))
    for item in items:
        writer.add_tensor_info(item.name, item.shape, np.dtype(np.float32), item.nbytes, raw_dtype=item.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    total = sum(i.nbytes for i in items)
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing gguf", dynamic_ncols=True) as bar:
        for item in items:
            writer.write_tensor_data(stored(gguf_tensor(item, config, family), item.qtype))
            bar.update(item.nbytes)
    writer.close()
    types = sorted({i.qtype.name.lower() for i in items})
    return {
        "tensors": len(items),
        "tensor_types": types,
        "vocab": vocab,
        "turns": turns,
        "template_checks": passed,
        "sliding_window": sliding_window(config),
    }


# ------------------------------------------------------------------------------------------------ verification
CONFIG_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "layer_norm_epsilon",
    "tie_word_embeddings",
)


def read_back_config(path: Path, config) -> list[str]:
    """Hyper-parameters that transformers' GGUF reader recovers differently from the merged model's config."""
    back = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    wrong = []
    if config.model_type == "gpt2":  # the reader maps context_length to n_ctx, not to n_positions
        back.n_positions = back.to_dict().get("n_ctx", back.n_positions)
    for key in CONFIG_KEYS:
        want, got = getattr(config, key, None), getattr(back, key, None)
        if want is not None and got is not None and not math.isclose(float(want), float(got), rel_tol=1e-6):
            wrong.append(f"{key}: {want} → {got}")
    theta = rope_parameters(config)["rope_theta"], rope_parameters(back)["rope_theta"]
    if config.model_type != "gpt2" and not math.isclose(*theta, rel_tol=1e-6):
        wrong.append(f"rope_theta: {theta[0]} → {theta[1]}")
    return wrong


def sliding_window(config) -> int | None:
    """Mistral's attention window, which llama.cpp's llama graph does not apply (it attends to the whole context)."""
    window = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
    return window if window and window < config.max_position_embeddings else None


def reader_config(config):
    """The config transformers reads the file with: gguf-py has no `mistral` architecture, so a Mistral file reads as
    the Llama it is in llama.cpp (same weights, whole-context attention)."""
    if config.model_type != "mistral":
        return config
    dropped = ("model_type", "sliding_window", "architectures", "transformers_version")
    return LlamaConfig(**{k: v for k, v in config.to_dict().items() if k not in dropped})


def verify_full(path: Path, model_dir: Path, config, prompts: list[torch.Tensor]) -> dict:
    """Logits of the file as transformers reads it back vs the merged model, both computing in fp32."""
    window = sliding_window(config)
    prompts = [p[:window] for p in prompts] if window else prompts  # beyond the window the two differ by design
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    expected = logits_on(reference, prompts)
    del reference
    loaded = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, config=reader_config(config), dtype=torch.float32
    )
    figures = compare(expected, logits_on(loaded, prompts))
    return {**figures, "config_mismatches": read_back_config(path, config)}


def verify_tensors(path: Path, items: list[Item], config) -> dict:
    """Each tensor read back from the file, its layout undone, against the checkpoint (memory: one tensor)."""
    family = family_of(config)
    items = {i.name: i for i in items}
    worst, worst_name = 0.0, None
    # The reader gives names, types and offsets; the bytes are read one tensor at a time, because its memory map
    # would keep every page it touched resident (the whole file, by the end).
    with path.open("rb") as f:
        for tensor in tqdm(gguf.GGUFReader(path).tensors, desc="reading back", dynamic_ncols=True):
            item = items[tensor.name]
            if item.ref is None:
                continue
            f.seek(tensor.data_offset)
            raw = np.frombuffer(f.read(int(tensor.n_bytes)), dtype=np.uint8).reshape(item.shape[0], -1)
            got = torch.from_numpy(gguf.quants.dequantize(raw, tensor.tensor_type).astype(np.float32))
            got = checkpoint_layout(got.reshape(item.shape), item, config, family)
            want = read_tensor(item.ref).float()
            error = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
            if error >= worst:
                worst, worst_name = error, item.ref.key
    return {"max_tensor_relative_error": worst, "worst_tensor": worst_name, "tensors": len(items)}


def checkpoint_layout(tensor: torch.Tensor, item: Item, config, family: Family) -> torch.Tensor:
    """gguf_tensor undone: the layout the checkpoint stores."""
    if item.ref.key.endswith(family.conv1d):
        return tensor.T
    heads = rotary_heads(item, config, family)
    return unpermute_rotary(tensor, heads) if heads else tensor


def judge(verify: str, figures: dict, qtype: str) -> tuple[dict, bool]:
    if verify == "tensors":
        limits = {"max_tensor_relative_error": TENSOR_LIMITS[qtype]}
        return limits, figures["max_tensor_relative_error"] <= limits["max_tensor_relative_error"]
    limits = {k: v for k, v in LIMITS[qtype].items() if v is not None}
    ok = figures["top1_agreement"] >= limits["top1_agreement"] and not figures["config_mismatches"]
    if "relative_error" in limits:
        ok = ok and figures["relative_error"] <= limits["relative_error"]
    return limits, ok


def probe_prompts(source: Source, tokenizer) -> list[torch.Tensor]:
    """Held-out examples of the run (as training tokenized them); for a bare model, fixed texts and a chat turn."""
    if source.recipe is not None:
        return report_prompts(source.recipe, tokenizer)
    texts = list(PROBE_TEXTS)
    if tokenizer.chat_template:
        chat = [{"role": "user", "content": "Name three primary colours."}]
        texts.append(tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    return [tokenizer(t, return_tensors="pt", add_special_tokens=False).input_ids[0] for t in texts]


def choose_verify(verify: str, items: list[Item]) -> str:
    """`auto`: whole models when the merged model and the read-back copy (fp32) fit in half the free RAM."""
    if verify != "auto":
        return verify
    params = sum(math.prod(i.shape) for i in items)
    return "full" if fits_in_half_the_free_ram(2 * 4 * params) else "tensors"


# ------------------------------------------------------------------------------------------------ entry point
@dataclass
class Source:
    """What is exported: a merged (or plain) model directory, and the run behind it when there is one."""

    model_dir: Path
    run_dir: Path | None = None
    recipe: Recipe | None = None


def resolve_source(path: Path) -> Source:
    """A run (merged first when it has no merge yet), a merged directory, or a plain model directory."""
    if not path.is_dir():
        raise UserError(f"{path}: not a directory; give a run, a merged model or a model directory")
    stage = read_manifest(path).get("stage") if (path / MANIFEST).is_file() else None
    if stage in RUN_STAGES:
        run = load_run(path)
        if not (path / MERGED / MANIFEST).is_file():
            logger.info("%s has no verified merge yet: merging first", path)
            merge(path)
        return Source(path / MERGED, path, run.recipe)
    if stage == "merge":
        run_dir = Path(read_manifest(path)["source_run"])
        recipe = load_run(run_dir).recipe if (run_dir / MANIFEST).is_file() else None
        return Source(path, run_dir, recipe)
    if stage is not None:
        raise UserError(f"{path}: the output of `qlora-pipe {stage}`; export takes a run, merged or model directory")
    if (path / "adapter_config.json").is_file():
        raise UserError(f"{path}: a LoRA adapter; export the run it belongs to (merged first), or a merged model")
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no config.json and no manifest.json; it is neither a run nor a model directory")
    return Source(path)


def default_out(source: Source, qtype: str) -> Path:
    if source.run_dir is not None:
        return source.run_dir / EXPORT_DIR / f"{source.run_dir.name}-{qtype}.gguf"
    name = source.model_dir.resolve().name
    return source.model_dir.resolve().parent / f"{name}-gguf" / f"{name}-{qtype}.gguf"


def check_out(out: Path) -> None:
    if out.suffix != ".gguf":
        raise UserError(f"--out {out}: give a file name ending in .gguf")
    manifest = out.parent / MANIFEST
    if manifest.is_file() and read_manifest(out.parent).get("stage") != "export":
        raise UserError(f"--out {out}: {out.parent} holds another stage's output; write the GGUF file elsewhere")


def check_causal_lm(config, source: Source) -> None:
    heads = config.architectures or []
    if source.recipe is not None and source.recipe.task == "seq_cls" or any("Classification" in a for a in heads):
        raise UserError(f"{source.model_dir}: a classifier; GGUF export covers causal language models")


def export(
    path: str | Path,
    *,
    fmt: str = "gguf",
    qtype: str = "f16",
    out: str | Path | None = None,
    verify: str = "auto",
) -> Path:
    """Write one GGUF file (default RUN_DIR/gguf/RUN-TYPE.gguf), with a Modelfile, export_report.json and
    manifest.json beside it; the file replaces any earlier one only after it has been read back and passed."""
    if fmt != "gguf" or qtype not in GGUF_TYPES:
        raise UserError(f"export: format gguf with --type {'|'.join(GGUF_TYPES)} (got {fmt}, {qtype})")
    source = resolve_source(Path(path))
    out = Path(out) if out else default_out(source, qtype)
    check_out(out)
    config = AutoConfig.from_pretrained(source.model_dir)
    check_causal_lm(config, source)
    items = plan_tensors(source.model_dir, config, family_of(config), qtype)
    tokenizer = load_tokenizer(str(source.model_dir))
    verify = choose_verify(verify, items)
    check_disk(out, sum(i.nbytes for i in items) + (64 << 20))  # and the tokenizer, a few MB
    tmp = out.with_name(f".{out.name}.tmp")
    started = time.perf_counter()
    try:
        written = write_gguf(tmp, source.model_dir, config, tokenizer, qtype, items, name=out.stem)
        report = entry(written, qtype, tmp, time.perf_counter() - started, verify)
        if verify != "none":
            report |= check_file(tmp, source, config, tokenizer, items, qtype, verify)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if verify != "none" and not report["passed"]:
        tmp.unlink()
        record(out, source, report, written, tokenizer)
        raise UserError(
            f"the GGUF file does not compute what {source.model_dir} computes ({report['figures']} against "
            f"{report['limits']}); nothing was written but {out.parent / EXPORT_REPORT}"
        )
    os.replace(tmp, out)
    record(out, source, report, written, tokenizer)
    return out


def entry(written: dict, qtype: str, path: Path, seconds: float, verify: str) -> dict:
    vocab, turns = written["vocab"], written["turns"]
    return {
        "type": qtype,
        "bytes": path.stat().st_size,
        "write_seconds": round(seconds, 2),
        "tensors": written["tensors"],
        "tensor_types": written["tensor_types"],
        "tokenizer": {"model": vocab.model, "pre": vocab.pre, "tokens": len(vocab.tokens)},
        "ollama_template": {
            "written": turns is not None,
            "system_messages": turns is not None and turns.system is not None,
            "matches_chat_template_on": written["template_checks"],
        },
        "verify": verify,
        "sliding_window_not_applied": written["sliding_window"],
    }


def check_file(path: Path, source: Source, config, tokenizer, items: list[Item], qtype: str, verify: str) -> dict:
    if verify == "full":
        figures = verify_full(path, source.model_dir, config, probe_prompts(source, tokenizer))
        reference = "merged model vs the GGUF read back by transformers, fp32 logits on held-out examples"
    else:
        figures = verify_tensors(path, items, config)
        reference = "each tensor read back by gguf's reader vs the merged checkpoint"
    limits, passed = judge(verify, figures, qtype)
    return {"reference": reference, "figures": figures, "limits": limits, "passed": passed}


def record(out: Path, source: Source, report: dict, written: dict, tokenizer) -> None:
    """The Modelfile for the newest file, and the report and manifest of every file in the directory."""
    path = out.parent / EXPORT_REPORT
    reports = json.loads(path.read_text()) if path.is_file() else {}
    reports[out.name] = report
    write_json(path, reports)
    if not report.get("passed", True):
        return
    turns = strip_bos(written["turns"], tokenizer, adds_specials(tokenizer)[0])
    (out.parent / MODELFILE).write_text(modelfile(out.name, turns, stop_words(tokenizer, written["turns"])))
    files = {name: r for name, r in reports.items() if (out.parent / name).is_file() and r.get("passed", True)}
    write_manifest(
        out.parent,
        "export",
        source=str(source.model_dir.resolve()),
        source_run=str(source.run_dir.resolve()) if source.run_dir else None,
        format="gguf",
        files=files,
        modelfile={"from": out.name},
    )
