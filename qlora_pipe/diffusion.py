"""Stable Diffusion pieces shared by the diffusion stages: loading a pipeline's components, the denoising loss
(DDPM noise, epsilon or v-prediction as the base's scheduler says, min-SNR-γ, DreamBooth's prior preservation), the
LoRA adapter in diffusers' file format, validation grids, and pipelines for inference (a base + a run's LoRA, or a
merged pipeline directory).

diffusers' LoRA training scripts are one long function with their own accelerate loop; we train the same model and
loss through the transformers Trainer instead (train_diffusion.py), which gives image runs the checkpoints, resuming,
clean interruption and scale-out of language runs. For that the frozen UNet, VAE and text encoder sit in one module
(Denoiser) whose forward returns the loss, and PEFT wraps that module (LoRA only on the UNet's and text encoder's
attention projections, selected by a pattern), so that checkpoints hold the adapter alone.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
import torch.nn.functional as F
from PIL import Image

from qlora_pipe import UserError
from qlora_pipe.config import TEXT_ENCODER_TARGETS, Recipe
from qlora_pipe.model import NF4
from qlora_pipe.rows import check_hub_id
from qlora_pipe.run import LORA_WEIGHTS, image_run, load_run

logger = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
PIPELINES = ("StableDiffusionPipeline",)
PREDICTIONS = ("epsilon", "v_prediction")
# Where PEFT's keys for a LoRA on the Denoiser start, per pipeline component.
PEFT_PREFIX = "base_model.model."
COMPONENTS = ("unet", "text_encoder")
# The fixed denoising loss (before/after training) is measured on at most this many training images.
FIXED_LOSS_IMAGES = 16
# DreamBooth's class images are made as diffusers' DreamBooth script makes them: the pipeline's default 50 steps and
# guidance 7.5.
CLASS_IMAGE_STEPS = 50
CLASS_IMAGE_GUIDANCE = 7.5


def check_pipeline_base(base: str, key: str = "model.base") -> str:
    """A local diffusers pipeline directory (model_index.json naming a supported pipeline) or a hub id."""
    path = Path(base).expanduser()
    if not path.exists() and base.count("/") == 1 and not base.startswith((".", "/", "~")):
        check_hub_id(base, key, "directory")
        return base
    if not path.is_dir():
        raise UserError(f"{key}: directory not found: {base} (give a diffusers pipeline directory or a hub id)")
    index = path / MODEL_INDEX
    if not index.is_file():
        raise UserError(
            f"{key}: {base} is not a diffusers pipeline (no {MODEL_INDEX}); the diffusion tasks work on Stable "
            "Diffusion pipelines such as stabilityai/stable-diffusion-2-1"
        )
    name = json.loads(index.read_text()).get("_class_name")
    if name not in PIPELINES:
        raise UserError(f"{key}: {base} is a {name}; the diffusion tasks support {', '.join(PIPELINES)} (SD 1.x, 2.x)")
    return base


def require_diffusers() -> None:
    """diffusers is an optional extra: say how to get it instead of an ImportError."""
    if importlib.util.find_spec("diffusers") is None:
        raise UserError(
            "the diffusion tasks need diffusers, an optional extra: pip install 'qlora_pipe[diffusion]' (or "
            "pip install diffusers)"
        )


def full_pipeline(source: str | Path, dtype: torch.dtype):
    """A whole StableDiffusionPipeline (with the safety checker and feature extractor the directory has)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(source, dtype=dtype)


def makes_images(path: str | Path) -> bool:
    """An image run or a diffusers pipeline directory (what `generate` makes images from)."""
    return image_run(path) or (Path(path) / MODEL_INDEX).is_file()


def load_for_generation(path: str | Path, dtype: torch.dtype):
    """A pipeline to generate with: an image run's base with its LoRA loaded (unfused, as trained), or a pipeline
    directory (a merged run, any StableDiffusionPipeline)."""
    require_diffusers()
    if image_run(path):
        run = load_run(path, images=True)
        pipe = full_pipeline(run.base, dtype)
        pipe.load_lora_weights(run.adapter)
        return pipe
    if not Path(path).is_dir():
        raise UserError(f"{path}: no such directory (give an image run or a diffusers pipeline directory)")
    return full_pipeline(check_pipeline_base(str(path), key=str(path)), dtype)


def unet_weight_files(base: str) -> list[Path]:
    folder = Path(base) / "unet"
    return sorted(folder.glob("*.safetensors")) if folder.is_dir() else []


def bnb_unet_config(compute_dtype: torch.dtype):
    """diffusers' bitsandbytes quantizer for the UNet, with QLoRA's NF4 settings (it quantizes on CUDA only)."""
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=NF4["quant_type"],
        bnb_4bit_use_double_quant=NF4["double_quant"],
        bnb_4bit_compute_dtype=compute_dtype,
    )


@dataclass
class Components:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object


def load_components(base: str, dtype: torch.dtype, nf4: bool = False) -> Components:
    """The pipeline's parts for training, frozen, in `dtype`; the UNet in NF4 when asked (CUDA)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    quant = {"quantization_config": bnb_unet_config(dtype)} if nf4 else {}  # diffusers places it on the GPU
    parts = Components(
        tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(base, subfolder="text_encoder", dtype=dtype),
        vae=AutoencoderKL.from_pretrained(base, subfolder="vae", dtype=dtype),
        unet=UNet2DConditionModel.from_pretrained(base, subfolder="unet", dtype=dtype, **quant),
        # DDPM noise for training, with the betas and prediction type (epsilon, v) of the base's own scheduler
        noise_scheduler=DDPMScheduler.from_pretrained(base, subfolder="scheduler"),
    )
    for module in (parts.text_encoder, parts.vae, parts.unet):
        module.requires_grad_(False)
    return parts


class Denoiser(torch.nn.Module):
    """The trained model of a diffusion run: forward(**batch) returns the denoising loss of a batch of
    images.ImageTextDataset items, as diffusers' text-to-image and DreamBooth LoRA scripts compute it."""

    def __init__(self, parts: Components, recipe: Recipe):
        super().__init__()
        self.unet, self.text_encoder, self.vae = parts.unet, parts.text_encoder, parts.vae
        self.noise_scheduler = parts.noise_scheduler
        self.snr_gamma = recipe.diffusion.snr_gamma
        self.prior_loss_weight = recipe.diffusion.prior_loss_weight
        self.train_text_encoder = recipe.diffusion.train_text_encoder

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **options) -> None:
        """The Trainer's train.gradient_checkpointing: diffusers' own (non-reentrant) checkpointing of every UNet
        block, and transformers' of the text encoder's layers when it trains. The Trainer's `options` (which layers)
        are for transformers models."""
        self.unet.enable_gradient_checkpointing()
        if self.train_text_encoder:
            self.text_encoder.gradient_checkpointing_enable({"use_reentrant": False})

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.unet.is_gradient_checkpointing

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    def encode(self, pixel_values: torch.Tensor, posterior_noise: torch.Tensor) -> torch.Tensor:
        """A sample of the VAE's latent distribution (mean + std × the sample's own noise), scaled for the UNet."""
        with torch.no_grad():
            dist = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist
            return (dist.mean + dist.std * posterior_noise.to(dist.mean.dtype)) * self.vae.config.scaling_factor

    def sample_losses(self, batch: dict) -> torch.Tensor:
        """The (min-SNR weighted) MSE of each sample's prediction, at its own timestep and noise."""
        sched, noise, timesteps = self.noise_scheduler, batch["noise"], batch["timestep"]
        latents = self.encode(batch["pixel_values"], batch["posterior_noise"])
        noisy = sched.add_noise(latents, noise.to(latents.dtype), timesteps)
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            states = self.text_encoder(batch["input_ids"], return_dict=False)[0]
        if self.prediction_type == "v_prediction":
            target = sched.get_velocity(latents, noise.to(latents.dtype), timesteps)
        else:
            target = noise
        pred = self.unet(noisy.to(self.unet.dtype), timesteps, states.to(self.unet.dtype), return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return loss * self.snr_weights(timesteps) if self.snr_gamma is not None else loss

    def snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """min(SNR, γ)/SNR for epsilon, min(SNR, γ)/(SNR + 1) for v-prediction (Hang et al. 2023, as diffusers)."""
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.noise_scheduler, timesteps)
        weights = torch.clamp(snr, max=self.snr_gamma)
        return weights / (snr + 1) if self.prediction_type == "v_prediction" else weights / snr

    def combine(self, losses: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """DreamBooth's prior preservation: mean instance loss + prior_loss_weight x mean class loss."""
        if not prior.any():
            return losses.mean()
        return losses[~prior].mean() + self.prior_loss_weight * losses[prior].mean()

    def forward(self, **batch: torch.Tensor) -> dict:
        """The batch's loss. Its noise, timesteps and latent samples come with it, drawn per sample (images.py), so
        the loss of a sample does not depend on the batch it is in, on how many ranks share the batch, or on where
        a run was resumed."""
        return {"loss": self.combine(self.sample_losses(batch), batch["prior"])}

    def fixed_loss(self, batch: dict, chunk: int) -> float:
        """The denoising loss of `batch` (training images with fixed draws), `chunk` images at a time: the same
        number before and after training compares the models."""
        device = self.unet.device
        with torch.no_grad():
            parts = [
                self.sample_losses({k: v[start : start + chunk].to(device) for k, v in batch.items()})
                for start in range(0, len(batch["prior"]), chunk)
            ]
        return self.combine(torch.cat(parts), batch["prior"].to(device)).item()


def latent_draws(vae_config, scheduler_config, resolution: int) -> dict:
    """What each training sample draws (images.py): the shape of its latents and the number of timesteps."""
    factor = 2 ** (len(vae_config.block_out_channels) - 1)
    side = resolution // factor
    return {"shape": (vae_config.latent_channels, side, side), "timesteps": scheduler_config.num_train_timesteps}


def lora_config(recipe: Recipe) -> peft.LoraConfig:
    """LoRA on the Denoiser: the recipe's target modules inside the UNet (and CLIP's attention projections with
    train_text_encoder), chosen by a pattern anchored at the component, so that the VAE's attention is left alone."""
    lo = recipe.lora

    def pattern(component: str, names) -> str:
        return rf"{component}\..*\.({'|'.join(re.escape(n) for n in names)})"

    targets = [pattern("unet", lo.target_modules)]
    if recipe.diffusion.train_text_encoder:
        targets.append(pattern("text_encoder", TEXT_ENCODER_TARGETS))
    return peft.LoraConfig(
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        target_modules=f"^({'|'.join(targets)})$",
        use_rslora=lo.use_rslora,
        use_dora=lo.use_dora,
        init_lora_weights={"gaussian": "gaussian", "false": False}.get(lo.init, True),
    )


def component_metadata(recipe: Recipe, component: str) -> dict:
    """The LoRA config diffusers stores beside a component's weights, so that loading keeps alpha, rslora, DoRA."""
    lo = recipe.lora
    names = list(lo.target_modules) if component == "unet" else list(TEXT_ENCODER_TARGETS)
    return peft.LoraConfig(
        r=lo.r, lora_alpha=lo.alpha, target_modules=names, use_rslora=lo.use_rslora, use_dora=lo.use_dora
    ).to_dict()


def save_lora(state: dict[str, torch.Tensor], recipe: Recipe, out: Path) -> Path:
    """Write the Denoiser's PEFT state dict as diffusers' `pytorch_lora_weights.safetensors` in `out`."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    parts = {}
    for component in COMPONENTS:
        prefix = f"{PEFT_PREFIX}{component}."
        own = {k.removeprefix(prefix): v.detach().float().cpu() for k, v in state.items() if k.startswith(prefix)}
        parts[component] = convert_state_dict_to_diffusers(own) if own else None
    text_metadata = component_metadata(recipe, "text_encoder") if parts["text_encoder"] else None
    StableDiffusionPipeline.save_lora_weights(
        out,
        unet_lora_layers=parts["unet"],
        text_encoder_lora_layers=parts["text_encoder"],
        unet_lora_adapter_metadata=component_metadata(recipe, "unet"),
        text_encoder_lora_adapter_metadata=text_metadata,
        weight_name=LORA_WEIGHTS,
    )
    return out / LORA_WEIGHTS


def image_grid(images: list[Image.Image]) -> Image.Image:
    cols = min(4, len(images))
    rows = -(-len(images) // cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid


def pipeline_from(base: str, parts: dict, dtype: torch.dtype):
    """A StableDiffusionPipeline around given components; the rest (tokenizer, inference scheduler) from `base`."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        base, **parts, dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def render(pipe, prompt: str, count: int, steps: int, guidance: float, seed: int) -> list[Image.Image]:
    """`count` images of `prompt`, seeded; the global RNG is left as it was (a resumed run draws what an
    uninterrupted one does, with or without validation)."""
    device = pipe.unet.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        generator = torch.Generator(device).manual_seed(seed)
        return pipe(
            prompt,
            num_images_per_prompt=count,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
        ).images
