"""The `qlora-pipe` command line. User errors exit with status 2 and one message.

Building the parser imports no library (its choices live in config.py); each command imports its stage when it runs,
so that `--help` and a mistyped command answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import textwrap
import warnings
from pathlib import Path

import yaml

from qlora_pipe import UserError, __version__
from qlora_pipe.config import (
    COMBINE_METHODS,
    DEVICES,
    DIFFUSION_TASKS,
    EXPORT_FORMATS,
    EXPORT_VERIFY,
    GGUF_TYPES,
    LABEL_TOKENS,
    MERGE_MODES,
    OUT_DTYPES,
    TRAINING_DEVICES,
    VERIFY_LEVELS,
    Recipe,
    field_docs,
    load_recipe,
    recipe_to_dict,
)
from qlora_pipe.manifest import read_manifest
from qlora_pipe.run import (
    ADAPTER,
    ADAPTER_REPORT,
    EXPORT_REPORT,
    LOFTQ_REPORT,
    LORA_WEIGHTS,
    MERGE_REPORT,
    VALIDATION,
    close_process_group,
    image_run,
    is_writer,
    rank,
    world_size,
)

LIBRARY_NOTICES = (
    r"`is_gradient_checkpointing` is deprecated",
    r"Setting `save_embedding_layers` to `True`",
    r"fan_in_fan_out is set to False but the target module is `Conv1D`",
)


def recipe_help() -> str:
    """Every recipe field with its default and docstring: the one place recipe fields are documented."""
    lines = ["recipe fields (YAML sections; override any with key.sub=value):"]
    for section in dataclasses.fields(Recipe):
        cls = section.default_factory if section.default_factory is not dataclasses.MISSING else None
        if cls is None:
            lines.append(f"  {section.name}: {field_docs(Recipe)[section.name]}")
            continue
        lines.append(f"  {section.name}:")
        defaults = cls()
        for name, doc in field_docs(cls).items():
            default = json.dumps(getattr(defaults, name))
            lines += textwrap.wrap(
                f"{name} (default {default}): {doc}", 115, initial_indent="    ", subsequent_indent="      "
            )
    return "\n".join(lines)


def _train(args: argparse.Namespace) -> None:
    recipe = load_recipe(args.recipe, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False), end="")
        return
    if recipe.task in DIFFUSION_TASKS:
        _train_images(recipe, args.resume)
        return
    from qlora_pipe.train import train

    out = train(recipe, resume=args.resume)
    if not is_writer():  # under torchrun/accelerate the summary is printed once, by rank 0
        return
    manifest = read_manifest(out, "train")
    metrics, ranks = manifest["metrics"], manifest["ranks"]
    print(f"\nadapter: {out / ADAPTER}")
    if ranks["world_size"] > 1:
        print(
            f"{ranks['world_size']} ranks ({ranks['strategy']}), global batch {ranks['global_batch']}, "
            f"{metrics['tokens_per_second']:.1f} tokens/s together"
        )
    if "train_loss_first" in metrics:
        print(f"train loss {metrics['train_loss_first']:.4f} → {metrics['train_loss_last']:.4f}")
    if "eval_loss_before" in metrics:
        print(f"eval loss {metrics['eval_loss_before']:.4f} → {metrics['eval_loss_after']:.4f}")
    for key, name in (("eval_accuracy", "eval accuracy"), ("eval_exact_match", "eval label accuracy (exact match)")):
        if f"{key}_before" in metrics:
            print(f"{name} {metrics[f'{key}_before']:.4f} → {metrics[f'{key}_after']:.4f}")
    print(f"next: qlora-pipe merge {out}")


def _train_images(recipe: Recipe, resume: str) -> None:
    from qlora_pipe.diffusion import require_diffusers

    require_diffusers()
    from qlora_pipe.train_diffusion import train

    out = train(recipe, resume=resume)
    if not is_writer():
        return
    metrics = read_manifest(out, "train")["metrics"]
    print(f"\nLoRA: {out / ADAPTER / LORA_WEIGHTS}   (pipe.load_lora_weights('{out / ADAPTER}'))")
    if "train_loss_first" in metrics:
        print(f"train loss {metrics['train_loss_first']:.4f} → {metrics['train_loss_last']:.4f}")
    print(
        f"denoising loss on fixed noise {metrics['denoise_loss_before']:.4f} → {metrics['denoise_loss_after']:.4f}; "
        f"{metrics['images_per_second']:.2f} images/s"
    )
    if (out / VALIDATION).is_dir():
        print(f"validation images: {out / VALIDATION}")
    print(f"next: qlora-pipe merge {out}   |   qlora-pipe generate {out} --prompt TEXT --out image.png")


def _check_images(recipe: Recipe) -> None:
    from qlora_pipe.diffusion import require_diffusers
    from qlora_pipe.images import check_images, read_examples

    require_diffusers()
    examples, facts = read_examples(recipe)
    report = check_images(examples, recipe.diffusion.resolution)
    print(
        f"{facts['train']}: {report['images']} images, shorter side {report['shorter_side_min']} to "
        f"{report['shorter_side_max']} px (trained at {recipe.diffusion.resolution}); first prompt: "
        f"{examples[0].text!r}"
    )
    print("\ndata check passed")


def _check_data(args: argparse.Namespace) -> None:
    from qlora_pipe import model
    from qlora_pipe.data import TRAINED_CLOSE, TRAINED_OPEN, prepare_data, refusal

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.task in DIFFUSION_TASKS:
        _check_images(recipe)
        return
    tokenizer, prepared, checked = prepare_data(recipe, model.check_base(recipe.model.base, recipe.model.allow_pickle))
    mask = "completions" if prepared.format != "text" else "all"
    if prepared.assistant_only_loss:
        mask = f"assistant turns (found by {prepared.mask_method})"
    print(
        f"format {prepared.format}; loss on {mask}; chat template {recipe.data.chat_template}; "
        f"eos {tokenizer.eos_token!r}; pad {tokenizer.pad_token!r}"
    )
    for name, r in checked.report.items():
        t = r["tokens"]
        print(
            f"{name}: {r['examples']} examples; tokens p50 {t['p50']}, p90 {t['p90']}, p99 {t['p99']}, "
            f"max {t['max']}; {r['longer_than_max_seq_length']} longer than max_seq_length "
            f"{recipe.data.max_seq_length} ({r['trained_tokens_cut']} lose trained tokens); "
            f"{r['empty_loss_mask']} with an empty loss mask; "
            f"{r['eos_not_trained']} with eos not trained"
        )
        counts = {
            "empty_replies": "with an empty reply",
            "duplicates": "exact duplicates",
            "no_user_turn": "without a user turn",
            "turns_longer_than_max_seq_length": "with a turn longer than max_seq_length",
            "also_in_train": "also in the training data",
        }
        found = [f"{r[key]} {text}" for key, text in counts.items() if key in r]
        print(f"  content: {'; '.join(found)}")
    for name, source in prepared.sources.items():
        if source.get("skipped_invalid_rows"):
            first = source["skipped_at"][0]
            print(f"{name}: left out {source['skipped_invalid_rows']} invalid rows (first at {first})")
        for note in source.get("notes", []):
            print(f"{name}: note: {note}")
        if "held_out_fraction" in source:
            print(
                f"{name}: {source['rows']} rows held out of data.train by content, every copy of an example on one "
                f"side ({source['duplicates']} duplicate rows in data.train)"
            )
    example = checked.report["train"]["example"]
    if example is not None:
        print(f"\nfirst training example (trained tokens between {TRAINED_OPEN} and {TRAINED_CLOSE}):\n{example}")
    if checked.fatal:
        raise UserError(refusal(checked))
    print("\ndata check passed")


def _estimate(args: argparse.Namespace) -> None:
    from qlora_pipe.estimate import GIB, Ranks, advice, data_step_shape, estimate, longest_sequence
    from qlora_pipe.shards import parse_size

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.task in DIFFUSION_TASKS:
        raise UserError(
            f"estimate predicts the memory of language-model training; task {recipe.task} is not covered yet"
        )
    try:
        limit = parse_size(args.gpu_mem)
    except ValueError as e:
        raise UserError(f"--gpu-mem: {e}") from None
    if args.nproc < 1:
        raise UserError(f"--nproc {args.nproc}: give the number of processes (GPUs), 1 or more")
    if args.device == "cpu" and recipe.train.activation_offloading:
        raise UserError("train.activation_offloading needs CUDA: estimate with --device cuda, or set it to false")
    facts = Path(args.recipe).parent
    shape, why_not = data_step_shape(recipe)
    if args.nproc == 1:
        columns = {"every row full length": estimate(recipe, device=args.device, facts_dir=facts)}
        if shape is not None:
            columns[shape.source] = estimate(recipe, device=args.device, facts_dir=facts, step=shape)
    else:
        columns = {
            f"{strategy.upper()}, per rank": estimate(
                recipe, device=args.device, facts_dir=facts, step=shape, ranks=Ranks(args.nproc, strategy)
            )
            for strategy in ("ddp", "fsdp")
        }
    estimates = list(columns.values())
    t = recipe.train
    ranks = f"{args.nproc} ranks (global batch {args.nproc * t.batch_size * t.grad_accumulation}), " * (args.nproc > 1)
    print(
        f"{recipe.model.base}: peak memory of one training step on {args.device}, {ranks}batch {t.batch_size}, "
        f"max_seq_length {recipe.data.max_seq_length}"
    )
    unit, scale = ("GiB", GIB) if estimates[0].total >= GIB else ("MiB", 2**20)
    print(f"  {'':<52}" + "".join(f"{c:>26}" for c in columns))
    for part in dict.fromkeys(k for est in estimates for k in est.parts):
        cells = [f"{est.parts[part] / scale:.2f} {unit}" if part in est.parts else "-" for est in estimates]
        print(f"  {part:<52}" + "".join(f"{c:>26}" for c in cells))
    print(f"  {'predicted peak':<52}" + "".join(f"{f'{est.total / scale:.2f} {unit}':>26}" for est in estimates))
    steps = [f"{est.step.tokens} tokens, {est.step.labelled} labelled" for est in estimates]
    print(f"  {'largest micro-batch':<52}" + "".join(f"{c:>26}" for c in steps))
    if why_not:
        print(f"note: {why_not}")
    print(f"training FLOPs per token: {estimates[0].flops_per_token / 1e6:,.1f} MFLOP")
    if args.nproc > 1:
        fitting = [name for name, est in columns.items() if est.total <= limit]
        verdict = f"fits in {limit / GIB:.1f} GiB per rank with " + " and ".join(n.split(",")[0] for n in fitting)
        print(verdict if fitting else f"does not fit in {limit / GIB:.1f} GiB per rank with DDP or FSDP")
        return
    offloading = {" without offloading": False, " with activation offloading": True} if args.device == "cuda" else {}
    for label, offload in (offloading or {"": False}).items():
        tokens = longest_sequence(recipe, device=args.device, limit=limit, facts_dir=facts, offloading=offload)
        print(f"longest sequence that fits {limit / GIB:.1f} GiB at batch 1{label}: {tokens:,} tokens")
    total = estimates[-1].total
    if total <= limit:
        print(f"fits in {limit / GIB:.1f} GiB")
        return
    print(f"does not fit in {limit / GIB:.1f} GiB; changes that would make it fit:")
    step = estimates[-1].step if shape is not None else None
    for change in advice(recipe, device=args.device, limit=limit, facts_dir=facts, step=step) or [
        "none of these settings alone"
    ]:
        print(f"  {change}")


def _merge(args: argparse.Namespace) -> None:
    if image_run(args.run_dir):
        _merge_images(args)
        return
    from qlora_pipe.merge import merge

    out = merge(
        args.run_dir,
        mode=args.mode,
        dtype=args.dtype,
        out=args.out,
        force=args.force,
        device=args.device,
        verify=args.verify,
        max_shard_size=args.max_shard_size,
    )
    report = json.loads((out / MERGE_REPORT).read_text())
    for mode, n in report.get("modes", {}).items():
        mark = "written" if mode == report["written_mode"] else "for comparison"
        if "top1_agreement" in n:
            numbers = (
                f"max |Δlogit| {n['max_abs_logit_diff']:.3g}, relative error {n['relative_error']:.3g}, "
                f"top-1 agreement {n['top1_agreement']:.4f}"
            )
        else:
            numbers = f"worst layer relative error {n['max_relative_error']:.3g} over {n['layers']} layers"
        print(f"{mode:>12} ({mark}) vs the trained base + adapter: {numbers}")
    print(f"merged model: {out}")


def _merge_images(args: argparse.Namespace) -> None:
    from qlora_pipe.merge_diffusion import merge

    language_only = {"--mode": ("mode", "dequantized"), "--device": ("device", "auto"), "--verify": ("verify", "auto")}
    language_only["--max-shard-size"] = ("max_shard_size", "5GB")
    given = [flag for flag, (name, default) in language_only.items() if getattr(args, name) != default]
    if given:
        raise UserError(f"{', '.join(given)}: for language-model runs; {args.run_dir} is an image run")
    out = merge(args.run_dir, dtype=args.dtype, out=args.out, force=args.force)
    report = json.loads((out / MERGE_REPORT).read_text())
    for name, n in report["components"].items():
        print(
            f"{name:>13}: merged vs base + LoRA, relative error {n['relative_error']:.3g}, "
            f"max |Δ| {n['max_abs_diff']:.3g}"
        )
    print(f"merged pipeline: {out}   (StableDiffusionPipeline.from_pretrained('{out}'))")


def _export(args: argparse.Namespace) -> None:
    from qlora_pipe.export import MODELFILE, export

    out = export(args.path, fmt=args.format, qtype=args.type, out=args.out, verify=args.verify)
    report = json.loads((out.parent / EXPORT_REPORT).read_text())[out.name]
    print(f"{out} ({report['bytes'] / 1e6:.1f} MB, {args.type}, tokenizer {report['tokenizer']['pre'] or 'llama'})")
    figures = report.get("figures", {})
    if "relative_error" in figures:
        print(
            f"read back by transformers vs the merged model: relative error {figures['relative_error']:.3g}, "
            f"top-1 agreement {figures['top1_agreement']:.4f} over {figures['positions']} positions"
        )
    elif figures:
        print(f"read back tensor by tensor: worst relative error {figures['max_tensor_relative_error']:.3g}")
    template = report["ollama_template"]
    if not template["written"]:
        print("Modelfile: no TEMPLATE (the model has no chat template, or it is not fixed text around each message)")
    print(f"run it: llama-cli -m {out}   |   ollama create NAME -f {out.parent / MODELFILE}")


def _loftq(args: argparse.Namespace) -> None:
    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.task in DIFFUSION_TASKS:
        raise UserError(f"loftq initialises language-model adapters; task {recipe.task} trains LoRA from scratch")
    from qlora_pipe.loftq import run_loftq

    out = run_loftq(recipe, device=args.device)
    summary = json.loads((out / LOFTQ_REPORT).read_text())["summary"]
    print(
        f"\nLoftQ over {summary['matrices']} matrices ({summary['seconds']:.1f} s): relative error plain NF4 "
        f"‖W−NF4(W)‖ {summary['relative_error_nf4']:.4f} → ‖W−(Q+s·B·A)‖ {summary['relative_error_loftq']:.4f}, "
        f"{100 * summary['improvement']:.1f} % lower ({summary['matrices_improved']} of {summary['matrices']} "
        f"matrices improved, by {100 * summary['improvement_min']:.1f}–{100 * summary['improvement_max']:.1f} %)"
    )
    print(f"backbone and adapter_init: {out}")


def adapter_options(values: list[str] | None) -> dict[str, Path]:
    """--adapter NAME=DIR, repeated: names unique, `base` kept for the base alone."""
    adapters: dict[str, Path] = {}
    for value in values or []:
        name, sep, where = value.partition("=")
        if not sep or not name or not where:
            raise UserError(f"--adapter {value}: give NAME=DIR (a name, then the run or adapter directory)")
        if name == "base" or name in adapters:
            raise UserError(f"--adapter {value}: the name {name!r} is {'taken' if name in adapters else 'reserved'}")
        adapters[name] = Path(where)
    return adapters


def _eval(args: argparse.Namespace) -> None:
    from qlora_pipe.evaluate import evaluate, evaluate_adapters

    if args.adapter:
        results = evaluate_adapters(args.path, adapter_options(args.adapter), data_file=args.data, out=args.out)
        print(f"{args.path} with each adapter, on {results['base']['data']}:")
        columns = {"loss": 10, "perplexity": 12, "exact_match": 13, "accuracy": 10}
        print(f"  {'adapter':<24}" + "".join(f"{k.replace('_', ' '):>{w}}" for k, w in columns.items()))
        for name, m in results.items():
            cells = ("-" if m.get(k) is None else f"{m[k]:.4f}" for k in columns)
            print(f"  {name:<24}" + "".join(f"{c:>{w}}" for c, w in zip(cells, columns.values(), strict=True)))
        return
    m = evaluate(args.path, data_file=args.data, out=args.out)
    print(f"{m['model']} on {m['data']}: {m['examples']} examples")
    print(f"loss {m['loss']:.4f}" + (f", perplexity {m['perplexity']:.3f}" if "perplexity" in m else ""))
    if "accuracy" in m:
        print(f"accuracy {m['accuracy']:.4f}")
    if "exact_match" in m:
        print(f"exact match {m['exact_match']:.4f} over {m['exact_match_examples']} answers")
        for miss in m["mismatches"]:
            print(f"  expected {miss['expected']!r}, generated {miss['generated']!r}")


def _report(args: argparse.Namespace) -> None:
    from qlora_pipe.report import report

    s, curve = report(args.run_dir)

    def show(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    print(
        f"{args.run_dir}: {'finished' if s['finished'] else 'not finished'}, {s['steps']} steps"
        + (f" (resumed from {s['resumed_from']})" if s["resumed_from"] else "")
    )
    print(f"train loss     {show(s['train_loss_first'], '.4f')} → {show(s['train_loss_last'], '.4f')}")
    images = s["images"]
    if images:
        print(f"denoise loss   {show(s['denoise_loss_before'], '.4f')} → {show(s['denoise_loss_after'], '.4f')}")
    else:
        print(f"eval loss      {show(s['eval_loss_before'], '.4f')} → {show(s['eval_loss_after'], '.4f')}")
    print(f"learning rate  {show(s['learning_rate_last'], '.3g')} (last)")
    ranks, unit = s["ranks"], "images" if images else "tokens"
    rate = s[f"{unit}_per_second"]
    print(
        f"throughput     {show(rate, '.2f' if images else '.1f')} {unit}/s over {show(s[f'{unit}_seen'], 'd')} {unit}"
        + (f", all {ranks} ranks together ({show(rate and rate / ranks, '.2f')} per rank)" if ranks > 1 else "")
    )
    of = f"{s['peak_memory_of'] or '-'}{', rank 0' if ranks > 1 else ''}"
    print(f"peak memory    {show(s['peak_memory_gib'], '.2f')} GiB ({of})")
    print(f"time           {show(s['train_seconds'], '.1f')} s")
    print(f"loss curve     {curve}")
    if s["validation_overview"]:
        print(f"validation     {len(s['validation_grids'])} grids, latest {s['validation_grids'][-1]}")
        print(f"               all steps: {s['validation_overview']}")


def _adapter_inspect(args: argparse.Namespace) -> None:
    from qlora_pipe.analysis import inspect

    out = inspect(args.path, compare=args.compare, out=args.out)
    report = json.loads((out / ADAPTER_REPORT).read_text())
    modules = report["modules"]
    print(f"{report['adapter']}: {len(modules)} LoRA modules")
    print(f"  {'module':<48}{'rank':>6}{'eff. rank 90%':>15}{'eff. rank 99%':>15}{'‖ΔW‖':>10}{'‖ΔW‖/‖W‖':>11}")
    for name, m in modules.items():
        relative = f"{m['relative_to_weight']:.2e}" if "relative_to_weight" in m else "-"
        print(
            f"  {name[-48:]:<48}{m['rank']:>6}{m['effective_rank_90']:>15}{m['effective_rank_99']:>15}"
            f"{m['delta_norm']:>10.3g}{relative:>11}"
        )
    print(f"report and figures: {out}")
    print(report["advice"])


def _adapter_combine(args: argparse.Namespace) -> None:
    from qlora_pipe.combine import combine

    out = combine(
        args.adapters, weights=args.weights, method=args.method, out=args.out, density=args.density, rank=args.rank
    )
    print(f"combined adapter: {out}")
    print(f"next: qlora-pipe merge {out}   (or adapter inspect, eval, generate)")


def _generate(args: argparse.Namespace) -> None:
    from qlora_pipe.diffusion import makes_images
    from qlora_pipe.generate import generate, generate_image, generate_with_adapters

    image_options = {"--out": args.out, "--steps": args.steps, "--seed": args.seed, "--guidance": args.guidance}
    if makes_images(args.path):
        if args.adapter:
            raise UserError("--adapter is for language models; an image run's LoRA is loaded with its run")
        if not args.out:
            raise UserError(f"{args.path} makes images: give --out FILE.png")
        options = {k: getattr(args, k) for k in ("steps", "seed", "guidance") if getattr(args, k) is not None}
        print(generate_image(args.path, args.prompt, args.out, **options))
        return
    given = [flag for flag, value in image_options.items() if value is not None]
    if given:
        raise UserError(f"{', '.join(given)}: for image runs and diffusers pipelines; {args.path} is a language model")
    if args.adapter:
        adapters = adapter_options(args.adapter)
        replies = generate_with_adapters(args.path, adapters, args.prompt, max_new_tokens=args.max_new_tokens)
        for name, text in replies.items():
            print(f"[{name}] {text}")
        return
    print(generate(args.path, args.prompt, max_new_tokens=args.max_new_tokens))


def _chat(args: argparse.Namespace) -> None:
    from qlora_pipe.generate import chat

    try:
        chat(args.path, max_new_tokens=args.max_new_tokens, system=args.system)
    except KeyboardInterrupt:  # Ctrl-C ends a chat as /exit does
        print()


def recipe_arguments(command: argparse.ArgumentParser) -> None:
    """RECIPE and its key.sub=value overrides, as every recipe command takes them."""
    command.add_argument("recipe", help="recipe YAML file")
    command.add_argument(
        "overrides",
        nargs="*",
        default=[],  # without a default argparse reports an optional nargs="*" positional as required
        metavar="key.sub=value",
        help="override recipe fields, e.g. lora.r=8 train.max_steps=20",
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="qlora-pipe",
        description="QLoRA fine-tuning pipeline: recipe → NF4 base → all-linear LoRA → TRL SFT → verified merge.",
    )
    top.add_argument("--version", action="version", version=f"qlora-pipe {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train a LoRA adapter from a recipe",
        description="Train an adapter: writes OUTPUT_DIR/adapter, manifest.json, checkpoints/ and a loss log.\n"
        "On several GPUs every rank runs it (README: More than one GPU):\n"
        "  torchrun --nproc_per_node N -m qlora_pipe train RECIPE\n"
        "  accelerate launch --config_file recipes/accelerate/ddp.yaml -m qlora_pipe train RECIPE",
        epilog=recipe_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    recipe_arguments(train)
    train.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    train.add_argument(
        "--resume",
        default="auto",
        metavar="auto|never|PATH",
        help="auto (default): continue from the newest complete checkpoint in OUTPUT_DIR/checkpoints; "
        "never: start over (removes existing checkpoints); PATH: that checkpoint",
    )
    train.set_defaults(func=_train)

    check = sub.add_parser(
        "check-data",
        help="check a recipe's data before training",
        description="Tokenize the recipe's data exactly as training will and report example counts, token-length "
        "percentiles, examples cut by max_seq_length, empty loss masks and whether eos is trained at the end of "
        "every assistant turn, with one example whose trained tokens are marked. Exits 2 on the problems that "
        "`train` refuses. Image recipes: every image read and checked, bad ones named by file.",
    )
    recipe_arguments(check)
    check.set_defaults(func=_check_data)

    est = sub.add_parser(
        "estimate",
        help="predict the peak training memory of a recipe without loading weights",
        description="Build the base on the meta device and predict the peak memory of one training step, part by "
        "part (NF4 weights, unquantized parameters, LoRA parameters, gradients and optimizer states, activations with "
        "checkpointing, LM head tiles, CUDA slack), the FLOPs per token, whether it fits, and what would make it fit. "
        "Reads the base's config.json from the base directory, or beside the recipe (recipes/<model>/).",
    )
    recipe_arguments(est)
    est.add_argument("--gpu-mem", default="24GiB", help="memory of the GPU to fit in (default 24GiB)")
    est.add_argument("--device", choices=TRAINING_DEVICES, default="cuda", help="where training will run")
    est.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes (GPUs) training together: the memory of each rank under DDP and under FSDP (default 1)",
    )
    est.set_defaults(func=_estimate)

    loftq = sub.add_parser(
        "loftq",
        help="compute a LoftQ initialisation (backbone + adapter) for a recipe",
        description="LoftQ: fit, matrix by matrix, an NF4 backbone Q and LoRA A, B with Q + s·B·A ≈ W, using the "
        "recipe's NF4 settings, rank and alpha. Writes OUTPUT_DIR/loftq (backbone/, adapter_init/, "
        "loftq_report.json, manifest.json); resumes an interrupted run. `train` with lora.init: loftq uses it.",
    )
    recipe_arguments(loftq)
    loftq.add_argument(
        "--device", choices=DEVICES, default="auto", help="where to quantize and decompose (auto: CUDA when present)"
    )
    loftq.set_defaults(func=_loftq)

    merge = sub.add_parser(
        "merge",
        help="merge a trained adapter into a standalone checkpoint",
        description="Merge RUN_DIR's adapter into its base; everything else comes from RUN_DIR/manifest.json. "
        "Writes the model, merge_report.json (merged vs NF4 base + adapter logits) and manifest.json. Image runs: "
        "a whole diffusers pipeline with the LoRA fused in, its UNet (and text encoder) compared with base + LoRA.",
    )
    merge.add_argument("run_dir", help="output directory of `qlora-pipe train`")
    merge.add_argument(
        "--mode",
        choices=MERGE_MODES,
        default="dequantized",
        help="dequantized: merge into the NF4-dequantized weights the adapter was trained on "
        "(default); original: merge into the original full-precision weights",
    )
    merge.add_argument(
        "--dtype",
        choices=OUT_DTYPES,
        default="auto",
        help="dtype of the written weights (auto: the base checkpoint's dtype)",
    )
    merge.add_argument("--out", help="output directory (default RUN_DIR/merged)")
    merge.add_argument("--force", action="store_true", help="merge even if the base weights changed since training")
    merge.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where to re-quantize and dequantize the base (auto: where training quantized it, if available here)",
    )
    merge.add_argument(
        "--verify",
        choices=VERIFY_LEVELS,
        default="auto",
        help="full: whole-model logits vs NF4 base + adapter; layers: each layer on the same inputs, "
        "within the streaming memory bound; auto: full when the models fit in memory",
    )
    merge.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    merge.set_defaults(func=_merge)

    exp = sub.add_parser(
        "export",
        help="export a run or model directory as one GGUF file for llama.cpp and Ollama, verified",
        description="From a run, its verified merged/ (merging first when there is none); from a model directory, "
        "directly. Writes the .gguf file, an Ollama Modelfile, export_report.json and manifest.json.",
    )
    exp.add_argument("path", help="run directory, merged directory or model directory")
    exp.add_argument("--format", choices=EXPORT_FORMATS, default="gguf", help="output format (default gguf)")
    exp.add_argument(
        "--type",
        choices=GGUF_TYPES,
        default="f16",
        help="tensor storage: f32 (exact), f16 (default), bf16, q8_0 (about half of f16; 1-D tensors stay f32)",
    )
    exp.add_argument("--out", help="output .gguf file (default RUN_DIR/gguf/RUN-TYPE.gguf)")
    exp.add_argument(
        "--verify",
        choices=EXPORT_VERIFY,
        default="auto",
        help="full: logits of the file read back by transformers vs the merged model; tensors: each tensor read "
        "back, within the streaming memory bound; auto: full when the models fit in memory",
    )
    exp.set_defaults(func=_export)

    ev = sub.add_parser(
        "eval",
        help="loss, perplexity and accuracy of a run, a merged model or a model directory",
        description="Evaluate on --data, or on the run's eval split. Reports loss and perplexity over the trained "
        f"tokens (masked as in training); exact-match accuracy when every answer is at most {LABEL_TOKENS} tokens "
        "(label tasks: the answer generated greedily after the prompt must equal the reference); accuracy for "
        "classifiers.",
    )
    ev.add_argument("path", help="run directory (base + adapter), merged directory or model directory")
    ev.add_argument("--data", help="data file (any format train reads); default: the run's eval split")
    ev.add_argument("--out", help="also write the metrics to this JSON file")
    ev.add_argument(
        "--adapter",
        action="append",
        metavar="NAME=DIR",
        help="evaluate the base of PATH (a run's base as trained, or a model directory) alone and with this adapter "
        "(a run, its adapter/ or a PEFT adapter directory); repeat for several: the base is loaded once",
    )
    ev.set_defaults(func=_eval)

    rep = sub.add_parser(
        "report",
        help="summarise a training run and plot its loss curve",
        description="Print a run's steps, train and eval loss, learning rate, tokens/s, peak memory and time, and "
        "write RUN_DIR/loss_curve.png; for image runs the denoising loss, images/s and the validation grids "
        "(RUN_DIR/validation.png, one row per step). Works while a run is in progress or after it was interrupted.",
    )
    rep.add_argument("run_dir", help="output directory of `qlora-pipe train`")
    rep.set_defaults(func=_report)

    adapter = sub.add_parser(
        "adapter",
        help="analyse trained adapters",
        description="Tools for trained LoRA adapters: a run, its adapter/ or any PEFT LoRA adapter directory.",
    )
    tools = adapter.add_subparsers(dest="tool", required=True, metavar="TOOL")
    inspect = tools.add_parser(
        "inspect",
        help="singular values, effective rank and subspace similarity of a LoRA update (the LoRA paper's analysis)",
        description="Per LoRA module: the singular values of the update ΔW = s·B·A (from its r × r core, no d × d "
        "SVD), its effective rank for 90 %% and 99 %% of its energy, ‖ΔW‖, and for a training run ‖ΔW‖/‖W‖ and the "
        "amplification factor against the weight it was trained on. With --compare, the subspace similarity of the "
        "two adapters' A matrices. Writes adapter_report.json and figures, and prints one line of advice on the rank.",
    )
    inspect.add_argument("path", help="training run, its adapter/ directory, or a PEFT LoRA adapter directory")
    inspect.add_argument("--compare", metavar="OTHER", help="a second adapter (e.g. the same task at another rank)")
    inspect.add_argument("--out", help="output directory (default RUN_DIR/adapter_analysis, or ADAPTER_analysis)")
    inspect.set_defaults(func=_adapter_inspect)
    comb = tools.add_parser(
        "combine",
        help="one adapter from several, weighted (PEFT's add_weighted_adapter)",
        description="Combine adapters trained on the same base into one PEFT adapter, Σ weight_i · adapter_i as the "
        "method combines them: cat (exact: ranks add up), svd (the best rank-R approximation of the exact sum), "
        "linear (A and B averaged: rough, equal ranks), ties, ties_svd, dare_linear, dare_ties, magnitude_prune "
        "(task-arithmetic merges that keep --density of each update). The output merges, evaluates and generates like "
        "a run when the sources are runs.",
    )
    comb.add_argument("adapters", nargs="+", metavar="ADAPTER", help="training runs, their adapter/ or adapter dirs")
    comb.add_argument("--weights", nargs="+", type=float, required=True, help="one weight per adapter")
    comb.add_argument("--method", choices=COMBINE_METHODS, required=True, help="how the adapters are combined")
    comb.add_argument("--density", type=float, help="share of each update kept (ties, dare, magnitude_prune)")
    comb.add_argument("--rank", type=int, help="rank of the result for svd and ties_svd (default: the largest)")
    comb.add_argument("--out", required=True, help="output directory (must not exist)")
    comb.set_defaults(func=_adapter_combine)

    gen = sub.add_parser(
        "generate",
        help="generate text (or an image) from a merged model, a run, or a base",
        description="Greedy generation with the chat template applied, stopping at eos. Image runs and diffusers "
        "pipeline directories (a merged image run, any Stable Diffusion pipeline) make one image instead: "
        "qlora-pipe generate PIPELINE_OR_RUN --prompt TEXT --out image.png [--steps N] [--seed S] [--guidance G]",
    )
    gen.add_argument("path", help="merged directory, run directory (base + adapter) or model directory")
    gen.add_argument("--prompt", required=True, help="user message (images: the prompt)")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="at most this many new tokens (default 64)")
    gen.add_argument("--out", help="images: the image file to write (e.g. image.png)")
    gen.add_argument("--steps", type=int, help="images: denoising steps (default 30)")
    gen.add_argument("--seed", type=int, help="images: seed of the starting noise (default 0)")
    gen.add_argument("--guidance", type=float, help="images: classifier-free guidance scale (default 7.5)")
    gen.add_argument(
        "--adapter",
        action="append",
        metavar="NAME=DIR",
        help="reply with the base of PATH alone and with this adapter; repeat for several (the base is loaded once)",
    )
    gen.set_defaults(func=_generate)

    talk = sub.add_parser(
        "chat",
        help="chat with a merged model, a run, or a base",
        description="Interactive multi-turn chat: the chat template applied, each reply streamed as it is generated "
        "(greedy, stopping at eos), the conversation kept as history (the oldest turns are dropped when it outgrows "
        "the model's context). Type /reset to clear the conversation, /exit or Ctrl-D to end.",
    )
    talk.add_argument("path", help="merged directory, run directory (base + adapter) or model directory")
    talk.add_argument(
        "--max-new-tokens", type=int, default=256, help="at most this many tokens per reply (default 256)"
    )
    talk.add_argument("--system", help="a system message to start the conversation with")
    talk.set_defaults(func=_chat)
    return top


def quiet_libraries(terminal: bool) -> None:
    # bitsandbytes announces an optional CPU kernel package at import on every run; it is not an error.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    logging.getLogger("gguf").setLevel(logging.WARNING)  # the writer logs its file plan and endianness at INFO
    # Without network the hub client warns of every failed request before the error we report.
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Notices the user can do nothing about: a library's own deprecations, PEFT reporting what it does anyway.
    for message in LIBRARY_NOTICES:
        warnings.filterwarnings("ignore", message=message)
    if not terminal:
        # Progress bars are for terminals; in a log each stage says one line instead. tqdm (>= 4.66) takes its
        # defaults from TQDM_* variables; datasets and the hub client have their own switches.
        for name in ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
            os.environ.setdefault(name, "1")


def exit_on_sigterm(signum, frame) -> None:
    # SystemExit unwinds like Ctrl-C does: temporary output directories are removed on the way out.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    # Under a launcher, rank 0 tells the story; the other ranks speak up only to warn.
    level = logging.INFO if is_writer() else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries(sys.stderr.isatty())
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    args = parser().parse_args(argv)
    # Under a launcher every rank reports its own error: on several nodes a missing file may be one node's alone.
    command = " ".join(filter(None, (args.command, getattr(args, "tool", None))))
    who = f"qlora-pipe {command}" + (f" (rank {rank()})" if world_size() > 1 else "")
    try:
        if world_size() > 1 and args.command != "train":
            raise UserError(
                f"only `train` runs on several ranks (WORLD_SIZE={world_size()}); run `qlora-pipe {args.command}` "
                "as one process, without torchrun or accelerate launch"
            )
        args.func(args)
        close_process_group()
    except UserError as e:
        print(f"{who}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
