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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import bitsandbytes as bnb
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import AutoConfig, GenerationConfig
from transformers.pytorch_utils import Conv1D

from qlora_pipe import UserError, data, model
from qlora_pipe.config import recipe_from_dict
from qlora_pipe.manifest import atomic_dir, fingerprint_weights, write_manifest
from qlora_pipe.quant import dequantize_fp32, fused_merge_supported, merge_nf4_rows, nf4_layer, trained_weight_fp32
from qlora_pipe.shards import OutTensor, ShardWriter, TensorRef, checkpoint_files, parse_size, read_index, read_tensor
from qlora_pipe.train import load_run

logger = logging.getLogger(__name__)

MODES = ("dequantized", "original")
OUT_DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
VERIFY = ("auto", "full", "layers", "none")
REPORT = "merge_report.json"
REPORT_PROMPTS = 8
PEFT_PREFIX = "base_model.model."
LAYER_PROBE_ROWS = 8


# ---------------------------------------------------------------------------------------------------- the adapter
@dataclass
class Adapter:
    """A PEFT LoRA adapter as the merge needs it: per module A, B and the scale; whole tensors replacing the base's."""

    scaling: float
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    embedding_modules: set[str] = field(default_factory=set)
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)

    def delta(self, module: str, fan_in_fan_out: bool) -> torch.Tensor:
        """PEFT's get_delta_weight: transpose(B @ A, fan_in_fan_out) × scaling (embeddings: always transposed)."""
        a, b = self.lora[module]
        product = b.float() @ a.float()
        if fan_in_fan_out or module in self.embedding_modules:
            product = product.T
        return product.mul_(self.scaling)  # in place: the same values, one 7B-sized temporary fewer


def load_adapter(adapter_dir: Path) -> Adapter:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    unsupported = [k for k in ("use_dora", "lora_bias", "rank_pattern", "alpha_pattern") if config.get(k)]
    if unsupported:
        raise UserError(f"{adapter_dir}: the merge does not support adapters with {', '.join(unsupported)}")
    r, alpha = config["r"], config["lora_alpha"]
    # The same expressions PEFT evaluates, so the scale is the same float.
    adapter = Adapter(alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(adapter_dir / "adapter_model.safetensors").items():
        name = key.removeprefix(PEFT_PREFIX)
        for marker, part in ((".lora_A.weight", "A"), (".lora_B.weight", "B"),
                             (".lora_embedding_A", "A"), (".lora_embedding_B", "B")):  # fmt: skip
            if name.endswith(marker):
                module = name[: -len(marker)]
                parts.setdefault(module, {})[part] = tensor
                if "embedding" in marker:
                    adapter.embedding_modules.add(module)
                break
        else:
            if "lora_" in name:
                raise UserError(f"{adapter_dir}: unsupported adapter tensor {key}")
            # modules_to_save and embedding layers PEFT saves whole: they replace the base's tensor
            adapter.replaced[name.replace(".base_layer.", ".")] = tensor
    adapter.lora = {module: (p["A"], p["B"]) for module, p in parts.items()}
    return adapter


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


def make_plan(base: Path, adapter: Adapter, quantized: dict, out_dtype: torch.dtype, trust_remote_code: bool,
              labels: list[str] | None = None) -> Plan:  # fmt: skip
    files = checkpoint_files(base)
    if not files:
        raise UserError(f"{base}: the streaming merge reads safetensors weights and found none (*.safetensors)")
    net = model.skeleton(base, trust_remote_code, labels)
    refs = read_index(files)
    names = model.parameter_names(net, [r.key for r in refs])
    if labels is not None:  # a classifier drops the base's pre-training heads (BERT's cls.*)
        refs = [r for r in refs if names[r.key] is not None]
    conv1d = {name for name, module in net.named_modules() if isinstance(module, Conv1D)}
    found = {n.removesuffix(".weight") for n in names.values() if n and n.endswith(".weight")}
    missing = (set(adapter.lora) | set(quantized)) - found
    added = sorted(set(adapter.replaced) - set(names.values()))
    missing |= {n for n in added if labels is None or not n.startswith(model.HEADS)}
    if missing:
        raise UserError(f"{base}: the checkpoint lacks weights the run needs: {', '.join(sorted(missing)[:5])}")
    return Plan(refs, names, conv1d, out_dtype, added)


# ---------------------------------------------------------------------------------------------- layer verification
@dataclass
class LayerCheck:
    """Per-layer comparison of the merged weights with the NF4 + LoRA layer on the same random inputs."""

    errors: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in MODES})
    max_abs: dict[str, float] = field(default_factory=lambda: dict.fromkeys(MODES, 0.0))

    def add(self, module: str, base: bnb.nn.Linear4bit | torch.Tensor, weights: dict[str, torch.Tensor],
            adapter: Adapter, out_dtype: torch.dtype) -> None:  # fmt: skip
        """`weights`: the merged (out, in) fp32 weight of each mode. The reference is the base layer as trained
        (bitsandbytes' own NF4 layer, or the (out, in) weight of a full-precision run) plus the adapter run as PEFT's
        LoRA layer runs it: base(x) + s·(x·Aᵀ)·Bᵀ."""
        gen = torch.Generator().manual_seed(0)
        in_features = base.shape[1] if isinstance(base, torch.Tensor) else base.in_features
        x = torch.randn(LAYER_PROBE_ROWS, in_features, generator=gen)
        with torch.no_grad():
            reference = x @ base.T if isinstance(base, torch.Tensor) else base(x.to(base.weight.device)).cpu()
        if module in adapter.lora:
            a, b = adapter.lora[module]
            reference = reference + (x @ a.float().T) @ b.float().T * adapter.scaling
        for mode, weight in weights.items():
            got = x @ weight.to(out_dtype).float().T
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
def quantized_weight(tensor: torch.Tensor, module: str, fan_in_fan_out: bool, delta: torch.Tensor | None, mode: str,
                     q: dict, device: torch.device, check: LayerCheck | None, adapter: Adapter,
                     out_dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """A weight training held in NF4: rebuilt as bitsandbytes multiplied by it (or the original, in `original`
    mode), in the checkpoint's layout. transformers transposes Conv1D weights to (out, in) before quantizing."""
    original = (tensor.T if fan_in_fan_out else tensor).float()
    layer = nf4_layer(original, q, device)
    trained = trained_weight_fp32(layer)
    if check:
        flat_delta = 0 if delta is None else (delta.T if fan_in_fan_out else delta)
        check.add(module, layer, {"dequantized": trained + flat_delta, "original": original + flat_delta}, adapter,
                  out_dtype)  # fmt: skip
    weight = trained if mode == "dequantized" else original
    return weight.T if fan_in_fan_out else weight


def merged_tensor(tensor: torch.Tensor, name: str | None, plan: Plan, adapter: Adapter, q: dict, mode: str,
                  device: torch.device, check: LayerCheck | None) -> torch.Tensor:  # fmt: skip
    """One output tensor: the base tensor as training saw it (or the original), plus the LoRA delta, cast."""
    if not tensor.is_floating_point():
        return tensor
    module, _, leaf = (name or "").rpartition(".")
    fan_in_fan_out = module in plan.conv1d
    delta = adapter.delta(module, fan_in_fan_out) if leaf == "weight" and module in adapter.lora else None
    quantized = q["method"] == "nf4" and leaf == "weight" and module in q["quantized_modules"]
    if name in adapter.replaced:
        weight = adapter.replaced[name].float()
    elif (
        quantized
        and mode == "dequantized"
        and not check
        and fused_merge_supported(tensor.T if fan_in_fan_out else tensor, q, device)
    ):
        # (out, in) layout, as transformers quantizes Conv1D weights
        flat_delta = delta.T if (delta is not None and fan_in_fan_out) else delta
        merged = merge_nf4_rows(tensor.T if fan_in_fan_out else tensor, q, flat_delta, plan.out_dtype)
        return merged.T if fan_in_fan_out else merged
    elif quantized and (mode == "dequantized" or check):
        weight = quantized_weight(tensor, module, fan_in_fan_out, delta, mode, q, device, check, adapter,
                                  plan.out_dtype)  # fmt: skip
    else:
        # as loaded for training: in the load dtype (or the dtype the model keeps that parameter in)
        trained = tensor.to(getattr(torch, q.get("unquantized_dtypes", {}).get(name, q["load_dtype"]))).float()
        weight = tensor.float() if mode == "original" else trained
        if check and delta is not None and module not in adapter.embedding_modules:
            flat = (lambda t: t.T) if fan_in_fan_out else (lambda t: t)
            merged = {"dequantized": flat(trained + delta), "original": flat(tensor.float() + delta)}
            check.add(module, flat(trained), merged, adapter, plan.out_dtype)
    if delta is not None:
        weight = weight + delta
    return weight.to(plan.out_dtype)


def stream_merge(plan: Plan, adapter: Adapter, manifest: dict, mode: str, device: torch.device, out: Path,
                 max_shard_size: int, check: LayerCheck | None) -> None:  # fmt: skip
    writer = ShardWriter(out, plan.outputs(adapter), max_shard_size)
    bar = tqdm(total=writer.total_bytes, unit="B", unit_scale=True, desc="merging", dynamic_ncols=True)
    # The next tensor is read while this one is computed (and the last one written): disk and CPU overlap.
    with bar, ThreadPoolExecutor(1, thread_name_prefix="shard-reader") as reader:
        upcoming = reader.submit(read_tensor, plan.refs[0])
        for i, ref in enumerate(plan.refs):
            tensor = upcoming.result()
            if i + 1 < len(plan.refs):
                upcoming = reader.submit(read_tensor, plan.refs[i + 1])
            tensor = merged_tensor(tensor, plan.names[ref.key], plan, adapter, manifest["quantization"], mode,
                                   device, check)  # fmt: skip
            writer.write(ref.key, tensor)
            bar.update(tensor.numel() * tensor.element_size())
        for name in plan.added:
            tensor = adapter.replaced[name].to(plan.out_dtype)
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


def load_trained(manifest: dict) -> torch.nn.Module:
    """NF4 base exactly as training loaded it (same load dtype: it sets the block scales), computing in exact fp32."""
    trained = model.load_run_base(manifest, torch.float32)
    model.set_cpu_bf16_fastpath(trained, False)
    return trained


def merge_in_memory(manifest: dict, adapter_dir: Path, mode: str, out_dtype: torch.dtype) -> torch.nn.Module:
    """The reference merge, whole model in memory: rebuild the trained weights from the NF4 model transformers loads
    (or the original weights), then PEFT's merge_and_unload. The streaming merge must write exactly this."""
    recipe = recipe_from_dict(manifest["recipe"])
    base, trust = manifest["base"]["path"], recipe.model.trust_remote_code
    auto, head_args = model.head(manifest.get("labels"))
    if mode == "original":
        full = auto.from_pretrained(base, dtype=torch.float32, trust_remote_code=trust, **head_args)
    else:
        trained = load_trained(manifest)
        weights = {
            name: dequantize_fp32(p.data, p.quant_state) if isinstance(p, bnb.nn.Params4bit) else p.detach().float()
            for name, p in trained.named_parameters(remove_duplicate=False)
        }
        del trained
        config = AutoConfig.from_pretrained(base, trust_remote_code=trust, **head_args)
        full = auto.from_config(config, dtype=torch.float32, trust_remote_code=trust)
        modules = dict(full.named_modules())
        for name, tensor in weights.items():
            if isinstance(modules[name.rpartition(".")[0]], Conv1D) and name.endswith(".weight"):
                weights[name] = tensor.T.contiguous()  # back to Conv1D's (in, out) layout
        missing, unexpected = full.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not k.startswith(model.HEADS)]  # a new head comes with the adapter
        if missing or unexpected:
            raise RuntimeError(f"trained weights do not fit the architecture: missing {missing}, extra {unexpected}")
    return PeftModel.from_pretrained(full, adapter_dir).merge_and_unload().to(out_dtype)


def report_prompts(recipe, tokenizer) -> list[torch.Tensor]:
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
    return [
        tokenizer(
            data.render(row, tokenizer),
            return_tensors="pt",
            add_special_tokens=False,
            truncation=True,
            max_length=recipe.data.max_seq_length,
        ).input_ids[0]  # fmt: skip
        for row in rows
    ]


def verify_full(manifest: dict, adapter_dir: Path, merged_dir: Path, mode: str, out_dtype: torch.dtype,
                tokenizer) -> dict:  # fmt: skip
    """Whole-model logits of the written checkpoint (and of the other mode, merged in memory) vs NF4 + adapter."""
    prompts = report_prompts(recipe_from_dict(manifest["recipe"]), tokenizer)
    trained = load_trained(manifest)
    for param in trained.parameters():
        if not isinstance(param, bnb.nn.Params4bit):
            param.data = param.data.float()  # exact upcast, as prepare_model_for_kbit_training does for training
    reference = logits_on(PeftModel.from_pretrained(trained, adapter_dir), prompts)
    del trained
    written = model.head(manifest.get("labels"))[0].from_pretrained(merged_dir, dtype=out_dtype)
    modes = {mode: compare(reference, logits_on(written, prompts))}
    del written
    other = next(m for m in MODES if m != mode)
    modes[other] = compare(reference, logits_on(merge_in_memory(manifest, adapter_dir, other, out_dtype), prompts))
    return {m: modes[m] for m in MODES}


# --------------------------------------------------------------------------------------------------- entry point
def resolve_out_dtype(name: str, base: str, trust_remote_code: bool) -> torch.dtype:
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
        logger.warning("the base was quantized on %s during training and is re-quantized on %s now; the two "
                       "quantizers may round a few weights differently", trained_on, device.type)  # fmt: skip
    return device


def check_base_unchanged(manifest: dict, force: bool) -> Path:
    base = manifest["base"]["path"]
    recorded = manifest["base"].get("weights_fingerprint")
    if not Path(base).is_dir():
        if recorded:
            raise UserError(f"the base this run was trained on is gone: {base}")
        return model.local_checkpoint(base)
    if recorded and fingerprint_weights(model.weight_files(base)) != recorded and not force:
        raise UserError(
            f"the weights in {base} differ from those this adapter was trained on (fingerprint mismatch); "
            "merge onto the original base, or pass --force to merge anyway"
        )
    return Path(base)


def check_disk(out: Path, needed: int) -> None:
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < needed * 1.02 + (64 << 20):
        raise UserError(f"not enough disk space in {parent}: the merged model needs {needed / 1e9:.2f} GB, "
                        f"{free / 1e9:.2f} GB are free; free some space or pass --out on another disk")  # fmt: skip


def choose_verify(verify: str, plan: Plan) -> str:
    """`auto`: whole models when the reference, written and other-mode models (fp32) fit in half the free RAM."""
    if verify != "auto":
        return verify
    params = sum(math.prod(r.shape) for r in plan.refs)
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return "full" if 3 * 4 * params < available / 2 else "layers"


def merge(
    run_dir: str | Path,
    mode: str = "dequantized",
    dtype: str = "auto",
    out: str | Path | None = None,
    force: bool = False,
    device: str = "auto",
    verify: str = "auto",
    max_shard_size: str = "5GB",
) -> Path:
    """Write RUN_DIR/merged (or `out`): the standalone merged checkpoint, merge_report.json and manifest.json."""
    manifest, adapter_dir = load_run(run_dir)
    recipe = recipe_from_dict(manifest["recipe"])
    trust = recipe.model.trust_remote_code
    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError as e:
        raise UserError(f"--max-shard-size: {e}") from None
    base = check_base_unchanged(manifest, force)
    quant_device = resolve_device(device, manifest["quantization"]["device_kind"])
    out = Path(out) if out else Path(run_dir) / "merged"
    out_dtype = resolve_out_dtype(dtype, str(base), trust)
    adapter = load_adapter(adapter_dir)
    if manifest["quantization"]["method"] == "nf4" and "quantized_modules" not in manifest["quantization"]:
        raise UserError(f"{run_dir}: the manifest does not list the quantized modules (written by an older "
                        "qlora-pipe); re-run `qlora-pipe train` to merge it")  # fmt: skip
    plan = make_plan(base, adapter, manifest["quantization"].get("quantized_modules", {}), out_dtype, trust,
                     manifest.get("labels"))  # fmt: skip
    verify = choose_verify(verify, plan)
    check_disk(out, sum(t.nbytes for t in plan.outputs(adapter)))
    tokenizer = model.load_tokenizer(str(adapter_dir), trust)
    check = LayerCheck() if verify == "layers" else None

    with atomic_dir(out) as tmp:
        stream_merge(plan, adapter, manifest, mode, quant_device, tmp, shard_bytes, check)
        write_metadata(base, tokenizer, out_dtype, tmp, trust, manifest.get("labels"))
        report = {"verify": verify, "output_dtype": str(out_dtype).removeprefix("torch."), "written_mode": mode}
        if verify == "full":
            report["reference"] = "NF4 base + adapter, fp32 compute; whole-model logits on held-out examples"
            report["modes"] = verify_full(manifest, adapter_dir, tmp, mode, out_dtype, tokenizer)
        elif verify == "layers":
            report["reference"] = "each NF4 + LoRA layer vs its merged weight, fp32, on the same random inputs"
            report["modes"] = check.summary()
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        write_manifest(tmp, "merge", source_run=str(Path(run_dir).resolve()), base={"path": str(base)}, mode=mode,
                       dtype=report["output_dtype"], quantized_on=str(quant_device.type),
                       report=report.get("modes", {}).get(mode))  # fmt: skip
    return out


def write_metadata(base: Path, tokenizer, out_dtype: torch.dtype, out: Path, trust_remote_code: bool,
                   labels: list[str] | None = None) -> None:  # fmt: skip
    """config.json without quantization_config (a classifier's with its labels and class), the tokenizer, and a
    generation_config that stops at eos."""
    auto, head_args = model.head(labels)
    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code, **head_args)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = out_dtype
    if labels is not None:
        config.architectures = [auto._model_mapping[type(config)].__name__]
        config.pad_token_id = tokenizer.pad_token_id
    config.save_pretrained(out)
    if labels is not None:
        tokenizer.save_pretrained(out)
        return
    try:
        gen = GenerationConfig.from_pretrained(base)
    except OSError:  # generation_config.json is optional in a checkpoint
        gen = GenerationConfig()
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    if tokenizer.eos_token_id not in eos:
        gen.eos_token_id = [tokenizer.eos_token_id, *[e for e in eos if e is not None]]
    gen.save_pretrained(out)
    tokenizer.save_pretrained(out)
