"""Train stage: NF4 base → prepare_model_for_kbit_training → all-linear LoRA (PEFT) → TRL SFTTrainer → adapter.

Thin on purpose: transformers loads and quantizes, PEFT builds the adapter, TRL tokenizes, masks and trains. We map
the recipe onto their configs, check the inputs before the model is loaded, and record what the merge needs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import peft
import torch
from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments
from trl import SFTConfig, SFTTrainer

from qlora_pipe import UserError, data, loftq, model
from qlora_pipe.config import Recipe, recipe_from_dict, recipe_to_dict
from qlora_pipe.estimate import (
    GIB,
    HEAD_TILE_VOCAB,
    MeasurePeak,
    compute_bytes,
    loss_chunk_tokens,
    optimizer,
    predict,
    step_shape,
    text_sizes,
)
from qlora_pipe.manifest import MANIFEST, atomic_dir, fingerprint_weights, read_manifest, write_json, write_manifest

logger = logging.getLogger(__name__)

ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
TRAIN_LOG = "train_log.jsonl"
DATA_CHECK = "data_check.json"
# What a resumed run needs that trainer checkpoints do not hold: the recipe it started with, the eval metrics before
# training, and the wall time spent up to each checkpoint.
RUN_STATE = ".run_state.json"
RESUMABLE_CHANGES = ("train.max_steps", "train.epochs", "train.logging_steps", "train.eval_steps", "train.save_steps",
                     "train.save_total_limit", "train.report_to", "train.activation_offloading",
                     "train.loss_chunk_tokens", "train.tiled_mlp")  # fmt: skip


class Interrupted(UserError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint; the exit status says which signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopControl(TrainerCallback):
    """Stops training cleanly. After a SIGINT/SIGTERM: save a checkpoint at the end of the step, then stop. When the
    loss or the adapter weights become non-finite: stop at once and save nothing, so the last checkpoint stays good."""

    def __init__(self, params: list[torch.Tensor]):
        self.params, self.signal, self.diverged_at = params, None, None

    def _diverge(self, state, control) -> None:
        self.diverged_at = self.diverged_at or state.global_step
        control.should_save, control.should_evaluate, control.should_training_stop = False, False, True

    def on_step_end(self, args, state, control, **kwargs):
        if not torch.stack([p.detach().isfinite().all() for p in self.params]).all():
            self._diverge(state, control)
        elif self.signal is not None:
            control.should_save, control.should_training_stop = True, True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and not math.isfinite(logs["loss"]):
            self._diverge(state, control)


class RunClock(TrainerCallback):
    """Wall time of the whole run across resumes, recorded at every checkpoint."""

    def __init__(self, out: Path, run_state: dict, start_seconds: float):
        self.out, self.run_state, self.start = out, run_state, time.monotonic() - start_seconds

    def seconds(self) -> float:
        return time.monotonic() - self.start

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.run_state.setdefault("seconds_at_step", {})[str(state.global_step)] = round(self.seconds(), 2)
            write_json(self.out / RUN_STATE, self.run_state)


@contextmanager
def graceful_stop(stop: StopControl):
    """The first SIGINT/SIGTERM asks `stop` to checkpoint and stop; a second one stops at once."""

    def handler(signum, frame):
        if stop.signal is not None:
            raise SystemExit(128 + signum)
        stop.signal = signum
        logger.warning("%s: saving a checkpoint at the end of this step, then stopping (send it again to stop now)",
                       signal.Signals(signum).name)  # fmt: skip

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def checkpoint_step(path: Path) -> int | None:
    suffix = path.name.removeprefix("checkpoint-")
    return int(suffix) if path.name.startswith("checkpoint-") and suffix.isdigit() else None


def is_complete(checkpoint: Path) -> bool:
    """transformers writes trainer_state.json after the weights, optimizer, scheduler and RNG states: a checkpoint
    whose state file parses and names the checkpoint's own step was written whole."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    files = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt")
    return (
        state.get("global_step") == checkpoint_step(checkpoint)
        and all((checkpoint / f).is_file() for f in files)
        and any(checkpoint.glob("rng_state*.pth"))
    )


def resume_point(out: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: `auto` the newest complete one (incomplete newer ones are removed with a
    warning), `never` none (existing checkpoints are removed), or the given checkpoint directory."""
    found = sorted((p for p in (out / CHECKPOINTS).glob("checkpoint-*") if checkpoint_step(p) is not None),
                   key=checkpoint_step, reverse=True)  # fmt: skip
    if resume == "never":
        if found:
            logger.warning(
                "--resume never: removing the %d existing checkpoint(s) in %s", len(found), out / CHECKPOINTS
            )
            shutil.rmtree(out / CHECKPOINTS)
        return None
    if resume != "auto":
        path = Path(resume)
        if not is_complete(path):
            raise UserError(f"--resume {resume}: not a complete trainer checkpoint (it needs trainer_state.json, "
                            "adapter_model.safetensors, optimizer.pt, scheduler.pt and rng_state*.pth)")  # fmt: skip
        return path
    for checkpoint in found:
        if is_complete(checkpoint):
            return checkpoint
        logger.warning("skipping %s: it is incomplete (the run stopped while writing it); removing it", checkpoint)
        shutil.rmtree(checkpoint)
    return None


def _flat(d: dict, prefix: str = "") -> dict:
    return {k: v for key, value in d.items()
            for k, v in (_flat(value, f"{prefix}{key}.") if isinstance(value, dict) and key != "columns"
                         else {f"{prefix}{key}": value}).items()}  # fmt: skip


def check_same_recipe(started: dict, now: dict, out: Path) -> None:
    """A resumed run must be the run that was started; only its length and logging may change."""
    old, new = _flat(started), _flat(now)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    blocking = [k for k in changed if k not in RESUMABLE_CHANGES]
    if blocking:
        raise UserError(
            f"{out} holds a run started with a different recipe ({', '.join(blocking)} changed); resume it with "
            "its recipe, or start over with --resume never or another output_dir"
        )
    if changed:
        logger.warning("resuming with changed %s", ", ".join(changed))


def peak_memory(earlier_cuda_peak: int = 0) -> dict:
    """Peak memory of this process: allocated tensor memory on CUDA (the larger of the allocator's peak and the one
    it had before a reset), resident set size on the CPU."""
    if torch.cuda.is_available():
        peak = max(torch.cuda.max_memory_allocated(), earlier_cuda_peak)
        return {"peak_memory_gib": round(peak / 2**30, 3), "peak_memory_of": "cuda"}
    import resource

    return {"peak_memory_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            "peak_memory_of": "cpu process rss"}  # fmt: skip


class LossLog(TrainerCallback):
    """Append every log record (loss, learning rate, eval loss) to OUTPUT_DIR/train_log.jsonl as it happens."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def check_output_dir(out: Path) -> None:
    """Refuse to write a run into a directory that holds something else."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir: {out} exists and is not a directory")
    markers = (MANIFEST, CHECKPOINTS, loftq.LOFTQ, f".{loftq.LOFTQ}.partial")
    if out.is_dir() and any(out.iterdir()) and not any((out / m).exists() for m in markers):
        raise UserError(
            f"output_dir: {out} exists, is not empty and is not a qlora-pipe run; choose another output_dir"
        )


def configure_loss_head(chunk_tokens: int, vocab_size: int) -> None:
    """Bound the memory of TRL's fused LM head + cross-entropy (trl.kernels.chunked_logprob), and score only the
    labelled positions on every device.

    The head never builds the (batch, seq, vocab) logits: it projects tiles of TOKEN_CHUNK_SIZE tokens × the vocabulary
    chunk width into one reused buffer, folds each tile into running log-sum-exp statistics, and recomputes the tiles
    in the backward pass. Its memory is the tile: TRL's defaults (4096 tokens × 32768 entries, whatever the vocabulary)
    cost 0.25 GiB on CUDA, where a Triton kernel folds the tile in place, and ~3.6 GiB on the CPU, where the fold
    runs as torch ops with ~7 fp32 temporaries of the tile's size. Both are module constants that TRL reads at call
    time; we set them per run: `chunk_tokens` tokens, and a vocabulary width of at most the vocabulary.

    TRL also projects every position, prompts and padding included, off Triton devices, to keep tile shapes static
    for compilers (Neuron). Nothing recompiles on the CPU, so there we score only labelled positions too: with a large
    vocabulary that is most of a step's FLOPs. The loss and gradients are unchanged (tested)."""
    import trl.kernels.chunked_logprob as trl_head
    import trl.trainer.utils as trl_utils

    # Fail loudly if a TRL release renames what we set, rather than silently running with its defaults.
    assert hasattr(trl_head, "TOKEN_CHUNK_SIZE") and hasattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE")
    trl_head.TOKEN_CHUNK_SIZE = chunk_tokens
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = min(vocab_size, HEAD_TILE_VOCAB)
    use_triton = trl_utils._use_triton
    if not getattr(use_triton, "qlora_pipe", False):
        trl_utils._use_triton = lambda device: device.type == "cpu" or use_triton(device)
        trl_utils._use_triton.qlora_pipe = True
        trl_utils._use_triton.original = use_triton


def keeps_packed_examples_apart(net: torch.nn.Module, vocab_size: int) -> bool:
    """Whether the model keeps packed examples apart (no attention or position leakage across them).

    TRL's padding-free packing hands the model one row with position_ids restarting at each example; transformers
    turns that into a block-diagonal mask only for models that build their mask from position_ids (and only without
    a KV cache). ALiBi models such as BLOOM, and any model that ignores position_ids, silently leak. So we measure it
    on the loaded model: the logits of example b must not change when the example packed before it changes, and must
    match b run alone.
    """
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    ids = torch.randint(vocab_size, (3, 12), generator=torch.Generator().manual_seed(0)).tolist()

    def logits(*examples: list[int]) -> torch.Tensor:
        batch = collate([{"input_ids": sum(examples, []), "seq_lengths": [len(e) for e in examples]}])
        batch = {k: v.to(net.device) if torch.is_tensor(v) else v for k, v in batch.items() if k != "labels"}
        return net(**batch, use_cache=False).logits[0, -len(examples[-1]) :].float()

    was_training = net.training
    net.eval()
    with torch.no_grad():
        after_a, after_c, alone = logits(ids[0], ids[1]), logits(ids[2], ids[1]), logits(ids[1])
    net.train(was_training)
    scale = alone.abs().max().item()
    return (after_a - after_c).abs().max().item() <= 1e-3 * scale and (
        after_a - alone
    ).abs().max().item() <= 0.05 * scale


def choose_packing(recipe: Recipe, net: torch.nn.Module, vocab_size: int) -> bool:
    """`auto` packs (measured faster: docs/benchmarks.md) when the model keeps packed examples apart; `true` refuses a
    model that does not."""
    wanted = recipe.train.packing
    if recipe.task != "causal_lm" or wanted is False:
        return False
    if keeps_packed_examples_apart(net, vocab_size):
        return True
    if wanted is True:
        raise UserError(
            f"train.packing: this model ({net.config.model_type}) attends across packed examples (it does not take "
            f"example boundaries from position_ids); set train.packing: false or auto"
        )
    logger.info("train.packing auto: %s attends across packed examples; padding instead", net.config.model_type)
    return False


def lora_config(recipe: Recipe) -> peft.LoraConfig:
    lo = recipe.lora
    return peft.LoraConfig(
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        target_modules=lo.target_modules,
        use_rslora=lo.use_rslora,
        # loftq: the weights come from the LoftQ stage's adapter_init/, loaded over this default
        init_lora_weights="gaussian" if lo.init == "gaussian" else True,
        # SEQ_CLS: PEFT trains the new classification head whole (modules_to_save) and saves it with the adapter
        task_type="SEQ_CLS" if recipe.task == "seq_cls" else "CAUSAL_LM",
    )


def report_to(value: str | list[str]) -> str | list[str]:
    import importlib.util

    if value != "auto":
        return value
    return "tensorboard" if importlib.util.find_spec("tensorboard") else "none"


def training_args(recipe: Recipe, out: Path, compute_dtype: torch.dtype, has_eval: bool,
                  packing: bool = False) -> TrainingArguments:  # fmt: skip
    """TRL's SFTConfig for causal LM (data arrives tokenized and masked, so TRL only truncates and packs), the
    transformers TrainingArguments for classification."""
    t = recipe.train
    if recipe.task == "seq_cls":
        cls, task_args = TrainingArguments, {}
    else:
        cls = SFTConfig
        task_args = {
            "packing": packing,
            "max_length": recipe.data.max_seq_length,
            "assistant_only_loss": False,
            "activation_offloading": t.activation_offloading,
        }
    return cls(
        **task_args,
        output_dir=str(out / CHECKPOINTS),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # transformers reads a value below 1 as a share of the steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=optimizer(t.optimizer, "cuda" if torch.cuda.is_available() else "cpu"),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accumulation,
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy=("steps" if t.eval_steps else "epoch") if has_eval else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        report_to=report_to(t.report_to),
        logging_nan_inf_filter=False,  # a nan loss must show (and stop the run), not be averaged away
        include_num_input_tokens_seen="non_padding",
        bf16=compute_dtype == torch.bfloat16,
        fp16=compute_dtype == torch.float16,
        use_cpu=not torch.cuda.is_available(),
    )


def build_trainer(recipe: Recipe) -> tuple[SFTTrainer, dict]:
    """Everything up to `trainer.train()`: checks, tokenizer, data, NF4 model, LoRA, trainer. Returns the trainer and
    the facts the manifest records."""
    out = Path(recipe.output_dir)
    check_output_dir(out)
    base = model.check_base(recipe.model.base, recipe.model.allow_pickle)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if recipe.train.activation_offloading and device != "cuda":
        raise UserError("train.activation_offloading: needs a CUDA GPU (it moves activations from GPU memory to "
                        "pinned CPU memory; on the CPU they are in host memory already); set it to false")  # fmt: skip
    tokenizer, prepared, checked = prepare_data(recipe, base)
    if checked.fatal:
        raise UserError(refusal(checked))
    compute_dtype = model.resolve_compute_dtype(recipe.model.compute_dtype)
    quantized = recipe.model.quantization == "nf4"
    model_cfg, adapter_init = recipe.model, None
    if recipe.lora.init == "loftq":
        backbone, adapter_init = loftq.loftq_outputs(recipe)
        model_cfg, base = dataclasses.replace(recipe.model, base=str(backbone)), str(backbone)

    torch.manual_seed(recipe.train.seed)  # LoRA A is drawn at get_peft_model time
    base_model = model.load_base(model_cfg, compute_dtype, quantized, labels=prepared.labels)
    if prepared.labels:  # decoder classifiers read the prediction at the last non-pad token
        base_model.config.pad_token_id = tokenizer.pad_token_id
    # A KV cache is useless in training, and with one transformers cannot see packed example boundaries.
    base_model.config.use_cache = False
    layout = model.describe_quantization(base_model, compute_dtype)
    if quantized:
        model.set_cpu_bf16_fastpath(base_model, False)
    # PEFT's prepare_model_for_kbit_training is not called: it upcasts every frozen unquantized parameter
    # (embeddings, lm_head, norms) to fp32, 3.9 GiB more for Llama-3.1-8B, and makes the residual stream and so every
    # checkpointed layer input fp32. Frozen weights keep the load dtype (the merge reads them in it either way, so the
    # merged model is the same); get_peft_model freezes them; checkpointing is switched on by the trainer.
    if recipe.train.tiled_mlp and not model.tile_mlps(base_model, model.mlp_tile_tokens(text_sizes(base_model)[2])):
        logger.warning("train.tiled_mlp: %s has no per-token MLP to tile", base_model.config.model_type)
    if recipe.model.frozen_dtype == "float32":
        for param in base_model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()
    if adapter_init:
        peft_model = peft.PeftModel.from_pretrained(base_model, adapter_init, is_trainable=True)
    else:
        peft_model = peft.get_peft_model(base_model, lora_config(recipe))
    packing = choose_packing(recipe, peft_model, len(tokenizer))
    out.mkdir(parents=True, exist_ok=True)
    common = dict(
        model=peft_model,
        args=training_args(recipe, out, compute_dtype, "eval" in checked.tokenized, packing),
        train_dataset=checked.tokenized["train"],
        eval_dataset=checked.tokenized.get("eval"),
        processing_class=tokenizer,
        callbacks=[LossLog(out / TRAIN_LOG)],
    )
    if recipe.task == "seq_cls":
        trainer = Trainer(**common, data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    else:
        vocab_size = base_model.get_output_embeddings().weight.shape[0]
        configure_loss_head(loss_chunk_tokens(recipe.train.loss_chunk_tokens, vocab_size, device), vocab_size)
        trainer = SFTTrainer(**common)
    # Everything that trains (LoRA A/B, a classifier head trained whole) is fp32, and so are its gradients and
    # optimizer states: updates smaller than bf16's resolution would otherwise be lost. TRL casts a quantized model's
    # adapter to bf16, but PEFT loads adapters (and the Trainer resumes them) in fp32: fp32 throughout also makes a
    # resumed run compute exactly as an uninterrupted one. The cost is 2 bytes per adapter parameter.
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    (out / DATA_CHECK).write_text(json.dumps(checked.report, indent=2, ensure_ascii=False) + "\n")
    facts = {
        "base": {
            "path": base,
            "model_type": base_model.config.model_type,
            "weights_fingerprint": fingerprint_weights(model.weight_files(base)) if Path(base).is_dir() else None,
        },
        "quantization": {
            "method": recipe.model.quantization,
            **(model.NF4 if quantized else {}),
            "load_dtype": str(compute_dtype).removeprefix("torch."),
            "compute_dtype": str(compute_dtype).removeprefix("torch."),
            "device_kind": model.device_kind(),
            **layout,
        },
        "data": {"format": prepared.format, "assistant_only_loss": prepared.assistant_only_loss, **prepared.sources},
        "task": recipe.task,
        "labels": prepared.labels,
        "packing": packing,
    }
    return trainer, facts


def accuracy(prediction) -> dict[str, float]:
    logits, labels = prediction
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def prepare_data(recipe: Recipe, base: str) -> tuple[object, data.PreparedData, data.CheckedData]:
    """Tokenizer (with the recipe's chat template, eos and pad), data, and the data check: what `check-data` reports
    and `train` enforces, before any model is loaded."""
    tokenizer = model.load_tokenizer(base, recipe.model.trust_remote_code)
    data.prepare_tokenizer(tokenizer, recipe.data)
    if recipe.task == "seq_cls":
        prepared = data.load_classification(recipe.data, recipe.train.seed)
        return tokenizer, prepared, data.check_classification(prepared, tokenizer, recipe.data)
    prepared = data.load_data(recipe.data, tokenizer, recipe.train.seed)
    return tokenizer, prepared, data.check(prepared, tokenizer, recipe.data)


def refusal(checked: data.CheckedData) -> str:
    problems = "\n  ".join(checked.fatal)
    return f"the data check failed (`qlora-pipe check-data RECIPE` prints the full report):\n  {problems}"


def eval_metrics(trainer, when: str, label_accuracy: bool) -> dict[str, float]:
    result = {k: v for k, v in trainer.evaluate().items() if k in ("eval_loss", "eval_accuracy")}
    if label_accuracy:
        from qlora_pipe.evaluate import exact_match

        match = exact_match(trainer.model, trainer.processing_class, trainer.eval_dataset)
        if not match:
            logger.warning("train.label_accuracy: the eval answers are longer than label answers; not measured")
        result |= {"eval_exact_match": match["exact_match"]} if match else {}
    return {f"{k}_{when}": v for k, v in result.items()}


def _loss_summary(log_history: list[dict]) -> dict:
    losses = [r["loss"] for r in log_history if "loss" in r]
    return {"train_loss_first": losses[0], "train_loss_last": losses[-1]} if losses else {}


def train(recipe: Recipe, resume: str = "auto") -> Path:
    """Run the train stage; return the run directory (adapter/, manifest.json, checkpoints/, train_log.jsonl).

    `resume`: `auto` continues from the newest complete checkpoint in OUTPUT_DIR/checkpoints (data order, RNG
    states, optimizer, scheduler and step restored by the Trainer), `never` starts over, or a checkpoint path.
    """
    out = Path(recipe.output_dir)
    if resume not in ("auto", "never"):
        resume_point(out, resume)  # an explicit checkpoint is checked before anything is loaded
    trainer, facts = build_trainer(recipe)
    checkpoint = resume_point(out, resume)
    run_state = json.loads((out / RUN_STATE).read_text()) if checkpoint and (out / RUN_STATE).exists() else {}
    if checkpoint:
        # Read through the recipe schema, so that keys added since the run started count at their defaults.
        started = recipe_to_dict(recipe_from_dict(run_state["recipe"])) if "recipe" in run_state else None
        check_same_recipe(started or recipe_to_dict(recipe), recipe_to_dict(recipe), out)
        step = checkpoint_step(checkpoint)
        logger.info("resuming from %s (step %d)", checkpoint, step)
        keep_log_until(out / TRAIN_LOG, step)
        seconds = run_state.get("seconds_at_step", {}).get(str(step), 0.0)
    else:
        (out / TRAIN_LOG).unlink(missing_ok=True)
        run_state, seconds = {"recipe": recipe_to_dict(recipe), "metrics_before": {}}, 0.0
        if trainer.eval_dataset is not None:
            run_state["metrics_before"] = eval_metrics(trainer, "before", recipe.train.label_accuracy)
        write_json(out / RUN_STATE, run_state)
    clock = RunClock(out, run_state, seconds)
    stop = StopControl([p for p in trainer.model.parameters() if p.requires_grad])
    peak = MeasurePeak(lambda: trainer.optimizer)
    for callback in (clock, stop, peak):
        trainer.add_callback(callback)
    predicted = predicted_peak(recipe, trainer)
    with graceful_stop(stop):
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if stop.diverged_at is not None:
        newest = resume_point(out, "auto")
        raise UserError(
            f"training diverged at step {stop.diverged_at}: the loss or the adapter weights became nan/inf; the "
            f"last good checkpoint is {newest or 'none (none was written yet)'}. Lower train.learning_rate (or "
            "raise train.warmup_ratio) and start over with --resume never"
        )
    if stop.signal is not None:
        name = signal.Signals(stop.signal).name
        raise Interrupted(f"{name}: stopped at step {trainer.state.global_step} with a checkpoint in "
                          f"{resume_point(out, 'auto')}; run the same `qlora-pipe train` command to continue from it",
                          stop.signal)  # fmt: skip
    metrics = dict(run_state["metrics_before"])
    if trainer.eval_dataset is not None:
        metrics |= eval_metrics(trainer, "after", recipe.train.label_accuracy)
    seconds = clock.seconds()
    metrics |= {
        "train_loss_mean": result.training_loss,
        **_loss_summary(trainer.state.log_history),
        "steps": trainer.state.global_step,
        "train_seconds": round(seconds, 2),
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "tokens_per_second": round(trainer.state.num_input_tokens_seen / max(seconds, 1e-9), 1),
        "resumed_from": str(checkpoint) if checkpoint else None,
        **peak_memory(peak.earlier_peak),
        "peak_step_memory_predicted_gib": round(predicted / GIB, 3) if predicted else None,
        "peak_step_memory_measured_gib": round(peak.peak / GIB, 3) if peak.peak else None,
    }
    if trainer.is_world_process_zero():
        with atomic_dir(out / ADAPTER) as tmp:
            trainer.model.save_pretrained(tmp)
            trainer.processing_class.save_pretrained(tmp)
        write_manifest(out, "train", recipe=recipe_to_dict(recipe), **facts, adapter=ADAPTER, metrics=metrics)
    logger.info("adapter written to %s", out / ADAPTER)
    return out


def predicted_peak(recipe: Recipe, trainer) -> int | None:
    """The estimate for this run's largest micro-batch, logged before training starts (causal LM runs; None for
    classifiers)."""
    if recipe.task != "causal_lm":
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = trainer.model.get_base_model()
    with torch.device("meta"):
        skeleton = type(net)(net.config)
    step = step_shape(trainer.train_dataset, recipe, packed=trainer.args.packing)
    est = predict(skeleton, recipe, device, compute_bytes(recipe, device), step)
    logger.info("predicted peak memory of a training step: %.2f GiB for %d tokens, %d of them labelled (%s)",
                est.total / GIB, step.tokens, step.labelled,
                ", ".join(f"{k} {v / GIB:.2f}" for k, v in est.parts.items()))  # fmt: skip
    return est.total


def keep_log_until(path: Path, step: int) -> None:
    """Drop the log records written after `step`: the resumed run writes them again."""
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(line for line in lines if json.loads(line)["step"] <= step))


def load_run(run_dir: str | Path) -> tuple[dict, Path]:
    """The manifest of a finished training run and its adapter directory."""
    manifest = read_manifest(run_dir, "train")
    adapter = Path(run_dir) / manifest["adapter"]
    if not (adapter / "adapter_config.json").exists():
        raise UserError(f"{run_dir}: the adapter directory {adapter} is missing; re-run `qlora-pipe train`")
    if not (adapter / "adapter_model.safetensors").exists():
        raise UserError(f"{adapter}: no adapter_model.safetensors; adapters are read from safetensors only")
    return manifest, adapter
