"""Recipes: YAML files loaded into typed dataclasses, validated once, before any model or data set is loaded.

Every field's documentation is its docstring (the string literal under it); `qlora-pipe train RECIPE --print-config`
shows the resolved recipe and the README lists the fields.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import inspect
import math
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from qlora_pipe import UserError

DTYPES = ("auto", "bfloat16", "float16", "float32")
# Choices the command line offers (kept here, light to import, so that building the parser loads no library).
DEVICES = ("auto", "cpu", "cuda")
TRAINING_DEVICES = ("cuda", "cpu")  # what `estimate --device` predicts for: the GPU need not be on this machine
MERGE_MODES = ("dequantized", "original")
# `qlora-pipe adapter combine --method`: PEFT's add_weighted_adapter combination types
COMBINE_METHODS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "magnitude_prune")
DENSITY_METHODS = ("ties", "ties_svd", "dare_linear", "dare_ties", "magnitude_prune")
OUT_DTYPES = ("auto", "float32", "bfloat16", "float16")
VERIFY_LEVELS = ("auto", "full", "layers", "none")
EXPORT_FORMATS = ("gguf",)
DIFFUSION_TASKS = ("text_to_image", "dreambooth")
# LoRA targets of diffusion tasks, as diffusers' LoRA training scripts set them: the UNet's attention projections and
# (train_text_encoder) the CLIP text encoder's.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
# `export --verify`: full reads the file back into a whole model; tensors compares it tensor by tensor (streaming)
EXPORT_VERIFY = ("auto", "full", "tensors", "none")
# Exact match is reported when every reference completion is at most this many tokens: label-style tasks, where
# "the whole answer is right" is the metric. Long free-text answers get loss and perplexity only.
LABEL_TOKENS = 16
# TRL's fused LM head projects tiles of labelled tokens × at most this many vocabulary entries (trl.kernels).
HEAD_TILE_VOCAB = 32768
# `train.loss_chunk_tokens: auto`: the most labelled tokens per LM-head tile (a power of two, 64 to 4096) whose tile
# holds at most this many logits. On the CPU each logit of a tile costs ~31 bytes (TRL's torch fold), on CUDA 2 (the
# bf16 buffer the Triton kernel folds in place): ~0.25 GiB and 64 MiB.
HEAD_TILE_LOGITS = {"cpu": 2**23, "cuda": 2**25}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class ModelConfig:
    """The base model and how it is loaded."""

    base: str = ""
    """Local directory of a transformers checkpoint, or a hub id (e.g. `meta-llama/Llama-2-7b-hf`). Required."""
    quantization: Literal["nf4", "none"] = "nf4"
    """`nf4`: load the base in 4-bit NF4 with double quant (QLoRA). `none`: load it in `compute_dtype` (plain LoRA).
    Diffusion tasks default to `none`; their `nf4` (the UNet in 4-bit, through diffusers' bitsandbytes quantizer)
    needs a CUDA GPU."""
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """dtype of the matmuls. `auto`: bf16 on CUDA GPUs that support it, fp16 on older ones; on the CPU bf16 only where
    the CPU has native bf16 (avx512_bf16/AMX: ~2.7x faster than fp32), else fp32 (emulated bf16 is ~7x slower)."""
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"
    """Attention kernel. `auto` lets transformers choose (SDPA where the architecture supports it)."""
    trust_remote_code: bool = False
    """Run Python code shipped with the model repository. Leave off unless you trust the repository."""
    allow_pickle: bool = False
    """Allow weights in pickle files (.bin/.pt), which can run code when loaded. Off: safetensors only."""
    frozen_dtype: Literal["auto", "float32"] = "auto"
    """dtype of the frozen parameters that are not quantized (embeddings, lm_head, norms). `auto`: the load dtype
    (bf16/fp16 with a bf16/fp16 compute dtype), as the base was trained. `float32` upcasts them as PEFT's
    prepare_model_for_kbit_training does: 3.9 GiB more for Llama-3.1-8B and an fp32 residual stream; try it if fp16
    training overflows. Trained parameters (LoRA, a new head) are fp32 either way."""


@dataclass
class LoraSettings:
    """The LoRA adapter (PEFT)."""

    r: int = 16
    """LoRA rank."""
    alpha: float = 32.0
    """LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with use_rslora)."""
    dropout: float = 0.05
    """Dropout on the LoRA input, in [0, 1)."""
    target_modules: str | list[str] = "all-linear"
    """`all-linear` (every linear layer but the output head) or a list of module names such as [q_proj, v_proj].
    Diffusion tasks default to the UNet's attention projections [to_q, to_k, to_v, to_out.0] and take a list."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by alpha/sqrt(r) instead of alpha/r."""
    use_dora: bool = False
    """DoRA (weight-decomposed LoRA, PEFT's use_dora): also learn a magnitude per output row; each layer computes
    m / ‖W + ΔW‖ · (W + ΔW), with W the dequantized NF4 weight. Slower per step than plain LoRA; the merge folds the
    magnitudes in exactly."""
    init: Literal["default", "gaussian", "false", "loftq", "pissa"] = "default"
    """Initialisation (PEFT's init_lora_weights): `default` (A Kaiming-uniform, B zero: the update starts at zero),
    `gaussian` (A Gaussian scaled by 1/r, B zero), `false` (A and B both random: the model changes before training;
    for debugging only), `loftq`: run the LoftQ stage first (OUTPUT_DIR/loftq) and train from its backbone and
    adapter, or `pissa`: the same stage with PiSSA's start (the adapter is W's top-r singular part, the backbone the
    residual, quantized)."""
    loftq_iters: int = 5
    """LoftQ alternations of quantization and low-rank fitting per matrix."""
    loftq_svd: Literal["lowrank", "exact"] = "lowrank"
    """SVD used by LoftQ: `lowrank` (torch.svd_lowrank, oversampled; much faster) or `exact` (torch.linalg.svd)."""


@dataclass
class DataConfig:
    """Training and evaluation data."""

    train: str = ""
    """Training data: a local .jsonl/.json/.csv/.parquet file, or a hub data set name. Required. Diffusion tasks: an
    image folder with metadata.jsonl (file_name, text) or a hub image data set (image and text columns); for
    dreambooth a folder of instance images or a hub data set with an image column."""
    eval: str | None = None
    """Optional evaluation file (same formats). When absent, `eval_fraction` of the training data is held out."""
    eval_fraction: float = 0.1
    """Share of the training data held out for evaluation when `eval` is not given; 0 disables evaluation."""
    format: Literal["auto", "messages", "sharegpt", "prompt-completion", "alpaca", "text", "classification"] = "auto"
    """Data format. `messages`: chat turns (role/content); `sharegpt`: `conversations` of from/value turns;
    `prompt-completion`: prompt and completion columns; `alpaca`: instruction/input/output; `text`: plain text
    (loss on every token); `classification`: text and label columns (task: seq_cls). `auto`: detect from columns."""
    columns: dict[str, str] | None = None
    """Rename the data's columns to the format's, e.g. {prompt: question, completion: answer} reads `question` as the
    prompt. Keys are the format's column names, values the names in your files. Image data: {image: ..., text: ...}."""
    chat_template: Literal["auto", "chatml", "llama-2", "llama-3", "mistral"] = "auto"
    """Chat template for chat data. `auto`: the tokenizer's own. A built-in one (for bases that ship none) marks
    assistant turns for assistant-only loss and makes its end-of-turn token the eos (`<|im_end|>` for chatml,
    `<|eot_id|>` for llama-3); its special tokens must already be in the tokenizer's vocabulary."""
    max_seq_length: int = 1024
    """Examples are truncated to this many tokens."""
    max_truncated: float = 0.05
    """Largest share of examples whose trained tokens may be cut by max_seq_length; above it training refuses to
    start (see `qlora-pipe check-data`). 1 allows any."""
    max_empty_replies: float = 0.0
    """Largest share of examples with an empty (or whitespace-only) reply or completion; above it training refuses to
    start: such examples teach the model to answer nothing. 0 allows none."""
    skip_invalid_rows: bool = False
    """Leave out rows that are not valid for the data format (wrong types, missing keys, another format, not JSON or
    not UTF-8), reporting how many and where, instead of refusing the data."""


@dataclass
class TrainConfig:
    """Training settings, mapped one by one onto TRL's SFTConfig."""

    epochs: float = 1.0
    """Number of passes over the training data (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Stop after this many optimizer steps; -1 trains for `epochs`."""
    learning_rate: float = 2e-4
    """Peak learning rate."""
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    """Learning-rate schedule."""
    warmup_ratio: float = 0.03
    """Share of the steps spent warming up the learning rate, in [0, 1)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 0.3
    """Gradient clipping norm (0.3, as in the QLoRA paper)."""
    optimizer: Literal["auto", "adamw_torch", "paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit"] = "auto"
    """Optimizer (the 8-bit and paged ones come from bitsandbytes). `auto`: paged 8-bit AdamW on CUDA (a quarter of
    the state memory, paged out under pressure), PyTorch's AdamW on the CPU (paging needs CUDA)."""
    batch_size: int = 4
    """Examples per device per forward pass."""
    grad_accumulation: int = 4
    """Forward passes per optimizer step; the effective batch is batch_size × grad_accumulation × devices."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass (non-reentrant) to save memory."""
    activation_offloading: bool = False
    """CUDA only: keep the activations a step saves for its backward pass (with gradient checkpointing: each layer's
    input) in pinned CPU memory, copied out and back on a side stream (TRL's port of torchtune's offloading). Saves
    about tokens × layers × hidden × 2 bytes of GPU memory and needs as much pinned host memory; the copies overlap
    compute (no slower on an H200). See `qlora-pipe estimate`."""
    tiled_mlp: bool = False
    """Run each layer's MLP over tiles of tokens, each recomputed on its own in the backward pass, so that a step
    holds one tile's MLP activations instead of the whole micro-batch's (0.37 GiB less for Llama-3.1-8B at 4096
    tokens, measured; more at longer sequences). The values are unchanged, but steps are slower (one more MLP forward,
    and the NF4 weights dequantized per tile: 2x on a small model): for long sequences, where memory is the limit.
    Models whose MLP is not per-token (MoE blocks, BLOOM) are left as they are."""
    loss_chunk_tokens: int | Literal["auto"] = "auto"
    """Labelled tokens per tile of the fused LM head + cross-entropy (TRL's chunked log-prob head; tiles are at most
    32768 vocabulary entries wide), so that the loss's memory grows with neither sequence length nor vocabulary.
    `auto`: from the vocabulary size, about 8M logits per tile on the CPU and 32M on CUDA (see
    `qlora-pipe estimate`)."""
    packing: bool | Literal["auto"] = "auto"
    """Pack several examples into one sequence (TRL's best-fit packing, padding-free): no compute on padding.
    `auto`: pack when the model keeps packed examples apart (checked on the loaded model; BLOOM's ALiBi does not),
    else pad. `true` refuses a model that leaks."""
    seed: int = 42
    """Seed for the model initialisation, data order and dropout."""
    logging_steps: int = 10
    """Log the loss every this many steps."""
    eval_steps: int | None = None
    """Evaluate every this many steps; unset evaluates once per epoch."""
    save_steps: int = 500
    """Write a trainer checkpoint every this many steps."""
    save_total_limit: int = 2
    """Keep at most this many trainer checkpoints."""
    label_accuracy: bool = False
    """Label tasks: before and after training, greedy-generate each eval example's answer and report the share that
    equals the reference exactly (`eval_exact_match_before/after`)."""
    report_to: str | list[str] = "auto"
    """Experiment trackers (`none`, `tensorboard`, `wandb`, ...), as in transformers. `auto`: tensorboard when it is
    installed (logs in OUTPUT_DIR/checkpoints/runs), else none."""


@dataclass
class DiffusionConfig:
    """Stable Diffusion LoRA (tasks text_to_image and dreambooth): images, DreamBooth, loss weighting, validation."""

    resolution: int = 512
    """Training images are resized (shorter side) and cropped to this square size; a multiple of 8."""
    center_crop: bool = False
    """Crop the middle of each image; false crops at a random place."""
    random_flip: bool = False
    """Flip each image horizontally with probability 0.5."""
    instance_prompt: str = ""
    """dreambooth: the prompt every instance image is trained with, naming the new concept (`a photo of sks dog`)."""
    class_prompt: str = ""
    """dreambooth: prior preservation on: images of the concept's class (`a photo of dog`) generated by the base
    (50 steps, guidance 7.5, as diffusers' DreamBooth script) keep the class from drifting. Empty: off."""
    class_dir: str | None = None
    """Folder of class images (its own images are used first, the missing ones generated into it). Default:
    OUTPUT_DIR/class_images."""
    num_class_images: int = 100
    """dreambooth with class_prompt: class images to train with (generated by the base pipeline when missing)."""
    prior_loss_weight: float = 1.0
    """dreambooth with class_prompt: weight of the class images' loss next to the instance images'."""
    snr_gamma: float | None = None
    """Min-SNR-γ loss weighting (Hang et al. 2023): each timestep's loss weighted by min(SNR, γ)/SNR (by
    min(SNR, γ)/(SNR + 1) for v-prediction); 5.0 is the paper's choice. Unset: plain MSE."""
    train_text_encoder: bool = False
    """Also put LoRA on the CLIP text encoder's attention projections (q_proj, k_proj, v_proj, out_proj)."""
    validation_prompt: str = ""
    """Prompt of the validation images written every train.eval_steps (and at the end). Empty: the first training
    caption (text_to_image) or the instance prompt (dreambooth)."""
    num_validation_images: int = 4
    """Images per validation grid (seeded: the same noise at every step); 0 turns validation off."""
    validation_inference_steps: int = 25
    """Denoising steps of each validation image."""
    validation_guidance: float = 7.5
    """Classifier-free guidance scale of the validation images."""


@dataclass
class Recipe:
    """A training recipe: the whole pipeline from base model to adapter."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """The LoRA adapter."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and evaluation data."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training settings."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """Stable Diffusion settings (tasks text_to_image and dreambooth)."""
    output_dir: str = ""
    """Where the run is written; defaults to runs/<recipe file name>."""
    task: Literal["causal_lm", "seq_cls", "text_to_image", "dreambooth"] = "causal_lm"
    """`causal_lm`: supervised fine-tuning of a language model (TRL). `seq_cls`: sequence classification (text →
    label) through the transformers Trainer, the new head trained whole and merged into a standalone classifier.
    `text_to_image`: LoRA on a Stable Diffusion UNet from captioned images; `dreambooth`: the same from a few images
    of one subject and an instance prompt (diffusers + PEFT, the transformers Trainer)."""


def _check_values(recipe: Recipe) -> list[str]:
    """Impossible values, one message per field, each naming the key and the fix."""
    m, lo, d, t = recipe.model, recipe.lora, recipe.data, recipe.train
    checks = [
        (not m.base, "model.base", "is required: set it to a local checkpoint directory or a hub id"),
        (lo.r <= 0, "lora.r", f"must be a positive integer, got {lo.r}: try 8, 16 or 64"),
        (lo.alpha <= 0, "lora.alpha", f"must be positive, got {lo.alpha}: a common choice is 2 × r"),
        (not 0 <= lo.dropout < 1, "lora.dropout", f"must be in [0, 1), got {lo.dropout}"),
        (
            isinstance(lo.target_modules, list) and not lo.target_modules,
            "lora.target_modules",
            "is an empty list: name modules or use `all-linear`",
        ),
        (
            isinstance(lo.target_modules, str) and lo.target_modules != "all-linear",
            "lora.target_modules",
            f"must be `all-linear` or a list of module names, got {lo.target_modules!r}",
        ),
        (lo.loftq_iters <= 0, "lora.loftq_iters", f"must be a positive integer, got {lo.loftq_iters}"),
        (
            lo.init in ("loftq", "pissa") and m.quantization != "nf4",
            "lora.init",
            {"loftq": "loftq fits the adapter to", "pissa": "pissa quantizes the residual of"}.get(lo.init, "")
            + " the NF4 quantization error; it needs model.quantization: nf4",
        ),
        (not d.train, "data.train", "is required: set it to a data file or a hub data set name"),
        (
            recipe.task == "seq_cls" and d.format not in ("auto", "classification"),
            "data.format",
            f"task seq_cls reads text and label columns: use `classification` (or auto), not {d.format!r}",
        ),
        (
            recipe.task == "causal_lm" and d.format == "classification",
            "data.format",
            "classification data needs `task: seq_cls`",
        ),
        (recipe.task != "causal_lm" and t.packing is True, "train.packing", "packing applies to task causal_lm only"),
        (
            t.label_accuracy and (recipe.task != "causal_lm" or (not d.eval and d.eval_fraction == 0)),
            "train.label_accuracy",
            "needs task causal_lm and eval data (data.eval or data.eval_fraction > 0); classifiers report accuracy "
            "anyway",
        ),
        (
            recipe.task != "causal_lm" and lo.init in ("loftq", "pissa"),
            "lora.init",
            f"{lo.init} is implemented for task causal_lm",
        ),
        (
            lo.use_dora and lo.init in ("loftq", "pissa"),
            "lora.use_dora",
            f"DoRA starts its magnitudes from the base weights, and {lo.init} replaces those: use one of them",
        ),
        (not 0 <= d.eval_fraction < 1, "data.eval_fraction", f"must be in [0, 1), got {d.eval_fraction}"),
        (d.max_seq_length <= 0, "data.max_seq_length", f"must be a positive integer, got {d.max_seq_length}"),
        (not 0 <= d.max_truncated <= 1, "data.max_truncated", f"must be in [0, 1], got {d.max_truncated}"),
        (not 0 <= d.max_empty_replies <= 1, "data.max_empty_replies", f"must be in [0, 1], got {d.max_empty_replies}"),
        (not 0 <= t.seed < 2**32, "train.seed", f"must be in [0, 2^32), got {t.seed}: any such integer works"),
        (t.epochs <= 0 and t.max_steps <= 0, "train.epochs", "must be positive (or set train.max_steps > 0)"),
        (t.max_steps == 0 or t.max_steps < -1, "train.max_steps", f"must be -1 or positive, got {t.max_steps}"),
        (t.learning_rate <= 0, "train.learning_rate", f"must be positive, got {t.learning_rate}"),
        (not 0 <= t.warmup_ratio < 1, "train.warmup_ratio", f"must be in [0, 1), got {t.warmup_ratio}"),
        (t.weight_decay < 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}"),
        (t.max_grad_norm < 0, "train.max_grad_norm", f"must be >= 0, got {t.max_grad_norm}"),
        (t.batch_size <= 0, "train.batch_size", f"must be a positive integer, got {t.batch_size}"),
        (
            t.grad_accumulation <= 0,
            "train.grad_accumulation",
            f"must be a positive integer, got {t.grad_accumulation}",
        ),
        (t.logging_steps <= 0, "train.logging_steps", f"must be a positive integer, got {t.logging_steps}"),
        (t.eval_steps is not None and t.eval_steps <= 0, "train.eval_steps", "must be a positive integer or unset"),
        (t.save_steps <= 0, "train.save_steps", f"must be a positive integer, got {t.save_steps}"),
        (t.save_total_limit <= 0, "train.save_total_limit", f"must be a positive integer, got {t.save_total_limit}"),
        (
            isinstance(t.loss_chunk_tokens, int) and t.loss_chunk_tokens <= 0,
            "train.loss_chunk_tokens",
            f"must be a positive integer or auto, got {t.loss_chunk_tokens}",
        ),
        (
            t.activation_offloading and recipe.task != "causal_lm",
            "train.activation_offloading",
            "applies to task causal_lm only (TRL's SFTTrainer offloads)",
        ),
    ]
    checks += _diffusion_checks(recipe)
    paths = {"model.base": m.base, "data.train": d.train, "data.eval": d.eval, "output_dir": recipe.output_dir}
    checks += [
        (
            bool(value) and ("\x00" in value or any(len(part.encode()) > 255 for part in value.split("/"))),
            key,
            "is not a usable path or hub id (a NUL byte, or a name longer than 255 bytes)",
        )
        for key, value in paths.items()
    ]
    reported = {key for bad, key, _ in checks if bad}
    checks += [
        (key not in reported, key, f"must be a finite number, got {value}") for key, value in _non_finite(recipe)
    ]
    return [f"{key}: {message}" for bad, key, message in checks if bad]


def _diffusion_checks(recipe: Recipe) -> list[tuple[bool, str, str]]:
    """The diffusion section's values, and the language-only settings a diffusion recipe must leave alone."""
    g, t, lo, task = recipe.diffusion, recipe.train, recipe.lora, recipe.task
    if task not in DIFFUSION_TASKS:
        return [
            (
                g != DiffusionConfig(),
                "diffusion",
                "applies to tasks text_to_image and dreambooth; remove it or set task",
            )
        ]
    return [
        (
            g.resolution <= 0 or g.resolution % 8,
            "diffusion.resolution",
            f"must be a positive multiple of 8 (the VAE's downsampling), got {g.resolution}: try 512",
        ),
        (
            task == "dreambooth" and not g.instance_prompt.strip(),
            "diffusion.instance_prompt",
            "is required for dreambooth: the prompt naming the new subject, e.g. `a photo of sks dog`",
        ),
        (
            task != "dreambooth" and bool(g.instance_prompt or g.class_prompt),
            "diffusion.instance_prompt" if g.instance_prompt else "diffusion.class_prompt",
            "applies to task dreambooth; text_to_image trains each image with its own caption",
        ),
        (
            bool(g.class_prompt) and g.num_class_images <= 0,
            "diffusion.num_class_images",
            f"must be a positive integer with a class_prompt, got {g.num_class_images}",
        ),
        (g.prior_loss_weight < 0, "diffusion.prior_loss_weight", f"must be >= 0, got {g.prior_loss_weight}"),
        (
            g.snr_gamma is not None and g.snr_gamma <= 0,
            "diffusion.snr_gamma",
            f"must be positive or unset, got {g.snr_gamma}: 5.0 is the paper's",
        ),
        (
            g.num_validation_images < 0,
            "diffusion.num_validation_images",
            f"must be >= 0 (0 turns validation off), got {g.num_validation_images}",
        ),
        (
            g.validation_inference_steps <= 0,
            "diffusion.validation_inference_steps",
            f"must be a positive integer, got {g.validation_inference_steps}",
        ),
        (
            lo.target_modules == "all-linear",
            "lora.target_modules",
            f"`all-linear` is for language models; name the UNet's modules, e.g. {list(UNET_TARGETS)}",
        ),
        (t.tiled_mlp, "train.tiled_mlp", "applies to language models; set it to false"),
        (
            bool(recipe.data.eval),
            "data.eval",
            "image tasks have no eval split: the validation images (diffusion.validation_prompt, every "
            "train.eval_steps) and the denoising loss before/after training show progress; remove it",
        ),
        (
            recipe.data.format != "auto",
            "data.format",
            f"applies to language data; image tasks read images and captions, not {recipe.data.format!r}",
        ),
    ]


def _non_finite(recipe: Recipe) -> list[tuple[str, float]]:
    """The recipe's float values that are nan or infinite (YAML reads `.nan` and `.inf`); the range checks above
    cannot see a nan."""
    bad = []
    for section in dataclasses.fields(recipe):
        values = getattr(recipe, section.name)
        for f in dataclasses.fields(values) if dataclasses.is_dataclass(values) else []:
            value = getattr(values, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                bad.append((f"{section.name}.{f.name}", value))
    return bad


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) is dict:
        key, value = typing.get_args(tp)
        return f"a mapping of {_type_name(key)} to {_type_name(value)}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", type(None): "null"}.get(
        tp, str(tp)
    )


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """Return (ok, value converted to tp). Only lossless conversions: int → float, nothing else."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if isinstance(value, bool) and str(value).lower() in typing.get_args(tp):  # YAML reads `false` as a boolean
            return True, str(value).lower()
        return value in typing.get_args(tp), value
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        for arg in typing.get_args(tp):
            ok, converted = _coerce(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin is dict:
        if not isinstance(value, dict):
            return False, value
        key_type, value_type = typing.get_args(tp)
        items = {k: (_coerce(k, key_type), _coerce(v, value_type)) for k, v in value.items()}
        ok = all(kk[0] and vv[0] for kk, vv in items.values())
        return ok, {kk[1]: vv[1] for kk, vv in items.values()}
    if origin is list:
        if not isinstance(value, list):
            return False, value
        items = [_coerce(v, typing.get_args(tp)[0]) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string; every user writes it that way
            try:
                return True, float(value)
            except ValueError:
                return False, value
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    return isinstance(value, tp), value


def _build(cls: type, raw: Any, prefix: str, errors: list[str]) -> Any:
    """Build dataclass `cls` from a mapping, appending every problem to `errors` instead of stopping at the first."""
    if not isinstance(raw, dict):
        errors.append(f"{prefix.rstrip('.') or 'recipe'}: must be a mapping of keys to values, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            close = close or [n for n in names if str(key).startswith(n) or n.startswith(str(key))]
            hint = f"did you mean `{prefix}{close[0]}`?" if close else f"valid keys are: {', '.join(names)}"
            errors.append(f"{prefix}{key}: unknown key; {hint}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.", errors)
            continue
        ok, converted = _coerce(value, tp)
        if ok:
            kwargs[key] = converted
        else:
            errors.append(f"{prefix}{key}: expected {_type_name(tp)}, got {value!r}")
    return cls(**kwargs)


def _set_override(raw: dict, override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise UserError(f"override {override!r} is not of the form key.sub=value (e.g. lora.r=8)")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override {override!r}: `{part}` is not a section")
    node[leaf] = yaml.safe_load(text) if text.strip() else None


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Load, override and validate a recipe. Raises UserError listing every problem found."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if isinstance(raw, dict) and "distributed_type" in raw and "model" not in raw:
        raise UserError(
            f"{path} is an accelerate config, not a recipe: launch with it, as in `accelerate launch --config_file "
            f"{path} -m qlora_pipe train RECIPE`"
        )
    for override in overrides:
        _set_override(raw, override)
    errors: list[str] = []
    recipe = _build(Recipe, raw, "", errors)
    if recipe.task in DIFFUSION_TASKS:
        _diffusion_defaults(raw, recipe)
    errors += _check_values(recipe)  # fields with a type error hold their (valid) defaults here
    if len(errors) == 1:
        raise UserError(f"{path}: {errors[0]}")
    if errors:
        raise UserError(f"{path}: {len(errors)} problems in the recipe:\n  " + "\n  ".join(errors))
    if not recipe.output_dir:
        recipe.output_dir = str(Path("runs") / path.stem)
    return recipe


def _diffusion_defaults(raw: dict, recipe: Recipe) -> None:
    """Diffusion tasks' own defaults for keys the recipe leaves out: LoRA on the UNet's attention projections, the
    UNet in full precision (diffusers quantizes only on CUDA)."""

    def given(section: str, key: str) -> bool:
        return isinstance(raw.get(section), dict) and key in raw[section]

    if not given("lora", "target_modules"):
        recipe.lora.target_modules = list(UNET_TARGETS)
    if not given("model", "quantization"):
        recipe.model.quantization = "none"


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def recipe_from_dict(raw: dict) -> Recipe:
    """Rebuild a recipe recorded in a manifest (already validated when it was written)."""
    errors: list[str] = []
    recipe = _build(Recipe, raw, "", errors)
    if errors:
        raise UserError("the manifest's recipe does not match this version of qlora_pipe:\n  " + "\n  ".join(errors))
    return recipe


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source (for --help and the README)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


# ---- derived values: what `auto` and the LoRA settings stand for, in one place ------------------------------------


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
    """The factor LoRA's update B·A is scaled by: the same expressions PEFT evaluates, so the same float."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def local_device() -> str:
    """`cuda` where a CUDA GPU is visible, else `cpu`: where this process trains and bitsandbytes quantizes."""
    import torch  # here, not at the top: the command line reads this module to build its parser

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_choice(name: str) -> str:
    """--device: `auto` is CUDA when present; asking for CUDA where there is none is a user error."""
    if name == "auto":
        return local_device()
    if name == "cuda" and local_device() != "cuda":
        raise UserError("--device cuda: no CUDA GPU is available here; use --device cpu")
    return name


def cpu_has_native_bf16() -> bool:
    """avx512_bf16 or AMX: bf16 matmuls run ~2.7x faster than fp32 there, but ~7x slower where they are emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_dtype(name: str, device: str) -> str:
    """The dtype `model.compute_dtype` stands for on `device`. `auto` on CUDA: bf16, or fp16 on a GPU of this machine
    that lacks bf16 (a GPU elsewhere, for an estimate, is taken to have it); on the CPU: bf16 only where the CPU has
    native bf16."""
    if name != "auto":
        return name
    if device == "cuda":
        import torch

        fp16_only = torch.cuda.is_available() and not torch.cuda.is_bf16_supported()
        return "float16" if fp16_only else "bfloat16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def optimizer_name(name: str, device: str) -> str:
    """The optimizer `train.optimizer: auto` stands for on `device`."""
    if name != "auto":
        return name
    return "paged_adamw_8bit" if device == "cuda" else "adamw_torch"


def loss_chunk_tokens(value: int | str, vocab: int, device: str) -> int:
    """Labelled tokens per LM-head tile: the recipe's `train.loss_chunk_tokens`, or the one `auto` stands for."""
    if value != "auto":
        return int(value)
    tokens = HEAD_TILE_LOGITS[device] // min(vocab, HEAD_TILE_VOCAB)
    return max(64, min(4096, 1 << (tokens.bit_length() - 1)))


def report_to(value: str | list[str]) -> str | list[str]:
    """The trackers `train.report_to: auto` stands for: tensorboard when it is installed."""
    if value != "auto":
        return value
    return "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
