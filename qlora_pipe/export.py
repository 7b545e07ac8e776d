"""Export stage: a merged model as one GGUF file for llama.cpp, Ollama and LM Studio, an Ollama Modelfile beside it,
and the proof that the file computes what the merged model computes.

Why our own converter, on the `gguf` package (the llama.cpp authors' writer, reader, tensor-name map, special-token
reader and quantizers): llama.cpp's convert_hf_to_gguf.py pins transformers 4.x, so it needs an environment of its own,
and it recognises a BPE tokenizer only by the hash of its output on a test text, so a retrained or extended tokenizer
stops it. We choose the llama.cpp pre-tokenizer by that hash too, and where the hash is unknown by the splitting rule
itself (the pre-tokenizer's regexes in tokenizer.json), which also cross-checks a hash match. Hyper-parameters and
tensor layouts are written as the converter writes them for each supported family. Tensors stream one at a time, and
every export is read back.
"""

from __future__ import annotations

import hashlib
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
# llama.cpp's converter names a byte-level BPE pre-tokenizer by the sha256 of the ids the model's tokenizer gives for
# this text, looked up in a table of known tokenizers. Text and table are copied from get_vocab_base_pre in llama.cpp's
# conversion/base.py as vendored in llama-cpp-python 0.3.36: every entry whose name that version's llama-vocab.cpp
# accepts, less the encoders' (BERT, RoBERTa, Jina, Granite embeddings), which a causal-LM export never carries.
LLAMA_CPP_VERSION = "0.3.36"
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multip"
    "le emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 "
    "3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Българс"
    "ки ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, '"
    "RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZER_HASHES = {  # hash -> pre-tokenizer name, with the model the converter's table took it from
    "b6e8e1518dc4305be2fe39c313ed643381c4da5db34a98f6a04c093f8afbe99b": "chatglm-bpe",  # glm-4-9b-chat
    "81d72c7348a9f0ebe86f23298d37debe0a5e71149e29bd283904c02262b27516": "chatglm-bpe",  # glm-4-9b-chat
    "a1336059768a55c99a734006ffb02203cd450fed003e9a71886c88acf24fdbc2": "glm4",  # glm-4-9b-hf
    "9ca2dd618e8afaf09731a7cf6e2105b373ba6a1821559f258b272fe83e6eb902": "glm4",  # GLM-4.5-Air
    "cdf5f35325780597efd76153d4d1c16778f766173908894c04afc20108536267": "glm4",  # GLM-4.7-Flash
    "1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35": "minerva-7b",  # Minerva-7B-base-v1.0
    "7e57df22b1fe23a7b1e1c7f3dc4e3f96d43a4eb0836d0c6bdc3436d7b2f1c664": "hunyuan",  # Hunyuan-A13B-Instruct
    "bba3b3366b646dbdded5dbc42d59598b849371afc42f7beafa914afaa5b70aa6": "hunyuan-dense",  # Hunyuan-4B-Instruct
    "e6ddf9c6686791c12d698d34c31ab9be1fea9af5a3d9a6909783ab382198ae1c": "hy_v4",  # Hy4-preview
    "a6b57017d60e6edb4d88ecc2845188e0eb333a70357e45dcc9b53964a73bbae6": "falcon-h1",  # Falcon-H1-0.5B-Base
    "60476e1243776c4fb1b993dbd7a5f15ac22f83c80afdf425fa5ae01c8d44ef86": "falcon-h1",  # Falcon-H1-1B-Base
    "3eda48b4c4dc7de733d1a8b3e3b4a85243dbbf704da2ee9d42c6beced8897896": "falcon-h1",  # Falcon-H1-7B-Base
    "48f8e02c0359c0bbdd82f26909171fac1c18a457bb47573ed1fe3bbb2c1cfd4b": "falcon-h1",  # Falcon-H1-34B-Base
    "81212dc7cdb7e0c1074ca62c5aeab0d43c9f52b8a737be7b12a777c953027890": "kimi-k2",  # Kimi-K2-Base
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding-0.6B
    "1444df51289cfa8063b96f0e62b1125440111bc79a52003ea14b6eac7016fd5f": "qwen35",  # MiniCPM-V-4_6
    "66b8d4e19ab16c3bfd89bce5d785fb7e0155e8648708a1f42077cb9fe002c273": "grok-2",  # grok-2-tokenizer
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",  # ruGPT3XL
    "9e454714343b69b99b71795c1d27a68c2a1d15dab111f4d353109f966af29da7": "lfm2",  # LFM2.5-8B-A1B
    "846deafc5b0fa786186fa4ae6c7b49903cf2f1d1895bdb80b9120d60be135252": "gemma4",  # DFM-Mimir
    "0a766d034107bc736a3f2dc4968fd62e54a3570f1454443e0c5a4cc6bd7941ed": "spark2_5",  # Spark-X2.5-1.7B
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",  # deepseek-llm-7b-base
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",  # deepseek-coder-6.7b-base
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",  # falcon-7b
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",  # Falcon3-7B-Base
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",  # OLMo-1.7-7B-hf, mpt-7b
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",  # starcoder2-3b
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # gpt2
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",  # stablelm-2-zephyr-1_6b
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",  # Refact-1_6-base
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",  # c4ai-command-r-v01
    "d772b220ace2baec124bed8cfafce0ead7d6c38a4b65ef11261cf9d5d62246d1": "tiny_aya",  # tiny-aya-base
    "52df12b4c8d4176e7481aab4b6e8454d1fd0a210a04a574f6d4e067d10e23c3e": "cohere2moe",  # North-Mini-Code-1.0
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5-7B
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",  # dbrx-base
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Smaug-Llama-3-70B-Instruct
    "c7ea5862a53e4272c035c8238367063e2b270d51faa48c0f09e9d5b54746c360": "poro-chat",  # Poro-34B-chat
    "7fc505bd3104ca1083b150b17d088b59534ede9bde81f0dd2090967d7fe52cee": "viking",  # Viking-7B
    "b53802fb28e26d645c3a310b34bfe07da813026ec7c7716883404d5e0f8b1901": "jais",  # jais-13b
    "bc5108ee1eb6a3d600cadd065f63190fbd0554dbc9e4bbd6a0d977970afc8d2a": "jais-2",  # Jais-2-8B-Chat
    "7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f": "codeshell",  # CodeShell-7B
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo-Base-2407
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM-135M
    "3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7": "bloom",  # bloom
    "bc01ce58980e1db43859146dc51b1758b3b88729b217a74792e9f8d43e479d21": "gpt3-finnish",  # gpt3-finnish-small
    "4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae": "exaone",  # EXAONE-3.0-7.8B-Instruct
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",  # phi-2
    "60824e3c0d9401f89943cbb2fff727f0e2d4c545ba4df2d6e4f09a6db0f5b450": "chameleon",  # chameleon-7b
    "ad851be1dba641f2e3711822f816db2c265f788b37c63b4e1aeacb9ee92de8eb": "gigachat",  # GigaChat-20B-A3B-instruct
    "d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1": "megrez",  # Megrez-3B-Instruct
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",  # DeepSeek-V3
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",  # R1-Distill-Qwen-1.5B
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",  # gpt-4o
    "7dec86086fcc38b66b7bc1575a160ae21cf705be7718b9d5598190d7c12db76f": "superbpe",  # OLMo2-8B-SuperBPE-t180k
    "1994ffd01900cfb37395608534236ecd63f2bd5995d6cb1004dda1af50240f15": "trillion",  # Trillion-7B-preview
    "96a5f08be6259352137b512d4157e333e21df7edd3fcd152990608735a65b224": "bailingmoe",  # Ling-lite
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",  # Llama-4-Scout-17B-16E-Instruct
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",  # pixtral-12b
    "d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec": "seed-coder",  # Seed-Coder-8B-Base
    "b0a6b1c0bd5998ebd9df08611efde34a4ff03faed45ae09c43e6b31ebd4b94cf": "a.x-4.0",  # A.X-4.0
    "f6791d196f87ce6b56a7d234be618e0d58f8cda3549416635b2bebcd22cd95c4": "midm-2.0",  # Midm-2.0-Base-Instruct
    "169bf0296a13c4d9b7672313f749eb36501d931022de052aad6e36f2bf34dd51": "lfm2",  # LFM2.5-350M
    "2085e1638f6c377a0aa4ead21b27bb4cb941bf800df86ed391011769c1758dfb": "exaone4",  # EXAONE-4.0-32B
    "a1e163ecab2e718a4c829d1148b6e86824ec36163bb71941c3dca9cd5ac25756": "mellum",  # Mellum-4b-base
    "49fc0303c9e0d2c2c565c510f64b2d9b271276acdcdadff733249eda9f7d59df": "afmoe",  # Trinity-Tokenizer
    "9b1be57e70d20d9501b2b3186e792d81181ae36ada3903c26f9fea418cf87206": "bailingmoe2",  # Ling-mini-base-2.0
    "53e325976a6e142379c19b09afcae354f2f496f147afa8f9e189a33fe4e3024e": "granite-docling",  # granite-docling-258M
    "f4f37b6c8eb9ea29b3eac6bb8c8487c5ab7885f8d8022e67edc1c68ce8403e95": "minimax-m2",  # MiniMax-M2
    "4a2e2abae11ca2b86d570fc5b44be4d5eb5e72cc8f22dd136a94b37da83ab665": "kormo",  # KORMo-tokenizer
    "9d70134b369a70e5735009b6de918f7581b5211f7c074d1f89f753aea8248af1": "youtu",  # Youtu-LLM-2B
    "16389f0a1f51ee53e562ffd51c371dc508639ab0e4261502071836e50e223e91": "solar-open",  # Solar-Open-100B
    "6c81ce329e0802883b22eabab0d3fa48357337ef1ecb45443828bf1f6254833f": "exaone-moe",  # K-EXAONE-236B-A23B
    "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4": "qwen35",  # Qwen3.5-9B-Instruct
    "b4b8ca1f9769494fbd956ebc4c249de6131fb277a4a3345a7a92c7dd7a55808d": "joyai-llm",  # JoyAI-LLM-Flash
    "e4d54df1ebc1f2b91acd986c5b51aa50837d5faf7c7398e73c1f9e9ee5d19869": "kanana2",  # kanana-2-30b-a3b-instruct-2601
    "862f827721df956049dff5ca81a57f29e575280bc622e290d3bf4e35eca29015": "f2llmv2",  # F2LLM-v2-4B
    "62f6fb0a6fd5098caeabb19b07a5c1099cafc8b9c40eab6ea89ece4ec02fbc57": "sarvam-moe",  # sarvam-30b
    "f728162c1315c26e40249849799b4ba3fe584c32084b4795b03eb295e63cb5af": "talkie",  # talkie-1930-13b-it-hf
    "36f3066e97b7f3994b379aaacde306c1444c6ae84e81a5ae3cd2b7ed3b8c42d4": "minicpm5",  # MiniCPM5-1B
    "9dcf830ee9990cdbf78cc523a5f7bd9ad8f3f9890c2d3581d2785ad10f07049d": "mellum2",  # Mellum2-12B-A2.5B-Base
    "972da7b59cec44d1f0a490a86c96df53859e486e481563e5dddac155013d87ac": "laguna",  # Laguna-XS.2
    "653660222fb704f61cbf2b618a8ae6502b7f8b20c980f9a5de07ed78e13319cd": "ufakzeka",  # ufakzeka-1
}

# The splitting rules llama-vocab.cpp 0.3.36 implements, as tokenizer.json writes them (one regex per step), and the
# names llama.cpp splits with each rule (they differ in flags). A tokenizer the table does not know (retrained or
# extended) is exported by its rule; one it knows is cross-checked against its rule.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?"
REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = CONTRACTIONS + r"\p{L}+|\p{N}{1,3}" + REST
QWEN2_REGEX = CONTRACTIONS + r"\p{L}+|\p{N}" + REST
QWEN35_REGEX = CONTRACTIONS + r"[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
DIGIT = r"\p{N}"  # tokenizer.json's Digits(individual_digits=True), as llama.cpp writes it
# DeepSeek LLM's and Coder's and Falcon's splits: several regexes in turn, as their tokenizer.json and llama-vocab.cpp
# write them (DeepSeek LLM's letters are a list of ranges, copied).
DEEPSEEK_LETTERS = (
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-"
    "ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ"
    "-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+"
)
DEEPSEEK_LLM = ("[\r\n]", DEEPSEEK_LETTERS, "\\s?[!-/:-~！-／：-～‘-‟　-。]+", r"\s+$", "[一-龥ࠀ-一가-퟿]+", r"\p{N}+")
DEEPSEEK_CODER = ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", r"\p{N}")
FALCON = (r"[\p{P}\$\+<=>\^~\|`]+", GPT2_REGEX.removesuffix("|\\s+"), "[0-9][0-9][0-9]")
SPLITS = {
    (GPT2_REGEX,): (
        *("gpt-2", "phi-2", "gigachat", "a.x-4.0", "mellum", "exaone4"),
        *("mpt", "olmo", "jais", "trillion", "granite-docling"),
    ),
    (LLAMA3_REGEX,): (
        *("llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
        *("smaug-bpe", "dbrx", "chatglm-bpe", "glm4"),
    ),
    (QWEN2_REGEX,): ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open"),
    (QWEN35_REGEX,): ("qwen35",),
    (DIGIT, GPT2_REGEX): (
        *("smollm", "starcoder", "refact", "command-r"),
        *("codeshell", "exaone", "minerva-7b", "mellum2"),
    ),
    DEEPSEEK_LLM: ("deepseek-llm",),
    DEEPSEEK_CODER: ("deepseek-coder",),
    FALCON: ("falcon",),
}
# Names for which llama.cpp takes a word that is itself a token whole, without merging (tokenizer.json's
# `ignore_merges`): among names of one rule, the one whose flag matches the tokenizer's is chosen.
IGNORES_MERGES = {"llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "glm4"}


def pre_tokenizer_steps(spec: dict | None) -> list[dict]:
    if not spec:
        return []
    return (
        [s for step in spec.get("pretokenizers", [spec]) for s in pre_tokenizer_steps(step)]
        if (spec["type"] == "Sequence")
        else [spec]
    )


def split_rule(tokenizer_json: dict) -> tuple[str, ...] | None:
    """The regexes this byte-level tokenizer splits text with, in order; None when a step is not such a split."""
    rule, byte_level = [], False
    for step in pre_tokenizer_steps(tokenizer_json.get("pre_tokenizer")):
        kind = step["type"]
        if kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
            rule.append(step["pattern"].get("Regex") or re.escape(step["pattern"]["String"]))
        elif kind == "Digits" and step.get("individual_digits"):
            rule.append(DIGIT)
        elif kind == "ByteLevel" and not step.get("add_prefix_space"):  # llama.cpp never prepends a space to BPE
            rule += [GPT2_REGEX] if step.get("use_regex", True) else []
            byte_level = True
        else:
            return None
    return tuple(rule) if byte_level else None


def steps_text(tokenizer_json: dict) -> list[str]:
    """The pre-tokenizer as a user reads it in tokenizer.json: each step's regex, or its type."""
    return [step_text(s) for s in pre_tokenizer_steps(tokenizer_json.get("pre_tokenizer"))]


def step_text(step: dict) -> str:
    if step["type"] == "Split":
        return step["pattern"].get("Regex") or step["pattern"]["String"]
    return "ByteLevel(add_prefix_space)" if step.get("add_prefix_space") else step["type"]


def check_hash(tokenizer) -> str:
    """What llama.cpp's converter hashes: the ids of the check text, with the special tokens the tokenizer adds."""
    return hashlib.sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()


def ignores_merges(tokenizer_json: dict) -> bool:
    return bool(tokenizer_json["model"].get("ignore_merges"))


def by_flags(names: tuple[str, ...], tokenizer_json: dict, default: str) -> str:
    """Among names that split alike, the first that merges as tokenizer.json says (`ignore_merges`)."""
    return next((n for n in names if (n in IGNORES_MERGES) == ignores_merges(tokenizer_json)), default)


def byte_level_pre(tokenizer_json: dict, tokenizer) -> tuple[str, str]:
    """The llama.cpp pre-tokenizer that splits text as this byte-level BPE tokenizer does, and how it was chosen."""
    digest = check_hash(tokenizer)
    known, names = PRE_TOKENIZER_HASHES.get(digest), SPLITS.get(split_rule(tokenizer_json))
    if known is None and names is None:
        raise unknown_pre_tokenizer(tokenizer_json, digest)
    if known is None:
        return by_flags(names, tokenizer_json, names[0]), "splitting rule"
    if names is None:
        return known, "check-text hash"
    if known not in names:
        warn_disagreement(known, names[0])
        return known, f"check-text hash (tokenizer.json's splitting rule is {names[0]}'s)"
    if (known in IGNORES_MERGES) == ignores_merges(tokenizer_json):
        return known, "check-text hash and splitting rule"
    # The check text does not exercise ignore_merges: Llama 3's tokenizer without its bos hashes as Smaug's, which
    # llama.cpp merges word by word; tokenizer.json's flag picks among the names of the rule.
    chosen = by_flags(names, tokenizer_json, known)
    return chosen, f"splitting rule and ignore_merges (the check-text hash says {known})"


def warn_disagreement(known: str, by_rule: str) -> None:
    # The converter's choice stands: equal ids on a text built to tell pre-tokenizers apart say this is that
    # model's vocabulary, and a rule that splits more finely than tokenizer.json says is one the vocabulary was
    # trained with (transformers' GGUF reader and its GPT2Tokenizer drop SmolLM's and StarCoder's single-digit
    # step). An edited tokenizer is the other way to get here, hence the warning.
    logger.warning(
        "tokenizer.json splits text as llama.cpp's `%s` does, but the tokenizer's ids on llama.cpp's check text are "
        "those of `%s`: exporting with `%s`, as llama.cpp's converter would. If this tokenizer's pre-tokenizer was "
        "edited, compare llama.cpp's tokens with the model's on your own text",
        *(by_rule, known, known),
    )


def unknown_pre_tokenizer(tokenizer_json: dict, digest: str) -> UserError:
    rules = ", ".join(names[0] for names in SPLITS.values())
    return UserError(
        f"tokenizer.json splits text with {steps_text(tokenizer_json) or ['no pre-tokenizer']}, none of the rules "
        f"llama.cpp {LLAMA_CPP_VERSION} splits with ({rules}), and its ids on llama.cpp's check text (sha256 "
        f"{digest}) are those of no tokenizer llama.cpp's converter knows: llama.cpp has no pre-tokenizer for this "
        "vocabulary and would tokenize differently, so it cannot be exported"
    )


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
    pre_chosen_by: str | None = None  # byte-level BPE: the check-text hash, the splitting rule or both
    add_space_prefix: bool | None = None


def tokenizer_definition(tokenizer, path: Path) -> dict:
    """The tokenizer as transformers runs it, which the model was trained with: a tokenizer class may rebuild what
    tokenizer.json says (transformers 5's Qwen2Tokenizer and GPT2Tokenizer put back their own pre-tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str() if backend is not None else path.read_text())


def vocab_of(model_dir: Path, tokenizer, n_vocab: int) -> Vocab:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{model_dir}: no tokenizer.json; GGUF export reads the fast tokenizer's definition")
    spec = tokenizer_definition(tokenizer, path)
    if len(tokenizer) > n_vocab:  # the model cannot embed them either: an id past its embeddings fails there too
        extra = tokenizer.convert_ids_to_tokens(list(range(n_vocab, len(tokenizer))))
        logger.warning("tokens past the model's %d embeddings are left out of the GGUF vocabulary: %s", n_vocab, extra)
    tokens, types = token_table(tokenizer, n_vocab)
    if not is_sentencepiece(spec):
        if spec["model"]["type"] != "BPE":
            raise UserError(f"tokenizer.json: a {spec['model']['type']} tokenizer; GGUF export handles BPE tokenizers")
        pre, chosen_by = byte_level_pre(spec, tokenizer)
        return Vocab("gpt2", tokens, types, pre=pre, pre_chosen_by=chosen_by)
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


def write_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, tokenizer, vocab: Vocab, eot: int | None) -> None:
    n_vocab = len(vocab.tokens)
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
def write_gguf(
    path: Path, model_dir: Path, config, tokenizer, vocab: Vocab, qtype: str, items: list[Item], name: str
) -> dict:
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
    write_tokenizer(writer, model_dir, tokenizer, vocab, end_of_turn(tokenizer, turns))
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
    vocab = vocab_of(source.model_dir, tokenizer, config.vocab_size)  # refuses what llama.cpp cannot load, first
    verify = choose_verify(verify, items)
    check_disk(out, sum(i.nbytes for i in items) + (64 << 20))  # and the tokenizer, a few MB
    tmp = out.with_name(f".{out.name}.tmp")
    started = time.perf_counter()
    try:
        written = write_gguf(tmp, source.model_dir, config, tokenizer, vocab, qtype, items, name=out.stem)
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
        "tokenizer": {
            "model": vocab.model,
            "pre": vocab.pre,
            "pre_chosen_by": vocab.pre_chosen_by,
            "tokens": len(vocab.tokens),
        },
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
