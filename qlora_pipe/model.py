"""Model stage: find the base, choose the compute dtype for this machine, load it in NF4 (or full precision)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

from qlora_pipe import UserError
from qlora_pipe.config import ModelConfig

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# The NF4 settings QLoRA trains with. The manifest records them so that merge reproduces the exact weights.
NF4 = {"quant_type": "nf4", "double_quant": True, "blocksize": 64, "quant_storage": "uint8"}
# Classification heads transformers adds to a base (and PEFT's SEQ_CLS task saves whole): BERT's classifier,
# decoders' score.
HEADS = ("classifier", "score")


def cpu_has_native_bf16() -> bool:
    """avx512_bf16 or AMX: bf16 matmuls run ~2.7x faster than fp32 there, but ~7x slower where they are emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_compute_dtype(name: str) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def device_kind() -> str:
    """Where bitsandbytes quantizes: its CPU and CUDA quantizers may round differently, so the manifest records it."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_base(base: str, allow_pickle: bool = False) -> str:
    """Fail early, before anything is loaded, when a local base is not a usable checkpoint (or holds only pickle
    weights that the recipe does not allow)."""
    path = Path(base).expanduser()
    looks_like_hub_id = base.count("/") == 1 and not base.startswith((".", "/", "~")) and not path.exists()
    if looks_like_hub_id:
        return base
    if not path.is_dir():
        raise UserError(f"model.base: directory not found: {base} (give a local checkpoint directory or a hub id)")
    if (path / "adapter_config.json").exists() and not (path / "config.json").exists():
        raise UserError(f"model.base: {base} is a LoRA adapter, not a base model; point it at the base checkpoint")
    if not (path / "config.json").exists():
        raise UserError(f"model.base: {base} has no config.json; it is not a transformers checkpoint")
    if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in path.iterdir()):
        raise UserError(f"model.base: {base} has a config.json but no weight files (*.safetensors)")
    if not any(path.glob("*.safetensors")) and not allow_pickle:
        pickles = sorted(p.name for p in path.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
        raise UserError(f"model.base: {base} holds only pickle weights ({', '.join(pickles[:3])}), which can run code "
                        "when loaded; convert them to safetensors, or set model.allow_pickle: true if you trust "
                        "them")  # fmt: skip
    return str(path.resolve())


def weight_files(base: str) -> list[Path]:
    path = Path(base)
    return sorted(path.glob("*.safetensors")) or sorted(p for p in path.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))


def bnb_config(compute_dtype: torch.dtype, classifier: bool = False) -> BitsAndBytesConfig:
    # A classification head is new and trained whole (modules_to_save): it must stay in full precision.
    skip = {"llm_int8_skip_modules": list(HEADS)} if classifier else {}
    return BitsAndBytesConfig(
        **skip,
        load_in_4bit=True,
        bnb_4bit_quant_type=NF4["quant_type"],
        bnb_4bit_use_double_quant=NF4["double_quant"],
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=getattr(torch, NF4["quant_storage"]),
    )


def device_map() -> dict:
    """One full copy of the model per process, on that process's device (DDP under accelerate, or a single GPU/CPU)."""
    from accelerate import PartialState

    return {"": PartialState().device}


def load_tokenizer(source: str, trust_remote_code: bool = False):
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as e:  # a hub id with no network, or a directory without tokenizer files: the user's to fix
        raise UserError(f"cannot load the tokenizer of {source}: {str(e).splitlines()[0]}") from None


def head(labels: list[str] | None) -> tuple[type, dict]:
    """The auto class and config arguments for a causal LM (labels None) or a sequence classifier over `labels`."""
    if labels is None:
        return AutoModelForCausalLM, {}
    ids = dict(enumerate(labels))
    return AutoModelForSequenceClassification, {"num_labels": len(labels), "id2label": ids,
                                                "label2id": {v: k for k, v in ids.items()}}  # fmt: skip


def load_base(
    cfg: ModelConfig,
    compute_dtype: torch.dtype,
    quantized: bool,
    load_dtype: torch.dtype | None = None,
    labels: list[str] | None = None,
) -> torch.nn.Module:
    """Load the base in NF4 (quantized) or in full precision, as a causal LM or (with `labels`) a sequence
    classifier. `load_dtype` is the dtype weights are read in before quantization; it decides the NF4 block scales,
    so merge passes the one training used."""
    auto, kwargs = head(labels)
    if cfg.attn_implementation != "auto":
        kwargs["attn_implementation"] = cfg.attn_implementation
    if quantized:
        kwargs["quantization_config"] = bnb_config(compute_dtype, classifier=labels is not None)
    if cfg.allow_pickle:
        logger.warning("model.allow_pickle: weights of %s may be read from pickle files", cfg.base)
    if cfg.trust_remote_code:
        logger.warning("model.trust_remote_code: running the Python code shipped with %s", cfg.base)
    net, info = auto.from_pretrained(
        cfg.base,
        use_safetensors=None if cfg.allow_pickle else True,
        dtype=load_dtype or compute_dtype,
        device_map=device_map(),
        trust_remote_code=cfg.trust_remote_code,
        output_loading_info=True,
        **kwargs,
    )
    # Weights the checkpoint lacks are initialised at random and, unless they are the new head (saved with the
    # adapter), trained on but never saved: the merged model could not reproduce the trained one.
    fresh = sorted(k for k in info["missing_keys"] if labels is None or not k.startswith(HEADS))
    if fresh:
        raise UserError(f"model.base: {cfg.base} lacks weights the model needs ({', '.join(fresh[:5])}); "
                        "it is not a complete checkpoint of this architecture")  # fmt: skip
    return net


def skeleton(base: str | Path, trust_remote_code: bool, labels: list[str] | None = None) -> torch.nn.Module:
    """The architecture of `base` on the meta device: module types and parameter names, no weights, no memory."""
    from transformers import AutoConfig

    auto, kwargs = head(labels)
    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code, **kwargs)
    with torch.device("meta"):
        return auto.from_config(config, trust_remote_code=trust_remote_code)


def parameter_names(net: torch.nn.Module, keys: list[str]) -> dict[str, str | None]:
    """Checkpoint key → parameter name in `net`, None for keys that are no parameter. Checkpoints of the base model
    alone (e.g. GPT-2's) omit the prefix (`transformer.`) that the causal-LM class adds."""
    params = {name for name, _ in net.named_parameters(remove_duplicate=False)}
    prefix = net.base_model_prefix
    return {k: k if k in params else f"{prefix}.{k}" if f"{prefix}.{k}" in params else None for k in keys}


def describe_quantization(net: torch.nn.Module, load_dtype: torch.dtype) -> dict:
    """What the streaming merge needs to rebuild the trained weights without loading the model: which modules
    transformers quantized (and whether it transposed a GPT-2 style Conv1D weight first), and which unquantized
    parameters were loaded in a dtype other than the load dtype (models that keep some modules in fp32)."""
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    quantized = {
        name: {"conv1d": issubclass(getattr(module, "source_cls", torch.nn.Linear), Conv1D)}
        for name, module in net.named_modules()
        if isinstance(module, bnb.nn.Linear4bit)
    }
    other_dtypes = {
        name: str(param.dtype).removeprefix("torch.")
        for name, param in net.named_parameters()
        if not isinstance(param, bnb.nn.Params4bit) and param.is_floating_point() and param.dtype != load_dtype
    }
    return {"quantized_modules": quantized, "unquantized_dtypes": other_dtypes}


def local_checkpoint(base: str) -> Path:
    """A local directory of `base`: itself, or for a hub id the copy training left in the local cache."""
    if Path(base).is_dir():
        return Path(base)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(base, allow_patterns=["*.json", "*.jinja", "*.safetensors", "*.model", "*.txt"]))


def compute_device(name: str) -> torch.device:
    """`auto`: CUDA when present. Asking for CUDA where there is none is a user error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def nf4_settings(load_dtype: torch.dtype) -> dict:
    """The NF4 settings and load dtype, as manifests record them."""
    return {**NF4, "load_dtype": str(load_dtype).removeprefix("torch.")}


def load_run_base(manifest: dict, compute_dtype: torch.dtype) -> torch.nn.Module:
    """A run's base as training loaded it: the manifest's base (the LoftQ backbone for LoftQ runs), NF4 or not, in
    the recorded load dtype (it sets the NF4 block scales), computing in `compute_dtype`."""
    from qlora_pipe.config import recipe_from_dict

    q = manifest["quantization"]
    cfg = dataclasses.replace(recipe_from_dict(manifest["recipe"]).model, base=manifest["base"]["path"])
    return load_base(cfg, compute_dtype, q["method"] == "nf4", getattr(torch, q["load_dtype"]), manifest.get("labels"))


def set_cpu_bf16_fastpath(model: torch.nn.Module, enabled: bool) -> None:
    """bitsandbytes' no-grad CPU forward repacks NF4 weights in place and computes in bf16 on avx512_bf16 CPUs.
    Training and exact comparisons must see the dequantize-and-matmul path instead."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = enabled


# `train.tiled_mlp`: tokens per MLP tile, chosen so that a tile holds at most this many intermediate activations (its
# backward keeps ~7 of them, bf16: ~0.1 GiB).
MLP_TILE_ELEMENTS = 2**23


def mlp_tile_tokens(intermediate_size: int) -> int:
    tokens = max(64, MLP_TILE_ELEMENTS // intermediate_size)
    return 1 << (tokens.bit_length() - 1)


def tile_mlps(net: torch.nn.Module, tile_tokens: int) -> int:
    """Run every decoder layer's MLP over tiles of `tile_tokens` tokens, each tile checkpointed on its own.

    The MLP works on each token alone, so tiling changes no value (up to the matmul's summation order); but the
    backward of a layer then holds one tile's MLP activations instead of the whole micro-batch's: with gradient
    checkpointing these are the largest activations of a step (~8 bytes per token per intermediate unit on CUDA:
    0.45 GiB for Llama-3.1-8B at 4096 tokens). The price is one more MLP forward per step, and bitsandbytes'
    dequantizing matmuls run once per tile (docs/benchmarks.md: 2x the step time of a small model). Only modules
    named `mlp` that take the hidden states alone and return a tensor of their shape are tiled (not MoE blocks, which
    also return router logits, nor BLOOM's, which add the residual); returns how many were."""
    tiled = 0
    for layer in net.modules():
        mlp = getattr(layer, "mlp", None)
        if not isinstance(mlp, torch.nn.Module) or getattr(mlp, "qlora_pipe_tiled", False):
            continue
        if len(inspect.signature(mlp.forward).parameters) != 1 or "moe" in type(mlp).__name__.lower():
            continue
        mlp.forward = functools.partial(_tiled_forward, mlp.forward, tile_tokens)
        mlp.qlora_pipe_tiled = True
        tiled += 1
    return tiled


def _tiled_forward(forward, tile_tokens: int, hidden: torch.Tensor) -> torch.Tensor:
    tokens = hidden.reshape(-1, hidden.shape[-1])
    if not torch.is_grad_enabled() or tokens.shape[0] <= tile_tokens:
        return forward(hidden)
    tiles = [checkpoint(forward, tile, use_reentrant=False) for tile in tokens.split(tile_tokens)]
    return torch.cat(tiles).view(*hidden.shape[:-1], -1)
