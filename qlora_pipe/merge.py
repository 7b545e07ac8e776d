"""Merge stage: fold the trained LoRA into a standalone checkpoint that plain transformers loads, and prove it.

Why our own: PEFT's `merge_and_unload` on a 4-bit model re-quantizes the merged weight to NF4 (lossy); merging into
the original full-precision weights gives a model that differs from the one trained (its base was the NF4
dequantization); and either way the whole model sits in memory (≥ 14 GiB for 7B in bf16). This merge streams the
base checkpoint tensor by tensor: every weight training quantized is re-quantized exactly as training did and
dequantized as bitsandbytes' matmul does (quant.py), the LoRA delta is added in fp32 as PEFT adds it, and the result
is cast and written into shards as they fill (shards.py). Memory stays at about one tensor and its workspace.

Mode `dequantized` (default) writes the trained model; `original` merges into the original weights instead. Both are
scored against NF4 base + adapter in `merge_report.json`: on whole-model logits when the models fit in memory, else
layer by layer on the same inputs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import bitsandbytes as bnb
import torch
from peft import PeftModel
from peft.utils.integrations import dequantize_module_weight
from tqdm.auto import tqdm
from transformers import AutoConfig, GenerationConfig
from transformers.pytorch_utils import Conv1D

from qlora_pipe import UserError, data, model
from qlora_pipe.adapters import Adapter, load_adapter
from qlora_pipe.config import MERGE_MODES, Recipe
from qlora_pipe.manifest import atomic_dir, fingerprint_weights, write_manifest
from qlora_pipe.quant import dequantize_fp32, fused_merge_supported, merge_nf4_rows, nf4_layer, trained_weight_fp32
from qlora_pipe.run import MERGE_REPORT, MERGED, Run, load_run
from qlora_pipe.shards import OutTensor, ShardWriter, TensorRef, checkpoint_files, parse_size, read_index, read_tensor

logger = logging.getLogger(__name__)

REPORT_PROMPTS = 8
LAYER_PROBE_ROWS = 8


# ------------------------------------------------------------------------------------------------ planning the merge
@dataclass
class Plan:
    """Which checkpoint tensor becomes which output tensor, and how."""

    refs: list[TensorRef]
    names: dict[str, str | None]  # checkpoint key → model parameter name (None: not a parameter)
    conv1d: set[str]  # modules whose weight is stored (in, out)
    out_dtype: torch.dtype
    added: list[str] = field(default_factory=list)  # adapter tensors the base lacks (a new classification head)

    def outputs(self, adapter: Adapter) -> list[OutTensor]:
        base = [OutTensor(r.key, self.out_dtype if r.dtype.is_floating_point else r.dtype, r.shape) for r in self.refs]
        return base + [OutTensor(name, self.out_dtype, list(adapter.replaced[name].shape)) for name in self.added]


def make_plan(run: Run, base: Path, adapter: Adapter, out_dtype: torch.dtype) -> Plan:
    """Map the checkpoint in `base` onto the run's model; a user error when it lacks a weight the run needs."""
    files = checkpoint_files(base)
    if not files:
        raise UserError(f"{base}: the streaming merge reads safetensors weights and found none (*.safetensors)")
    net = model.skeleton(base, run.recipe.model.trust_remote_code, run.labels)
    refs = read_index(files)
    names = model.parameter_names(net, [r.key for r in refs])
    if run.labels is not None:  # a classifier drops the base's pre-training heads (BERT's cls.*)
        refs = [r for r in refs if names[r.key] is not None]
    conv1d = {name for name, module in net.named_modules() if isinstance(module, Conv1D)}
    found = {n.removesuffix(".weight") for n in names.values() if n and n.endswith(".weight")}
    missing = (set(adapter.lora) | set(run.quantization.get("quantized_modules", {}))) - found
    added = sorted(set(adapter.replaced) - set(names.values()))
    missing |= {n for n in added if run.labels is None or not n.startswith(model.HEADS)}
    if missing:
        raise UserError(f"{base}: the checkpoint lacks weights the run needs: {', '.join(sorted(missing)[:5])}")
    return Plan(refs, names, conv1d, out_dtype, added)


# ---------------------------------------------------------------------------------------------- layer verification
@dataclass
class LayerCheck:
    """Per-layer comparison of the merged weights with the NF4 + LoRA layer on the same random inputs."""

    adapter: Adapter
    out_dtype: torch.dtype
    errors: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in MERGE_MODES})
    max_abs: dict[str, float] = field(default_factory=lambda: dict.fromkeys(MERGE_MODES, 0.0))

    def add(self, module: str, base: bnb.nn.Linear4bit | torch.Tensor, weights: dict[str, torch.Tensor]) -> None:
        """`weights`: the merged (out, in) fp32 weight of each mode. The reference is the base layer as trained
        (bitsandbytes' own NF4 layer, or the (out, in) weight of a full-precision run) plus the adapter run as PEFT's
        LoRA layer runs it: base(x) + s·(x·Aᵀ)·Bᵀ."""
        gen = torch.Generator().manual_seed(0)
        in_features = base.shape[1] if isinstance(base, torch.Tensor) else base.in_features
        x = torch.randn(LAYER_PROBE_ROWS, in_features, generator=gen)
        with torch.no_grad():
            reference = x @ base.T if isinstance(base, torch.Tensor) else base(x.to(base.weight.device)).cpu()
        if module in self.adapter.lora:
            a, b = self.adapter.lora[module]
            reference = reference + (x @ a.float().T) @ b.float().T * self.adapter.scaling
        if module in self.adapter.magnitude:  # DoRA scales each output by m / ‖W + ΔW‖ of its row, as PEFT does
            weight = base if isinstance(base, torch.Tensor) else dequantize_module_weight(base)
            norm = torch.linalg.norm(weight.float() + self.adapter.delta(module, False), dim=1)
            reference = reference * (self.adapter.magnitude[module].float() / norm)
        for mode, weight in weights.items():
            got = x @ weight.to(self.out_dtype).float().T
            diff = (got - reference).abs()
            self.errors[mode].append((diff.norm() / reference.norm()).item())
            self.max_abs[mode] = max(self.max_abs[mode], diff.max().item())

    def summary(self) -> dict:
        return {
            mode: {
                "max_relative_error": max(errs, default=0.0),
                "mean_relative_error": sum(errs) / len(errs) if errs else 0.0,
                "max_abs_output_diff": self.max_abs[mode],
                "layers": len(errs),
            }
            for mode, errs in self.errors.items()
        }


# ------------------------------------------------------------------------------------------------- streaming merge
@dataclass(frozen=True)
class MergeJob:
    """One merge: the run, its adapter, the checkpoint it is merged into and how, and the optional layer check."""

    run: Run
    base: Path
    """The checkpoint directory the base weights are read from."""
    adapter: Adapter
    plan: Plan
    mode: str
    device: torch.device
    """Where NF4 is re-quantized and dequantized."""
    check: LayerCheck | None

    @property
    def quantization(self) -> dict:
        return self.run.quantization


def quantized_weight(
    job: MergeJob, tensor: torch.Tensor, module: str, fan_in_fan_out: bool, delta: torch.Tensor | None
) -> torch.Tensor:
    """A weight training held in NF4: rebuilt as bitsandbytes multiplied by it (or the original, in `original`
    mode), in the checkpoint's layout. transformers transposes Conv1D weights to (out, in) before quantizing."""
    original = (tensor.T if fan_in_fan_out else tensor).float()
    layer = nf4_layer(original, job.quantization, job.device)
    trained = trained_weight_fp32(layer)
    if job.check:
        flat_delta = None if delta is None else (delta.T if fan_in_fan_out else delta)
        load_dtype = getattr(torch, job.quantization["load_dtype"])
        fold = (lambda w: w) if flat_delta is None else (lambda w: job.adapter.fold(module, w, flat_delta, load_dtype))
        job.check.add(module, layer, {"dequantized": fold(trained), "original": fold(original)})
    weight = trained if job.mode == "dequantized" else original
    return weight.T if fan_in_fan_out else weight


def merged_tensor(job: MergeJob, tensor: torch.Tensor, name: str | None) -> torch.Tensor:
    """One output tensor: the base tensor as training saw it (or the original), plus the LoRA delta, cast."""
    if not tensor.is_floating_point():
        return tensor
    q, adapter, out_dtype = job.quantization, job.adapter, job.plan.out_dtype
    module, _, leaf = (name or "").rpartition(".")
    fan_in_fan_out = module in job.plan.conv1d
    delta = adapter.delta(module, fan_in_fan_out) if leaf == "weight" and module in adapter.lora else None
    quantized = q["method"] == "nf4" and leaf == "weight" and module in q["quantized_modules"]
    # (out, in) layout, as transformers quantizes Conv1D weights
    flat = (lambda t: t.T) if fan_in_fan_out else (lambda t: t)
    if name in adapter.replaced:
        weight = adapter.replaced[name].float()
    elif (
        quantized
        and job.mode == "dequantized"
        and not job.check
        and module not in adapter.magnitude  # DoRA's row norms need the whole merged weight first
        and fused_merge_supported(flat(tensor), q, job.device)
    ):
        delta = flat(delta) if delta is not None else None
        return flat(merge_nf4_rows(flat(tensor), q, delta, out_dtype))
    elif quantized and (job.mode == "dequantized" or job.check):
        weight = quantized_weight(job, tensor, module, fan_in_fan_out, delta)
    else:
        # as loaded for training: in the load dtype (or the dtype the model keeps that parameter in)
        trained = tensor.to(getattr(torch, q.get("unquantized_dtypes", {}).get(name, q["load_dtype"]))).float()
        weight = tensor.float() if job.mode == "original" else trained
        if job.check and delta is not None and module not in adapter.embedding_modules:
            weights = {"dequantized": trained, "original": tensor.float()}
            merged = {mode: adapter.fold(module, flat(w), flat(delta)) for mode, w in weights.items()}
            job.check.add(module, flat(trained), merged)
    if delta is not None:
        norm_dtype = getattr(torch, q["load_dtype"]) if quantized else torch.float32
        weight = flat(adapter.fold(module, flat(weight), flat(delta), norm_dtype))
    return weight.to(out_dtype)


def stream_merge(job: MergeJob, out: Path, max_shard_size: int) -> None:
    plan = job.plan
    writer = ShardWriter(out, plan.outputs(job.adapter), max_shard_size)
    logger.info("merging %d tensors (%.2f GB) in %s mode", len(plan.refs), writer.total_bytes / 1e9, job.mode)
    bar = tqdm(total=writer.total_bytes, unit="B", unit_scale=True, desc="merging", dynamic_ncols=True)
    # The next tensor is read while this one is computed (and the last one written): disk and CPU overlap.
    with bar, ThreadPoolExecutor(1, thread_name_prefix="shard-reader") as reader:
        upcoming = reader.submit(read_tensor, plan.refs[0])
        for i, ref in enumerate(plan.refs):
            tensor = upcoming.result()
            if i + 1 < len(plan.refs):
                upcoming = reader.submit(read_tensor, plan.refs[i + 1])
            tensor = merged_tensor(job, tensor, plan.names[ref.key])
            writer.write(ref.key, tensor)
            bar.update(tensor.numel() * tensor.element_size())
        for name in plan.added:
            tensor = job.adapter.replaced[name].to(plan.out_dtype)
            writer.write(name, tensor)
            bar.update(tensor.numel() * tensor.element_size())
    writer.close()


# --------------------------------------------------------------------------------- in-memory models (verification)
def logits_on(net: torch.nn.Module, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per prompt: next-token logits at every position (causal LM) or the class logits (classifier)."""
    net.eval()
    with torch.no_grad():
        return [net(input_ids=ids[None].to(net.device)).logits.flatten(0, -2).float().cpu() for ids in prompts]


def compare(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> dict[str, float]:
    ref, got = torch.cat(reference), torch.cat(candidate)
    diff = (got - ref).abs()
    return {
        "max_abs_logit_diff": diff.max().item(),
        "mean_abs_logit_diff": diff.mean().item(),
        "relative_error": (diff.norm() / ref.norm()).item(),
        "top1_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        "positions": ref.shape[0],
    }


def load_trained(run: Run) -> torch.nn.Module:
    """NF4 base exactly as training loaded it (same load dtype: it sets the block scales), computing in exact fp32."""
    trained = model.load_run_base(run, torch.float32)
    model.set_cpu_bf16_fastpath(trained, False)
    return trained


def merge_in_memory(run: Run, mode: str, out_dtype: torch.dtype) -> torch.nn.Module:
    """The reference merge, whole model in memory: rebuild the trained weights from the NF4 model transformers loads
    (or the original weights), then PEFT's merge_and_unload. The streaming merge must write exactly this."""
    trust = run.recipe.model.trust_remote_code
    auto, head_args = model.head(run.labels)
    if mode == "original":
        full = auto.from_pretrained(run.base, dtype=torch.float32, trust_remote_code=trust, **head_args)
    else:
        trained = load_trained(run)
        weights = {
            name: dequantize_fp32(p.data, p.quant_state) if isinstance(p, bnb.nn.Params4bit) else p.detach().float()
            for name, p in trained.named_parameters(remove_duplicate=False)
        }
        del trained
        config = AutoConfig.from_pretrained(run.base, trust_remote_code=trust, **head_args)
        full = auto.from_config(config, dtype=torch.float32, trust_remote_code=trust)
        modules = dict(full.named_modules())
        for name, tensor in weights.items():
            if isinstance(modules[name.rpartition(".")[0]], Conv1D) and name.endswith(".weight"):
                weights[name] = tensor.T.contiguous()  # back to Conv1D's (in, out) layout
        missing, unexpected = full.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not k.startswith(model.HEADS)]  # a new head comes with the adapter
        if missing or unexpected:
            raise RuntimeError(f"trained weights do not fit the architecture: missing {missing}, extra {unexpected}")
    return PeftModel.from_pretrained(full, run.adapter).merge_and_unload().to(out_dtype)


def report_prompts(recipe: Recipe, tokenizer) -> list[torch.Tensor]:
    """Held-out examples (the eval split, else the first training rows), tokenized as training saw them."""
    if recipe.task == "seq_cls":
        prepared = data.load_classification(recipe.data, recipe.train.seed)
        rows = prepared.eval if prepared.eval is not None else prepared.train
        texts = list(rows.select(range(min(REPORT_PROMPTS, len(rows))))["text"])
        ids = tokenizer(texts, truncation=True, max_length=recipe.data.max_seq_length)["input_ids"]
        return [torch.tensor(i) for i in ids]
    prepared = data.load_data(recipe.data, tokenizer, recipe.train.seed)
    rows = prepared.eval if prepared.eval is not None else prepared.train
    rows = rows.select(range(min(REPORT_PROMPTS, len(rows))))
    max_length = recipe.data.max_seq_length
    return [
        tokenizer(
            data.render(row, tokenizer),
            return_tensors="pt",
            add_special_tokens=False,
            truncation=True,
            max_length=max_length,
        ).input_ids[0]
        for row in rows
    ]


def verify_full(job: MergeJob, merged_dir: Path, out_dtype: torch.dtype, tokenizer) -> dict:
    """Whole-model logits of the written checkpoint (and of the other mode, merged in memory) vs NF4 + adapter."""
    run = job.run
    prompts = report_prompts(run.recipe, tokenizer)
    trained = load_trained(run)
    for param in trained.parameters():
        if not isinstance(param, bnb.nn.Params4bit):
            param.data = param.data.float()  # exact upcast, so that the reference computes in fp32 throughout
    reference = logits_on(PeftModel.from_pretrained(trained, run.adapter), prompts)
    del trained
    written = model.head(run.labels)[0].from_pretrained(merged_dir, dtype=out_dtype)
    modes = {job.mode: compare(reference, logits_on(written, prompts))}
    del written
    other = next(m for m in MERGE_MODES if m != job.mode)
    modes[other] = compare(reference, logits_on(merge_in_memory(run, other, out_dtype), prompts))
    return {m: modes[m] for m in MERGE_MODES}


# --------------------------------------------------------------------------------------------------- entry point
def resolve_out_dtype(name: str, base: Path, trust_remote_code: bool) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    dtype = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code).dtype or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def resolve_device(name: str, trained_on: str) -> torch.device:
    """Quantize where training did by default: bitsandbytes' CPU and CUDA quantizers may round differently."""
    if name != "auto":
        return model.compute_device(name)
    device = model.compute_device("auto" if trained_on == "cuda" else "cpu")
    if device.type != trained_on:
        logger.warning(
            "the base was quantized on %s during training and is re-quantized on %s now; the two quantizers may "
            "round a few weights differently",
            trained_on,
            device.type,
        )
    return device


def check_base_unchanged(run: Run, force: bool) -> Path:
    if not check_fingerprint(run, model.weight_files, force):
        return model.local_checkpoint(run.base)
    return Path(run.base)


def check_fingerprint(run: Run, weight_files: Callable[[str], list[Path]], force: bool) -> bool:
    """Whether the run's base is a local directory; a user error when it is gone, or when its weights (those
    `weight_files` lists) are not those the adapter was trained on and `force` is off."""
    recorded = run.manifest["base"].get("weights_fingerprint")
    if not Path(run.base).is_dir():
        if recorded:
            raise UserError(f"the base this run was trained on is gone: {run.base}")
        return False
    if recorded and fingerprint_weights(weight_files(run.base)) != recorded and not force:
        raise UserError(
            f"the weights in {run.base} differ from those this adapter was trained on (fingerprint mismatch); "
            "merge onto the original base, or pass --force to merge anyway"
        )
    return True


def check_disk(out: Path, needed: int) -> None:
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < needed * 1.02 + (64 << 20):
        raise UserError(
            f"not enough disk space in {parent}: the output needs {needed / 1e9:.2f} GB, {free / 1e9:.2f} GB "
            "are free; free some space or pass --out on another disk"
        )


def choose_verify(verify: str, plan: Plan) -> str:
    """`auto`: whole models when the reference, written and other-mode models (fp32) fit in half the free RAM."""
    if verify != "auto":
        return verify
    params = sum(math.prod(r.shape) for r in plan.refs)
    return "full" if fits_in_half_the_free_ram(3 * 4 * params) else "layers"


def fits_in_half_the_free_ram(nbytes: int) -> bool:
    return nbytes < os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2


def merge(
    run_dir: str | Path,
    *,
    mode: str = "dequantized",
    dtype: str = "auto",
    out: str | Path | None = None,
    force: bool = False,
    device: str = "auto",
    verify: str = "auto",
    max_shard_size: str = "5GB",
) -> Path:
    """Write RUN_DIR/merged (or `out`): the standalone merged checkpoint, merge_report.json and manifest.json."""
    run = load_run(run_dir)
    trust = run.recipe.model.trust_remote_code
    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError as e:
        raise UserError(f"--max-shard-size: {e}") from None
    base = check_base_unchanged(run, force)
    quant_device = resolve_device(device, run.quantization["device_kind"])
    out = Path(out) if out else Path(run_dir) / MERGED
    out_dtype = resolve_out_dtype(dtype, base, trust)
    adapter = load_adapter(run.adapter)
    if run.quantized and "quantized_modules" not in run.quantization:
        raise UserError(
            f"{run_dir}: the manifest does not list the quantized modules (written by an older qlora-pipe); re-run "
            "`qlora-pipe train` to merge it"
        )
    plan = make_plan(run, base, adapter, out_dtype)
    verify = choose_verify(verify, plan)
    check_disk(out, sum(t.nbytes for t in plan.outputs(adapter)))
    tokenizer = model.load_tokenizer(str(run.adapter), trust)
    check = LayerCheck(adapter, out_dtype) if verify == "layers" else None
    job = MergeJob(run, base, adapter, plan, mode, quant_device, check)

    with atomic_dir(out) as tmp:
        stream_merge(job, tmp, shard_bytes)
        write_metadata(job, tokenizer, tmp)
        report = {"verify": verify, "output_dtype": str(out_dtype).removeprefix("torch."), "written_mode": mode}
        if verify == "full":
            report["reference"] = "NF4 base + adapter, fp32 compute; whole-model logits on held-out examples"
            report["modes"] = verify_full(job, tmp, out_dtype, tokenizer)
        elif verify == "layers":
            report["reference"] = "each NF4 + LoRA layer vs its merged weight, fp32, on the same random inputs"
            report["modes"] = check.summary()
        (tmp / MERGE_REPORT).write_text(json.dumps(report, indent=2) + "\n")
        write_manifest(
            tmp,
            "merge",
            source_run=str(Path(run_dir).resolve()),
            base={"path": str(base)},
            mode=mode,
            dtype=report["output_dtype"],
            quantized_on=str(quant_device.type),
            report=report.get("modes", {}).get(mode),
        )
    return out


def write_metadata(job: MergeJob, tokenizer, out: Path) -> None:
    """config.json without quantization_config (a classifier's with its labels and class), the tokenizer, and a
    generation_config that stops at eos."""
    labels = job.run.labels
    auto, head_args = model.head(labels)
    config = AutoConfig.from_pretrained(
        job.base, trust_remote_code=job.run.recipe.model.trust_remote_code, **head_args
    )
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = job.plan.out_dtype
    if labels is not None:
        config.architectures = [auto._model_mapping[type(config)].__name__]
        config.pad_token_id = tokenizer.pad_token_id
    config.save_pretrained(out)
    if labels is not None:
        tokenizer.save_pretrained(out)
        return
    try:
        gen = GenerationConfig.from_pretrained(job.base)
    except OSError:  # generation_config.json is optional in a checkpoint
        gen = GenerationConfig()
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    if tokenizer.eos_token_id not in eos:
        gen.eos_token_id = [tokenizer.eos_token_id, *[e for e in eos if e is not None]]
    gen.save_pretrained(out)
    tokenizer.save_pretrained(out)
