"""Loading models: find the base, load it in NF4 (or full precision) for training, a finished run or a merged model
for inference; and the shared builders around them: bitsandbytes' and PEFT's configs, the layers LoRA targets."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
from pathlib import Path

import bitsandbytes as bnb
import peft
import torch
from accelerate import PartialState
from huggingface_hub import snapshot_download
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
)
from transformers.pytorch_utils import Conv1D

from qlora_pipe import UserError
from qlora_pipe.config import ModelConfig, Recipe, compute_dtype, device_choice, local_device
from qlora_pipe.rows import check_hub_id
from qlora_pipe.run import Run, find_adapter, load_run, run_dir_of

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# The NF4 settings QLoRA trains with. The manifest records them so that merge reproduces the exact weights.
NF4 = {"quant_type": "nf4", "double_quant": True, "blocksize": 64, "quant_storage": "uint8"}
# Classification heads transformers adds to a base (and PEFT's SEQ_CLS task saves whole): BERT's classifier,
# decoders' score.
HEADS = ("classifier", "score")


def resolve_compute_dtype(name: str) -> torch.dtype:
    """The compute dtype `name` (`model.compute_dtype`) stands for on this machine."""
    return getattr(torch, compute_dtype(name, local_device()))


def check_base(base: str, allow_pickle: bool = False) -> str:
    """Fail early, before anything is loaded, when a local base is not a usable checkpoint (or holds only pickle
    weights that the recipe does not allow)."""
    path = Path(base).expanduser()
    looks_like_hub_id = base.count("/") == 1 and not base.startswith((".", "/", "~")) and not path.exists()
    if looks_like_hub_id:
        check_hub_id(base, "model.base", "directory")
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
        raise UserError(
            f"model.base: {base} holds only pickle weights ({', '.join(pickles[:3])}), which can run code "
            "when loaded; convert them to safetensors, or set model.allow_pickle: true if you trust "
            "them"
        )
    return str(path.resolve())


def weight_files(base: str) -> list[Path]:
    path = Path(base)
    return sorted(path.glob("*.safetensors")) or sorted(p for p in path.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))


def lora_targets(net: torch.nn.Module, targets: str | list[str]) -> dict[str, torch.nn.Module]:
    """The linear layers LoRA adapts for `lora.target_modules`, by module name: `all-linear` is every linear layer
    (nn.Linear and its subclasses, GPT-2's Conv1D) but the output head, as PEFT selects them and bitsandbytes
    quantizes them; a list matches module names or their last components (`q_proj`)."""
    output = net.get_output_embeddings()
    return {
        name: module
        for name, module in net.named_modules()
        if isinstance(module, torch.nn.Linear | Conv1D)
        and module is not output
        and (targets == "all-linear" or any(name == t or name.endswith(f".{t}") for t in targets))
    }


def lora_config(recipe: Recipe) -> peft.LoraConfig:
    lo = recipe.lora
    return peft.LoraConfig(
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        target_modules=lo.target_modules,
        use_rslora=lo.use_rslora,
        use_dora=lo.use_dora,
        # loftq: the weights come from the LoftQ stage's adapter_init/, loaded over this default
        init_lora_weights={"gaussian": "gaussian", "false": False}.get(lo.init, True),
        # SEQ_CLS: PEFT trains the new classification head whole (modules_to_save) and saves it with the adapter
        task_type="SEQ_CLS" if recipe.task == "seq_cls" else "CAUSAL_LM",
    )


def bnb_config(compute_dtype: torch.dtype, classifier: bool = False) -> BitsAndBytesConfig:
    # A classification head is new and trained whole (modules_to_save): it must stay in full precision.
    skip = {"llm_int8_skip_modules": list(HEADS)} if classifier else {}
    return BitsAndBytesConfig(
        **skip,
        load_in_4bit=True,
        bnb_4bit_quant_type=NF4["quant_type"],
        bnb_4bit_use_double_quant=NF4["double_quant"],
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage(compute_dtype),
    )


def fsdp_version() -> int | None:
    """1 or 2 when `accelerate launch` runs with an FSDP config (it sets these for every rank), else None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() not in ("1", "true"):
        return None
    return int(os.environ.get("FSDP_VERSION", "1"))


def quant_storage(compute_dtype: torch.dtype) -> torch.dtype:
    """FSDP shards only floating tensors, one dtype per flattened unit: under FSDP the packed NF4 bytes are stored in
    the compute dtype, like the layers around them (bitsandbytes' FSDP-QLoRA); elsewhere in uint8. The stored bytes,
    and so the weights, are the same either way."""
    return compute_dtype if fsdp_version() else getattr(torch, NF4["quant_storage"])


def device_map() -> dict | None:
    """One full copy of the model per process, on that process's device (DDP under accelerate, or a single GPU/CPU).
    Under FSDP none: rank 0 reads the weights (cpu_ram_efficient_loading) and FSDP shards them onto every GPU."""
    state = PartialState()  # under a launcher this sets up the process group, which FSDP loading needs first
    return None if fsdp_version() else {"": state.device}


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
    return AutoModelForSequenceClassification, {
        "num_labels": len(labels),
        "id2label": ids,
        "label2id": {v: k for k, v in ids.items()},
    }


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
        raise UserError(
            f"model.base: {cfg.base} lacks weights the model needs ({', '.join(fresh[:5])}); "
            "it is not a complete checkpoint of this architecture"
        )
    return net


def skeleton(base: str | Path, trust_remote_code: bool, labels: list[str] | None = None) -> torch.nn.Module:
    """The architecture of `base` on the meta device: module types and parameter names, no weights, no memory."""
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
    return Path(snapshot_download(base, allow_patterns=["*.json", "*.jinja", "*.safetensors", "*.model", "*.txt"]))


def compute_device(name: str) -> torch.device:
    """--device (`auto`: CUDA when present)."""
    return torch.device(device_choice(name))


def nf4_settings(load_dtype: torch.dtype) -> dict:
    """The NF4 settings and load dtype, as manifests record them."""
    return {**NF4, "load_dtype": str(load_dtype).removeprefix("torch.")}


def load_run_base(run: Run, compute_dtype: torch.dtype) -> torch.nn.Module:
    """A run's base as training loaded it: its base (the LoftQ backbone for LoftQ runs), NF4 or not, in the recorded
    load dtype (it sets the NF4 block scales), computing in `compute_dtype`."""
    cfg = dataclasses.replace(run.recipe.model, base=run.base)
    load_dtype = getattr(torch, run.quantization["load_dtype"])
    return load_base(cfg, compute_dtype, run.quantized, load_dtype, run.labels)


def base_as_trained(run: Run) -> torch.nn.Module:
    """A run's base computing as training did: in the recipe's compute dtype, on bitsandbytes' dequantize path."""
    base = load_run_base(run, resolve_compute_dtype(run.recipe.model.compute_dtype))
    if run.quantized:
        set_cpu_bf16_fastpath(base, False)
    return base


def load_for_inference(path: str | Path) -> tuple[torch.nn.Module, object, str]:
    """(model, tokenizer, description) of a training run (base + adapter, computing as training did), a run's
    adapter directory, or a standalone checkpoint (a merged model, a base)."""
    path = Path(path)
    run_dir = run_dir_of(path)
    if run_dir is not None:
        run = load_run(run_dir)
        net = peft.PeftModel.from_pretrained(base_as_trained(run), run.adapter)
        return net, load_tokenizer(str(run.adapter)), f"{run_dir} (base + adapter)"
    if (path / "config.json").exists():
        config = AutoConfig.from_pretrained(path)
        classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
        auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
        net = auto.from_pretrained(path, dtype="auto", device_map=device_map(), use_safetensors=True)
        return net, load_tokenizer(str(path)), str(path)
    raise UserError(f"{path}: not a merged model, a training run or a model directory (no config.json or manifest)")


def load_with_adapters(path: str | Path, adapters: dict[str, Path]) -> tuple[peft.PeftModel, object, list[str]]:
    """The base of `path` loaded once (a run's base as training loaded it, or a model directory) with every adapter
    loaded by name, a run's own adapter first (named after its directory); (model, tokenizer, adapter names). PEFT
    switches between them (`set_adapter`); `disable_adapter()` gives the base alone."""
    path = Path(path)
    run_dir = run_dir_of(path)
    if run_dir is not None:
        run = load_run(run_dir)
        base = base_as_trained(run)
        adapters, tokenizer = {run_dir.name: run.adapter, **adapters}, load_tokenizer(str(run.adapter))
    elif (path / "config.json").exists():
        base = AutoModelForCausalLM.from_pretrained(path, dtype="auto", device_map=device_map(), use_safetensors=True)
        tokenizer = load_tokenizer(str(path))
    else:
        raise UserError(f"{path}: not a training run or a model directory (no manifest.json or config.json)")
    for name in adapters:  # PEFT keys its layers by adapter name, next to the attributes every nn.Module has
        if "." in name or hasattr(torch.nn.ModuleDict(), name):
            raise UserError(
                f"adapter name {name!r}: not usable as a PEFT adapter name (a dot, or a PyTorch module "
                "attribute such as half or train); choose another with --adapter NAME=DIR"
            )
    (first, where), *rest = adapters.items()
    net = peft.PeftModel.from_pretrained(base, find_adapter(where)[0], adapter_name=first)
    for name, where in rest:
        net.load_adapter(find_adapter(where)[0], adapter_name=name)
    return net, tokenizer, list(adapters)


def set_cpu_bf16_fastpath(model: torch.nn.Module, enabled: bool) -> None:
    """bitsandbytes' no-grad CPU forward repacks NF4 weights in place and computes in bf16 on avx512_bf16 CPUs.
    Training and exact comparisons must see the dequantize-and-matmul path instead."""
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
