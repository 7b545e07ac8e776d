"""A tiny random Stable Diffusion pipeline (UNet2DConditionModel, AutoencoderKL, CLIP text encoder, a CLIP tokenizer
trained in-process, DDPM scheduler) and synthetic captioned image sets of coloured shapes, built locally: nothing is
downloaded. `python tools/make_tiny_model.py OUT --arch sd` and `--images OUT` are their command line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15)}
# CLIP's own pre-tokenization (transformers' CLIPTokenizer rebuilds it around the vocabulary it is given).
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def shape_image(colour: str, shape: str, background: str, size: int, jitter: random.Random) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    r = size * jitter.uniform(0.25, 0.4)
    cx, cy = size / 2 + jitter.uniform(-0.1, 0.1) * size, size / 2 + jitter.uniform(-0.1, 0.1) * size
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
    return image


def captioned_images(out: str | Path, count: int = 24, size: int = 64, seed: int = 0) -> Path:
    """An image folder in the datasets `imagefolder` layout: PNGs and metadata.jsonl (file_name, text)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        colour, shape, background = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS))
        name = f"{i:04d}.png"
        shape_image(colour, shape, background, size, rng).save(out / name)
        rows.append({"file_name": name, "text": caption(colour, shape, background)})
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def instance_images(out: str | Path, count: int = 5, size: int = 64, seed: int = 0) -> Path:
    """A DreamBooth instance folder: a handful of pictures of one subject (a red triangle), no captions."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        shape_image("red", "triangle", rng.choice(list(BACKGROUNDS)), size, rng).save(out / f"instance_{i}.png")
    return out


def clip_tokenizer(max_length: int = 16, vocab_size: int = 400):
    """A CLIP tokenizer (byte-level BPE with CLIP's `</w>` word ends) trained on the captions' words."""
    from transformers import CLIPTokenizer

    words = [*COLOURS, *SHAPES, *BACKGROUNDS, "a", "on", "background", "photo", "of", "sks", "dog", "in", "bucket"]
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(6)) for _ in range(400)]
    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    bpe = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in bpe["merges"]]
    return CLIPTokenizer(vocab=bpe["vocab"], merges=merges, model_max_length=max_length)


def build_sd(out: str | Path, seed: int = 0, facts: str | Path | None = None, init_std: float | None = None) -> Path:
    """A tiny StableDiffusionPipeline saved in `out`: 32 px images (16 px latents), 2-block UNet with cross-attention,
    a 2-layer CLIP text encoder. `facts`: a base's pipeline facts (scheduler/scheduler_config.json, unet/config.json)
    whose prediction type and UNet attention layout the tiny one copies (SD 2.x: v-prediction, linear projections)."""
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(out)
    scheduler_config, unet_facts = {}, {}
    if facts is not None:
        scheduler_config = json.loads((Path(facts) / "scheduler" / "scheduler_config.json").read_text())
        unet_facts = json.loads((Path(facts) / "unet" / "config.json").read_text())
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=32,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=unet_facts.get("use_linear_projection", False),
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=32,
    )
    if init_std is not None:
        with torch.no_grad():
            for p in unet.parameters():
                if p.dim() > 1:
                    p.normal_(0, init_std)
    # The base's inference scheduler (SD's: DDIM or PNDM, scaled-linear betas), with its prediction type.
    scheduler_config = scheduler_config or {
        "_class_name": "DDIMScheduler",
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "epsilon",
    }
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    return out


def small_image_recipe(path: Path, base: Path, images: Path, **sections) -> Path:
    """Write a small fast text-to-image recipe to `path`: fp32, rank 4, 32 px, 4 steps, output in `run/` beside it.
    A dict in `sections` updates that section, anything else (output_dir) replaces it."""
    import yaml

    recipe = {
        "task": "text_to_image",
        "model": {"base": str(base), "compute_dtype": "float32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(images)},
        "diffusion": {"resolution": 32, "num_validation_images": 2, "validation_inference_steps": 2},
        "train": {
            "max_steps": 4,
            "batch_size": 4,
            "grad_accumulation": 1,
            "learning_rate": 1e-2,
            "lr_scheduler": "constant",
            "warmup_ratio": 0.0,
            "max_grad_norm": 1.0,
            "logging_steps": 1,
            "save_steps": 100,
        },
        "output_dir": str(path.parent / "run"),
    }
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values} if isinstance(values, dict) else values
    path.write_text(yaml.safe_dump(recipe))
    return path
