"""Train stage of the diffusion tasks (text_to_image, dreambooth): Stable Diffusion base → LoRA on the UNet's
attention (PEFT) → the transformers Trainer → the adapter in diffusers' format.

The model, loss and file format are diffusion.py's; the images are images.py's. Everything around training is the
language runs': the run directory, checkpoints and resuming (run.py), the callbacks that log, time and stop a run,
the manifest, several ranks through accelerate.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import bitsandbytes as bnb
import peft
import torch
from transformers import Trainer, TrainerCallback

from qlora_pipe import UserError, diffusion, images, model
from qlora_pipe.callbacks import LossLog
from qlora_pipe.config import Recipe, local_device, recipe_to_dict, report_to
from qlora_pipe.estimate import GIB, peak_memory
from qlora_pipe.manifest import atomic_dir, fingerprint_weights, write_manifest
from qlora_pipe.run import (
    ADAPTER,
    CLASS_IMAGES,
    DATA_CHECK,
    LORA_WEIGHTS,
    TRAIN_LOG,
    VALIDATION,
    check_launcher,
    check_output_dir,
    check_resume,
    is_writer,
    on_writer,
    process_state,
    wait_for_writer,
)
from qlora_pipe.train import check_trackers, loss_summary, ranks_facts, run_trainer, training_args

logger = logging.getLogger(__name__)


def train(recipe: Recipe, *, resume: str = "auto") -> Path:
    """Run the diffusion train stage; return the run directory (adapter/pytorch_lora_weights.safetensors,
    manifest.json, checkpoints/, train_log.jsonl, validation/). `resume` as for language runs."""
    out = Path(recipe.output_dir)
    check_resume(resume)
    trainer, facts, fixed_batch, prompt = build_trainer(recipe)
    validation = Validation(recipe, trainer.model.get_base_model(), out, prompt)

    def measure_before() -> dict:
        return {"denoise_loss_before": fixed_loss(trainer, fixed_batch)}

    run = run_trainer(trainer, recipe, resume, measure_before, (validation,))
    steps = trainer.state.global_step
    if validation.last != steps:
        validation.write(steps)
    seconds = run.clock.seconds()
    images_seen = steps * facts["ranks"]["global_batch"]
    metrics = {
        **run.metrics_before,
        "denoise_loss_after": fixed_loss(trainer, fixed_batch),
        "train_loss_mean": run.result.training_loss,
        **loss_summary(trainer.state.log_history),
        "steps": steps,
        "train_seconds": round(seconds, 2),
        "images_seen": images_seen,
        "images_per_second": round(images_seen / max(seconds, 1e-9), 3),
        "resumed_from": str(run.checkpoint) if run.checkpoint else None,
        **peak_memory(run.peak.earlier_peak),
        "peak_step_memory_measured_gib": round(run.peak.peak / GIB, 3) if run.peak.peak else None,
    }
    if is_writer():
        state_dict = peft.get_peft_model_state_dict(trainer.accelerator.unwrap_model(trainer.model))
        with atomic_dir(out / ADAPTER) as tmp:
            diffusion.save_lora(state_dict, recipe, tmp)
        write_manifest(out, "train", recipe=recipe_to_dict(recipe), **facts, adapter=ADAPTER, metrics=metrics)
        logger.info("LoRA written to %s", out / ADAPTER / LORA_WEIGHTS)
    wait_for_writer()
    return out


def fixed_loss(trainer: Trainer, batch: dict) -> float:
    denoiser = trainer.model.get_base_model()
    was_training = denoiser.training
    denoiser.eval()
    loss = denoiser.fixed_loss(batch, trainer.args.per_device_train_batch_size)
    denoiser.train(was_training)
    return round(loss, 6)


class DrawEpoch(TrainerCallback):
    """Tells the data set which epoch its samples draw for, before the epoch's first batch is fetched (also for a
    resumed epoch). accelerate's data loader forwards its set_epoch to the data set only when the sampler is not
    sharded, so under DDP it would not."""

    def __init__(self, dataset: images.ImageTextDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch is the float progress: exactly e at the start of epoch e, e + k/n when resumed k steps into it
        self.dataset.epoch = int(state.epoch)


class Validation(TrainerCallback):
    """A grid of validation images (same prompt, same seeds) every train.eval_steps, written by the writer into
    OUTPUT_DIR/validation/step-NNNNNN.png."""

    def __init__(self, recipe: Recipe, denoiser: diffusion.Denoiser, out: Path, prompt: str):
        self.recipe, self.denoiser, self.folder, self.last = recipe, denoiser, out / VALIDATION, None
        self.prompt, self.every = prompt, recipe.train.eval_steps

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and state.global_step % self.every == 0 and not control.should_training_stop:
            self.write(state.global_step)

    def write(self, step: int) -> None:
        g = self.recipe.diffusion
        self.last = step
        if not is_writer() or g.num_validation_images == 0:
            return
        d = self.denoiser
        was_training = d.training
        d.eval()
        pipe = diffusion.pipeline_from(
            self.recipe.model.base, {"unet": d.unet, "vae": d.vae, "text_encoder": d.text_encoder}, d.unet.dtype
        )
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            shots = diffusion.render(
                pipe,
                self.prompt,
                g.num_validation_images,
                g.validation_inference_steps,
                g.validation_guidance,
                self.recipe.train.seed,
            )
        d.train(was_training)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step-{step:06d}.png"
        diffusion.image_grid(shots).save(path)
        logger.info("validation images (%r) at step %d: %s", self.prompt, step, path)


def build_trainer(recipe: Recipe) -> tuple[Trainer, dict, dict, str]:
    """Checks, images, pipeline components, LoRA and the Trainer; returns it, the manifest's facts, the batch the
    fixed denoising loss is measured on and the validation prompt (diffusion.validation_prompt, else the first
    caption or the instance prompt)."""
    out = Path(recipe.output_dir)
    check_launcher()
    check_output_dir(out)
    wait_for_writer()
    base = diffusion.check_pipeline_base(recipe.model.base)
    device = local_device()
    nf4 = recipe.model.quantization == "nf4"
    if nf4 and device != "cuda":
        raise UserError(
            "model.quantization: nf4 for a diffusion task needs a CUDA GPU (diffusers' bitsandbytes quantizer "
            "quantizes on CUDA only); set model.quantization: none (LoRA on a full-precision UNet)"
        )
    if model.fsdp_version() is not None:
        raise UserError("FSDP: diffusion runs scale out with DDP (recipes/accelerate/ddp.yaml)")
    check_trackers(report_to(recipe.train.report_to))
    examples, data_facts = images.read_examples(recipe)
    on_writer(lambda: check_data(recipe, examples, out))
    compute_dtype = model.resolve_compute_dtype(recipe.model.compute_dtype)
    parts = diffusion.load_components(base, compute_dtype, nf4)
    prediction = parts.noise_scheduler.config.prediction_type
    if prediction not in diffusion.PREDICTIONS:
        raise UserError(
            f"model.base: its scheduler predicts {prediction!r}; LoRA training supports "
            f"{' and '.join(diffusion.PREDICTIONS)}"
        )
    class_examples = class_images(recipe, base, parts, compute_dtype) if recipe.diffusion.class_prompt else None
    quantized = quantized_modules(parts.unet) if nf4 else None  # named before LoRA wraps them
    torch.manual_seed(recipe.train.seed)  # LoRA A is drawn at get_peft_model time
    denoiser = diffusion.Denoiser(parts, recipe)
    net = peft.get_peft_model(denoiser, diffusion.lora_config(recipe))
    # The adapter, its gradients and optimizer states are fp32 whatever the frozen weights' dtype (as in train.py).
    for param in net.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    draws = diffusion.latent_draws(parts.vae.config, parts.noise_scheduler.config, recipe.diffusion.resolution)
    dataset = images.ImageTextDataset(examples, parts.tokenizer, recipe, draws, class_examples)
    args = training_args(recipe, out, compute_dtype, has_eval=False)
    args.remove_unused_columns = False  # the Denoiser takes the collated batch as it is
    args.include_num_input_tokens_seen = "no"  # image runs count images
    trainer = Trainer(
        model=net,
        args=args,
        train_dataset=dataset,
        data_collator=images.collate,
        callbacks=[LossLog(out / TRAIN_LOG), DrawEpoch(dataset)],
    )
    fixed = fixed_batch(examples, class_examples, parts.tokenizer, recipe, draws)
    facts = {
        "base": {
            "path": base,
            "model_type": diffusion.PIPELINES[0],
            "prediction_type": denoiser.prediction_type,
            "weights_fingerprint": fingerprint_weights(diffusion.unet_weight_files(base)) or None,
        },
        "quantization": {
            "method": recipe.model.quantization,
            "load_dtype": str(compute_dtype).removeprefix("torch."),
            "compute_dtype": str(compute_dtype).removeprefix("torch."),
            "device_kind": device,
            **({**model.NF4, "quantized_modules": quantized} if nf4 else {}),
        },
        "data": {**data_facts, "class_images": len(class_examples) if class_examples else 0},
        "task": recipe.task,
        "labels": None,
        "packing": False,
        "ranks": ranks_facts(trainer),
    }
    return trainer, facts, fixed, recipe.diffusion.validation_prompt or examples[0].text


def quantized_modules(unet: torch.nn.Module) -> list[str]:
    return [name for name, m in unet.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def check_data(recipe: Recipe, examples: list[images.Example], out: Path) -> None:
    """Read and check every training image (on the writer; its verdict reaches every rank) and keep the report."""
    report = images.check_images(examples, recipe.diffusion.resolution)
    out.mkdir(parents=True, exist_ok=True)
    (out / DATA_CHECK).write_text(json.dumps({"train": report}, indent=2) + "\n")


def class_images(recipe: Recipe, base: str, parts: diffusion.Components, dtype: torch.dtype) -> list[images.Example]:
    """DreamBooth's class images: those in diffusion.class_dir first, the missing ones generated by the base pipeline
    (before LoRA is added) with the class prompt, by the writer, one file at a time (an interrupted run keeps what
    it generated)."""
    g = recipe.diffusion
    folder = Path(g.class_dir) if g.class_dir else Path(recipe.output_dir) / CLASS_IMAGES

    def generate() -> None:
        from tqdm.auto import tqdm

        folder.mkdir(parents=True, exist_ok=True)
        have = len(images.image_files(folder))
        if have >= g.num_class_images:
            return
        pipe = diffusion.pipeline_from(
            base, {"unet": parts.unet, "vae": parts.vae, "text_encoder": parts.text_encoder}, dtype
        )
        pipe.to(process_state().device)  # where the writer trains: the GPU, not the CPU the parts were loaded on
        pipe.set_progress_bar_config(disable=True)
        for i in tqdm(range(have, g.num_class_images), desc="generating class images", unit="image"):
            with torch.no_grad():
                steps, guidance = diffusion.CLASS_IMAGE_STEPS, diffusion.CLASS_IMAGE_GUIDANCE
                shot = diffusion.render(pipe, g.class_prompt, 1, steps, guidance, recipe.train.seed + i)[0]
            tmp = folder / f".class-{i:05d}.png.tmp"
            shot.save(tmp, format="PNG")
            tmp.rename(folder / f"class-{i:05d}.png")

    on_writer(generate)
    examples = [images.Example(p, g.class_prompt, str(p)) for p in images.image_files(folder)][: g.num_class_images]
    images.check_images(examples, g.resolution, "diffusion.class_dir")
    return examples


def fixed_batch(
    examples: list[images.Example],
    class_examples: list[images.Example] | None,
    tokenizer,
    recipe: Recipe,
    draws: dict,
) -> dict:
    """The first training images, centre-cropped and unflipped, with their epoch-0 draws of noise and timestep: the
    denoising loss before and after training is measured on them."""
    still = dataclasses.replace(
        recipe, diffusion=dataclasses.replace(recipe.diffusion, center_crop=True, random_flip=False)
    )
    fixed = images.ImageTextDataset(examples[: diffusion.FIXED_LOSS_IMAGES], tokenizer, still, draws, class_examples)
    count = min(len(fixed), diffusion.FIXED_LOSS_IMAGES)
    return images.collate([fixed[i] for i in range(count)])
