"""LoRA for Stable Diffusion (tasks text_to_image and dreambooth) on a tiny random pipeline, offline: training lowers
the denoising loss; DreamBooth's loss is instance + prior_loss_weight × class; the LoRA file written in diffusers'
format loads back (`load_lora_weights`) into what was trained; the merged pipeline equals base + LoRA; a resumed run
equals an uninterrupted one; bad images are named; NF4 is refused on the CPU."""

from __future__ import annotations

import dataclasses
import json
import shutil

import peft
import pytest
import torch
from conftest import ROOT
from PIL import Image
from tiny_diffusion import captioned_images, instance_images, small_image_recipe

from qlora_pipe import UserError, cli, diffusion, images
from qlora_pipe.config import load_recipe
from qlora_pipe.merge_diffusion import merge
from qlora_pipe.run import LORA_WEIGHTS, MERGE_REPORT, load_run
from qlora_pipe.train_diffusion import train

SD21 = "recipes/seeds/stable-diffusion-2-1"  # a tiny pipeline like it predicts v


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    return captioned_images(tmp_path_factory.mktemp("shapes"), count=16, size=40)


def image_recipe(tmp_path, base, images_from, **sections) -> object:
    return small_image_recipe(tmp_path / "recipe.yaml", base, images_from, **sections)


def test_diffusion_defaults_target_the_unet_attention_in_full_precision(tmp_path, tiny_sd, shapes):
    recipe = load_recipe(image_recipe(tmp_path, tiny_sd(), shapes))
    assert recipe.lora.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert recipe.model.quantization == "none"


def test_training_lowers_the_denoising_loss_and_writes_validation_grids(tmp_path, tiny_sd, shapes, capsys):
    path = image_recipe(
        tmp_path,
        tiny_sd(),
        shapes,
        diffusion={"snr_gamma": 5.0, "random_flip": True},
        train={"max_steps": 30, "eval_steps": 15},
    )
    assert cli.main(["train", str(path)]) == 0
    run = tmp_path / "run"
    metrics = json.loads((run / "manifest.json").read_text())["metrics"]
    assert metrics["denoise_loss_after"] < 0.9 * metrics["denoise_loss_before"]
    assert sorted(p.name for p in (run / "validation").iterdir()) == ["step-000015.png", "step-000030.png"]
    assert Image.open(run / "validation" / "step-000030.png").size == (64, 32)  # two 32 px images side by side
    assert cli.main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "denoise loss" in out and "2 grids" in out
    assert Image.open(run / "validation.png").size[1] == 2 * (32 + 16)


def test_v_prediction_comes_from_the_scheduler_and_min_snr_weights_follow_it(tiny_sd, tmp_path, shapes):
    recipe = load_recipe(image_recipe(tmp_path, tiny_sd(SD21), shapes, diffusion={"snr_gamma": 5.0}))
    parts = diffusion.load_components(recipe.model.base, torch.float32)
    denoiser = diffusion.Denoiser(parts, recipe)
    assert denoiser.prediction_type == "v_prediction"
    t = torch.tensor([10, 500, 990])
    alpha = parts.noise_scheduler.alphas_cumprod[t]
    snr = alpha / (1 - alpha)
    assert torch.allclose(denoiser.snr_weights(t), torch.clamp(snr, max=5.0) / (snr + 1))


def test_dreambooth_loss_is_instance_plus_weighted_prior(tiny_sd, tmp_path):
    """The loss of a batch (instance images first, then class images) is mean instance MSE + prior_loss_weight ×
    mean class MSE, each against the target at the sample's own timestep."""
    folder = instance_images(tmp_path / "dog", count=2, size=32)
    raw = image_recipe(
        tmp_path,
        tiny_sd(SD21),
        folder,
        task="dreambooth",
        diffusion={
            "instance_prompt": "a photo of sks dog",
            "class_prompt": "a photo of dog",
            "prior_loss_weight": 0.7,
        },
    )
    recipe = load_recipe(raw)
    parts = diffusion.load_components(recipe.model.base, torch.float32)
    denoiser = diffusion.Denoiser(parts, recipe)
    examples = images.instance_folder(folder, recipe.diffusion.instance_prompt)
    classes = [images.Example(examples[0].image, "a photo of dog", "class")]
    draws = diffusion.latent_draws(parts.vae.config, parts.noise_scheduler.config, 32)
    dataset = images.ImageTextDataset(examples, parts.tokenizer, recipe, draws, classes)
    batch = images.collate([dataset[0], dataset[1]])
    assert batch["prior"].tolist() == [False, False, True, True]
    loss = denoiser(**batch)["loss"]

    with torch.no_grad():
        dist = parts.vae.encode(batch["pixel_values"]).latent_dist
        latents = (dist.mean + dist.std * batch["posterior_noise"]) * parts.vae.config.scaling_factor
        noise, t = batch["noise"], batch["timestep"]
        states = parts.text_encoder(batch["input_ids"])[0]
        pred = parts.unet(parts.noise_scheduler.add_noise(latents, noise, t), t, states).sample
    target = parts.noise_scheduler.get_velocity(latents, noise, t)
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    expected = per_sample[:2].mean() + 0.7 * per_sample[2:].mean()
    assert torch.allclose(loss, expected, rtol=1e-5)
    # each sample's draws are its own: the same item alone gives the same loss as in the batch
    alone = denoiser.sample_losses(images.collate([dataset[1]]))
    assert torch.allclose(alone, per_sample[[1, 3]], rtol=1e-5)


def test_dreambooth_run_generates_class_images_and_trains(tiny_sd, tmp_path):
    folder = instance_images(tmp_path / "dog", count=3, size=32)
    raw = image_recipe(
        tmp_path,
        tiny_sd(),
        folder,
        task="dreambooth",
        diffusion={"instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog", "num_class_images": 2},
        train={"max_steps": 2, "batch_size": 1},
    )
    run = train(load_recipe(raw))
    assert len(list((run / "class_images").glob("*.png"))) == 2
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["data"]["class_images"] == 2 and manifest["data"]["images"] == 3
    assert (run / "adapter" / LORA_WEIGHTS).exists()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_sd, shapes):
    """A text-to-image run with LoRA on the UNet and the text encoder, alpha ≠ r, a checkpoint at its last step."""
    tmp = tmp_path_factory.mktemp("image-run")
    path = image_recipe(
        tmp,
        tiny_sd(SD21),
        shapes,
        diffusion={"train_text_encoder": True, "num_validation_images": 0},
        train={"max_steps": 4, "save_steps": 4},
    )
    return train(load_recipe(path))


def unet_and_text_outputs(unet, text_encoder, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    ids = tokenizer(["a red circle", ""], padding="max_length", max_length=tokenizer.model_max_length).input_ids
    with torch.no_grad():
        states = text_encoder(torch.tensor(ids))[0]
        return unet(latents, torch.tensor([100, 800]), states).sample, states


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / a.norm()).item()


def test_lora_file_loads_back_into_what_was_trained(trained_run):
    """pytorch_lora_weights.safetensors through `pipe.load_lora_weights` computes what the trained model (the PEFT
    checkpoint of the last step, loaded by PEFT) computes."""
    run = load_run(trained_run, images=True)
    parts = diffusion.load_components(run.base, torch.float32)
    trained = peft.PeftModel.from_pretrained(
        diffusion.Denoiser(parts, run.recipe), trained_run / "checkpoints" / "checkpoint-4"
    )
    expected = unet_and_text_outputs(
        trained.base_model.model.unet, trained.base_model.model.text_encoder, parts.tokenizer
    )
    pipe = diffusion.full_pipeline(run.base, torch.float32)
    pipe.load_lora_weights(trained_run / "adapter")
    got = unet_and_text_outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    base = diffusion.full_pipeline(run.base, torch.float32)
    untrained = unet_and_text_outputs(base.unet, base.text_encoder, base.tokenizer)
    for e, g, u in zip(expected, got, untrained, strict=True):
        assert relative(e, g) <= 1e-5
        assert relative(e, u) > 1e-4  # the adapter does change both components


def test_merged_pipeline_equals_base_plus_lora(trained_run, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    assert cli.main(["merge", str(trained_run), "--out", str(tmp_path / "merged")]) == 0
    merged = tmp_path / "merged"
    report = json.loads((merged / MERGE_REPORT).read_text())
    assert report["components"]["unet"]["relative_error"] <= 1e-5
    assert report["components"]["text_encoder"]["relative_error"] <= 1e-5
    assert json.loads((merged / "manifest.json").read_text())["stage"] == "merge"
    pipe = StableDiffusionPipeline.from_pretrained(merged)  # standalone: no LoRA to load
    lora = diffusion.full_pipeline(load_run(trained_run, images=True).base, torch.float32)
    lora.load_lora_weights(trained_run / "adapter")
    for a, b in zip(
        unet_and_text_outputs(lora.unet, lora.text_encoder, lora.tokenizer),
        unet_and_text_outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer),
        strict=True,
    ):
        assert relative(a, b) <= 1e-5
    image = tmp_path / "image.png"
    argv = ["generate", str(merged), "--prompt", "a red circle", "--out", str(image), "--steps", "2", "--seed", "1"]
    assert cli.main(argv) == 0
    assert Image.open(image).size == (32, 32)


def test_generate_from_a_run_and_clear_errors(trained_run, tmp_path, capsys):
    image = tmp_path / "run.png"
    assert cli.main(["generate", str(trained_run), "--prompt", "x", "--out", str(image), "--steps", "2"]) == 0
    assert image.exists()
    assert cli.main(["generate", str(trained_run), "--prompt", "x"]) == 2
    assert "give --out FILE.png" in capsys.readouterr().err
    assert cli.main(["eval", str(trained_run)]) == 2
    assert "is an image run" in capsys.readouterr().err
    assert cli.main(["merge", str(trained_run), "--mode", "original"]) == 2
    assert "--mode: for language-model runs" in capsys.readouterr().err


def test_resumed_image_run_equals_uninterrupted(tiny_sd, shapes, tmp_path):
    """Random crops and flips, noise and timesteps: a run stopped at step 3 and resumed to 6 trains what a run of 6
    steps does."""
    flips = {"random_flip": True, "num_validation_images": 0}
    for name in ("whole", "parts"):
        (tmp_path / name).mkdir()
    whole = image_recipe(
        tmp_path / "whole", tiny_sd(), shapes, diffusion=flips, train={"max_steps": 6, "save_steps": 3}
    )
    train(load_recipe(whole))
    parts = image_recipe(
        tmp_path / "parts", tiny_sd(), shapes, diffusion=flips, train={"max_steps": 3, "save_steps": 3}
    )
    train(load_recipe(parts))
    resumed = train(load_recipe(parts, ["train.max_steps=6"]))
    from safetensors.torch import load_file

    a = load_file(tmp_path / "whole" / "run" / "adapter" / LORA_WEIGHTS)
    b = load_file(resumed / "adapter" / LORA_WEIGHTS)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((resumed / "manifest.json").read_text())["metrics"]["resumed_from"].endswith("checkpoint-3")


def test_bad_images_are_reported_by_file(tiny_sd, tmp_path, capsys):
    folder = captioned_images(tmp_path / "imgs", count=3, size=40)
    (folder / "0000.png").write_bytes(b"not a png")
    Image.new("I;16", (40, 40)).save(folder / "0001.png")
    Image.new("RGB", (8, 8)).save(folder / "0002.png")
    path = image_recipe(tmp_path, tiny_sd(), folder)
    for command in ("check-data", "train"):
        assert cli.main([command, str(path)]) == 2
        err = capsys.readouterr().err
        assert "3 of 3 images cannot be trained on" in err
        assert "0000.png: unreadable" in err and "0001.png: mode I;16" in err
        assert "0002.png: 8x8 is too small for diffusion.resolution 32" in err
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_metadata_problems_name_the_line(tiny_sd, tmp_path, capsys):
    folder = captioned_images(tmp_path / "imgs", count=2, size=40)
    with (folder / "metadata.jsonl").open("a") as f:
        f.write('{"file_name": "missing.png", "text": "x"}\n{"file_name": "0000.png"}\nnot json\n')
    assert cli.main(["check-data", str(image_recipe(tmp_path, tiny_sd(), folder))]) == 2
    err = capsys.readouterr().err
    assert "metadata.jsonl:3: missing.png is not in" in err
    assert "metadata.jsonl:4: needs a `text` caption string" in err
    assert "metadata.jsonl:5: not JSON" in err


def test_hub_image_data_set_columns_are_mapped(monkeypatch, tmp_path, tiny_sd):
    import datasets

    table = datasets.Dataset.from_dict(
        {"img": [Image.new("RGB", (40, 40), "red")] * 2, "caption": ["a red square on a white background"] * 2}
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: table)
    columns = {"image": "img", "text": "caption"}
    recipe = load_recipe(image_recipe(tmp_path, tiny_sd(), "someone/shapes", data={"columns": columns}))
    examples, facts = images.read_examples(recipe)
    assert [e.text for e in examples] == ["a red square on a white background"] * 2
    assert images.check_images(examples, 32)["images"] == 2
    unmapped = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, columns=None))
    with pytest.raises(UserError, match="has no column image, text"):
        images.read_examples(unmapped)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_nf4_for_diffusion_is_refused_on_the_cpu(tiny_sd, shapes, tmp_path, capsys):
    path = image_recipe(tmp_path, tiny_sd(), shapes, model={"quantization": "nf4"})
    assert cli.main(["train", str(path)]) == 2
    assert "model.quantization: nf4 for a diffusion task needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="diffusers' bitsandbytes quantizer needs CUDA")
def test_nf4_unet_trains_and_merges_on_cuda(tiny_sd, shapes, tmp_path):
    path = image_recipe(tmp_path, tiny_sd(), shapes, model={"quantization": "nf4"}, train={"max_steps": 2})
    run = train(load_recipe(path))
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["quantization"]["quantized_modules"]
    merged = merge(run)
    report = json.loads((merged / MERGE_REPORT).read_text())
    assert report["written_mode"] == "dequantized"
    assert report["components"]["unet"]["relative_error"] <= 1e-5


def test_dequantized_merge_uses_the_nf4_weights(trained_run, tmp_path):
    """A run recorded as NF4 (as CUDA training records it) is merged into the dequantized weights it trained on."""
    run = tmp_path / "nf4-run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoints", "merged"))
    manifest = json.loads((run / "manifest.json").read_text())
    names = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    manifest["quantization"] |= {
        "method": "nf4",
        "quant_type": "nf4",
        "double_quant": True,
        "blocksize": 64,
        "quant_storage": "uint8",
        "quantized_modules": names,
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    merged = merge(run)
    report = json.loads((merged / MERGE_REPORT).read_text())
    assert report["written_mode"] == "dequantized" and report["components"]["unet"]["relative_error"] <= 1e-5
    original = merge(trained_run, out=tmp_path / "original")
    from diffusers import UNet2DConditionModel

    from qlora_pipe import quant

    def weight(source) -> torch.Tensor:
        return UNet2DConditionModel.from_pretrained(source, subfolder="unet").get_submodule(names[0]).weight.detach()

    w = weight(load_run(trained_run, images=True).base)
    nf4 = quant.dequantize_fp32(*quant.quantize_nf4(w, manifest["quantization"], torch.device("cpu")))
    assert not torch.equal(nf4, w)
    # merged into the NF4 weight: the same update ΔW on top of dequantize(quantize(W)) instead of W
    assert torch.allclose(weight(merged) - nf4, weight(original) - w, atol=1e-6)


def test_interrupted_image_run_checkpoints_and_resumes(tiny_sd, shapes, tmp_path, monkeypatch, capsys):
    """SIGINT during an image run: a checkpoint at the end of the step, exit status 130, and the same command goes on
    from it."""
    import os
    import signal

    from transformers import TrainerCallback

    from qlora_pipe import train_diffusion

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGINT)

    build = train_diffusion.build_trainer

    def with_interrupt(recipe):
        built = build(recipe)
        built[0].add_callback(Interrupt())
        return built

    path = image_recipe(tmp_path, tiny_sd(), shapes, diffusion={"num_validation_images": 0})
    monkeypatch.setattr(train_diffusion, "build_trainer", with_interrupt)
    assert cli.main(["train", str(path)]) == 130
    assert "SIGINT: stopped at step 2" in capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-2").is_dir()
    assert not (tmp_path / "run" / "manifest.json").exists()
    monkeypatch.setattr(train_diffusion, "build_trainer", build)
    assert cli.main(["train", str(path)]) == 0
    metrics = json.loads((tmp_path / "run" / "manifest.json").read_text())["metrics"]
    assert metrics["steps"] == 4 and metrics["resumed_from"].endswith("checkpoint-2")


@pytest.mark.slow
def test_two_ranks_train_the_same_lora_as_one_process_with_twice_the_batch(tiny_sd, shapes, tmp_path):
    """torchrun, 2 ranks of batch 2 against 1 process of batch 4: every sample draws its own noise, timestep, crop and
    flip, so the steps average the same losses."""
    from safetensors.torch import load_file
    from test_distributed import launch, losses

    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    settings = {"diffusion": {"random_flip": True, "num_validation_images": 1}, "train": {"max_steps": 6}}
    train(load_recipe(image_recipe(tmp_path / "one", tiny_sd(), shapes, **settings)))
    result = launch(
        2, "train", str(image_recipe(tmp_path / "two", tiny_sd(), shapes, **settings)), "train.batch_size=2"
    )
    assert result.returncode == 0, result.stderr
    one, two = tmp_path / "one" / "run", tmp_path / "two" / "run"
    theirs, ours = losses(one), losses(two)
    assert sorted(ours) == list(range(1, 7))
    assert max(abs(ours[step] - loss) / loss for step, loss in theirs.items()) <= 1e-4
    a, b = load_file(one / "adapter" / LORA_WEIGHTS), load_file(two / "adapter" / LORA_WEIGHTS)
    assert max(relative(a[k], b[k]) for k in a) <= 1e-3
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["ranks"]["world_size"] == 2 and manifest["ranks"]["global_batch"] == 4
    assert len(list((two / "validation").glob("*.png"))) == 1  # written once, by rank 0
    assert result.stdout.count("next: qlora-pipe merge") == 1


def test_the_sd21_recipes_target_existing_modules_and_make_a_lora_of_a_few_mb():
    """On SD 2.1's own UNet (built on the meta device from the recipe's facts): the recipes' targets are its 128
    attention projections, and rank 4 makes 0.83M parameters, a 3.3 MB fp32 file."""
    from diffusers import UNet2DConditionModel

    for name in ("sd21_text_to_image_lora.yaml", "sd21_dreambooth_lora.yaml"):
        recipe = load_recipe(ROOT / "recipes" / "seeds" / name)
        config = json.loads((ROOT / SD21 / "unet" / "config.json").read_text())
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
        wrapped = peft.get_peft_model(torch.nn.ModuleDict({"unet": unet}), diffusion.lora_config(recipe))
        lora = {n: p.numel() for n, p in wrapped.named_parameters() if "lora_" in n}
        assert len(lora) == 2 * 128
        assert 2e6 < 4 * sum(lora.values()) < 5e6
