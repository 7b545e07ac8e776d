"""Train stage: NF4 base → all-linear LoRA (PEFT) → TRL SFTTrainer → adapter.

Thin on purpose: transformers loads and quantizes, PEFT builds the adapter, TRL tokenizes, masks and trains. We map
the recipe onto their configs, check the inputs before the model is loaded, and record what the merge needs. The run
directory's layout, checkpoints and resuming are run.py's; the callbacks that log, time and stop a run are
callbacks.py's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
import trl.kernels.chunked_logprob as trl_head
import trl.trainer.utils as trl_utils
from accelerate.data_loader import BatchSamplerShard
from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments
from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations
from transformers.trainer_utils import TrainOutput
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from qlora_pipe import UserError, data, loftq, model
from qlora_pipe.callbacks import Interrupted, LossLog, RunClock, StopControl, graceful_stop
from qlora_pipe.config import (
    HEAD_TILE_VOCAB,
    Recipe,
    local_device,
    loss_chunk_tokens,
    optimizer_name,
    recipe_to_dict,
    report_to,
)
from qlora_pipe.estimate import GIB, MeasurePeak, peak_memory, predicted_peak, text_sizes
from qlora_pipe.evaluate import exact_match, truncated
from qlora_pipe.manifest import atomic_dir, fingerprint_weights, write_manifest
from qlora_pipe.run import (
    ADAPTER,
    CHECKPOINTS,
    DATA_CHECK,
    TRAIN_LOG,
    check_launcher,
    check_output_dir,
    check_resume,
    checkpoint_step,
    is_writer,
    on_writer,
    rank,
    resume_point,
    resumed_state,
    start_state,
    wait_for_writer,
)

logger = logging.getLogger(__name__)


def train(recipe: Recipe, *, resume: str = "auto") -> Path:
    """Run the train stage; return the run directory (adapter/, manifest.json, checkpoints/, train_log.jsonl).

    `resume`: `auto` continues from the newest complete checkpoint in OUTPUT_DIR/checkpoints (data order, RNG
    states, optimizer, scheduler and step restored by the Trainer), `never` starts over, or a checkpoint path.
    """
    out = Path(recipe.output_dir)
    check_resume(resume)
    trainer, facts = build_trainer(recipe)

    def measure_before() -> dict:
        if trainer.eval_dataset is None:
            return {}
        before = eval_metrics(trainer, "before", recipe.train.label_accuracy)
        undo_eval_preparation(trainer)
        return before

    predicted = predicted_peak(recipe, trainer)
    run = run_trainer(trainer, recipe, resume, measure_before)
    metrics = dict(run.metrics_before)
    if trainer.eval_dataset is not None:
        metrics |= eval_metrics(trainer, "after", recipe.train.label_accuracy, last_step_eval(trainer.state))
    seconds = run.clock.seconds()
    metrics |= {
        "train_loss_mean": run.result.training_loss,
        **loss_summary(trainer.state.log_history),
        "steps": trainer.state.global_step,
        "train_seconds": round(seconds, 2),
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "tokens_per_second": round(trainer.state.num_input_tokens_seen / max(seconds, 1e-9), 1),
        "resumed_from": str(run.checkpoint) if run.checkpoint else None,
        **peak_memory(run.peak.earlier_peak),
        "peak_step_memory_predicted_gib": round(predicted / GIB, 3) if predicted else None,
        "peak_step_memory_measured_gib": round(run.peak.peak / GIB, 3) if run.peak.peak else None,
    }
    save_adapter(trainer, out)
    if is_writer():
        write_manifest(out, "train", recipe=recipe_to_dict(recipe), **facts, adapter=ADAPTER, metrics=metrics)
        logger.info("adapter written to %s", out / ADAPTER)
    wait_for_writer()  # no rank returns before the run directory is complete
    return out


@dataclass
class Trained:
    """What trainer.train() leaves for the manifest."""

    result: TrainOutput
    metrics_before: dict
    clock: RunClock
    peak: MeasurePeak
    checkpoint: Path | None


def run_trainer(
    trainer: Trainer,
    recipe: Recipe,
    resume: str,
    measure_before: Callable[[], dict],
    callbacks: tuple[TrainerCallback, ...] = (),
) -> Trained:
    """Train, for every task alike: from the checkpoint `resume` names (`auto`: the newest complete one; data order,
    RNG states, optimizer, scheduler and step restored by the Trainer) or from the start (measuring `measure_before`
    first), with the callbacks that time, stop and measure a run; a user error when it diverged or was
    interrupted."""
    out = Path(recipe.output_dir)
    checkpoint = resume_point(out, resume)
    wait_for_writer()  # the writer has removed what resume_point dropped before anyone trains
    if checkpoint:
        logger.info("resuming from %s (step %d)", checkpoint, checkpoint_step(checkpoint))
        state = resumed_state(out, recipe, checkpoint)
        seconds = state.seconds_at(checkpoint_step(checkpoint))
    else:
        state, seconds = start_state(out, recipe), 0.0
        state.metrics_before = measure_before()
        state.save(out)
    clock, stop, peak = RunClock(out, state, seconds), StopControl(), MeasurePeak(lambda: trainer.optimizer)
    for callback in (clock, stop, peak, *callbacks):
        trainer.add_callback(callback)
    with graceful_stop(stop):
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    wait_for_writer()  # every rank has written its part of the last checkpoint before anyone judges it complete
    check_stopped(stop, out, trainer.state.global_step)
    return Trained(result, dict(state.metrics_before), clock, peak, checkpoint)


def save_adapter(trainer, out: Path) -> None:
    """OUTPUT_DIR/adapter: an ordinary PEFT adapter and the tokenizer, written by the writer. Under FSDP the adapter is
    sharded across the ranks, and every rank takes part in gathering it whole first."""
    state = None
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        state = trainer.accelerator.get_state_dict(trainer.model)
    if is_writer():
        with atomic_dir(out / ADAPTER) as tmp:
            trainer.accelerator.unwrap_model(trainer.model).save_pretrained(tmp, state_dict=state)
            trainer.processing_class.save_pretrained(tmp)


def check_stopped(stop: StopControl, out: Path, step: int) -> None:
    """A run that diverged or was interrupted ends here, naming the checkpoint to go on from."""
    if stop.diverged_at is not None:
        newest = resume_point(out, "auto")
        raise UserError(
            f"training diverged at step {stop.diverged_at}: the loss or the adapter weights became nan/inf; the "
            f"last good checkpoint is {newest or 'none (none was written yet)'}. Lower train.learning_rate (or "
            "raise train.warmup_ratio) and start over with --resume never"
        )
    if stop.signal is not None:
        name = signal.Signals(stop.signal).name
        raise Interrupted(
            f"{name}: stopped at step {step} with a checkpoint in {resume_point(out, 'auto')}; run the same "
            "`qlora-pipe train` command to continue from it",
            stop.signal,
        )


def eval_metrics(trainer, when: str, label_accuracy: bool, scores: dict | None = None) -> dict[str, float]:
    """Eval loss (and accuracy) suffixed `_when`: `scores` (the Trainer's evaluation of this model), else a new
    evaluation; with `label_accuracy`, the exact match of the eval examples' answers."""
    scores = trainer.evaluate() if scores is None else scores
    result = {k: v for k, v in scores.items() if k in ("eval_loss", "eval_accuracy")}
    if label_accuracy:
        # Scored one example per row, as `qlora-pipe eval` does: packed rows would score only each row's last answer,
        # with the examples packed before it in its prompt.
        match = exact_match(trainer.model, trainer.processing_class, trainer.eval_examples)
        if not match:
            logger.warning("train.label_accuracy: the eval answers are longer than label answers; not measured")
        result |= {"eval_exact_match": match["exact_match"]} if match else {}
    return {f"{k}_{when}": v for k, v in result.items()}


def last_step_eval(state) -> dict | None:
    """The Trainer's evaluation of the final model, logged at the last step (it evaluates at the end of every run with
    eval data: DefaultFlowCallback, and at each epoch's end); None where none was logged at that step."""
    last = next((r for r in reversed(state.log_history) if "eval_loss" in r), None)
    return last if last and last["step"] == state.global_step else None


def undo_eval_preparation(trainer) -> None:
    """Let `trainer.train()` wrap the model for DDP after an evaluation before training.

    transformers' `evaluate()` on an untrained Trainer prepares the model in accelerate's evaluation mode, which
    marks it prepared; `train()` then skips the DistributedDataParallel wrap, and every rank trains alone with its
    own gradients (seen with transformers 5.24 and accelerate 1.15: the ranks' losses part after two steps). FSDP and
    DeepSpeed wrap at that first preparation already (the wrapped model is then not the bare one) and are left alone.
    """
    if trainer.args.world_size > 1 and trainer.model_wrapped is trainer.model:
        trainer.model._is_accelerate_prepared = False
        trainer.accelerator._models.clear()


def loss_summary(log_history: list[dict]) -> dict:
    losses = [r["loss"] for r in log_history if "loss" in r]
    return {"train_loss_first": losses[0], "train_loss_last": losses[-1]} if losses else {}


def build_trainer(recipe: Recipe) -> tuple[SFTTrainer, dict]:
    """Everything up to `trainer.train()`: checks, tokenizer, data, NF4 model, LoRA, trainer. Returns the trainer and
    the facts the manifest records."""
    out = Path(recipe.output_dir)
    check_launcher()
    check_output_dir(out)
    wait_for_writer()  # every rank has looked at the output directory before the writer puts anything in it
    base = model.check_base(recipe.model.base, recipe.model.allow_pickle)
    device = local_device()
    check_sharding(recipe, device)
    if recipe.train.activation_offloading and device != "cuda":
        raise UserError(
            "train.activation_offloading: needs a CUDA GPU (it moves activations from GPU memory to pinned CPU "
            "memory; on the CPU they are in host memory already); set it to false"
        )
    check_trackers(report_to(recipe.train.report_to))
    tokenizer, prepared, checked = data.prepare_data(recipe, base, checks=is_writer())
    check_data(out, prepared, checked)
    compute_dtype = model.resolve_compute_dtype(recipe.model.compute_dtype)
    if recipe.lora.init in ("loftq", "pissa"):
        backbone, adapter_init = loftq.loftq_outputs(recipe)
        base = str(backbone)
    else:
        adapter_init = None
    peft_model, layout = adapted_model(
        recipe, base, compute_dtype, prepared.labels, tokenizer.pad_token_id, adapter_init
    )
    packing = choose_packing(recipe, peft_model, len(tokenizer))
    common = dict(
        model=peft_model,
        args=training_args(recipe, out, compute_dtype, "eval" in checked.tokenized, packing),
        train_dataset=checked.tokenized["train"],
        eval_dataset=checked.tokenized.get("eval"),
        processing_class=tokenizer,
        callbacks=[LossLog(out / TRAIN_LOG)],
    )
    if recipe.task == "seq_cls":
        collator = DataCollatorWithPadding(tokenizer)
        trainer = ClassifierTrainer(**common, data_collator=collator, compute_metrics=accuracy)
    else:
        vocab_size = peft_model.get_base_model().get_output_embeddings().weight.shape[0]
        configure_loss_head(loss_chunk_tokens(recipe.train.loss_chunk_tokens, vocab_size, device), vocab_size)
        eval_examples = checked.tokenized.get("eval")
        if eval_examples is not None:
            eval_examples = truncated(eval_examples, recipe.data.max_seq_length)
        trainer = SFTStageTrainer(**common, eval_examples=eval_examples)
    # Everything that trains (LoRA A/B, a classifier head trained whole) is fp32, and so are its gradients and
    # optimizer states: updates smaller than bf16's resolution would otherwise be lost. TRL casts a quantized model's
    # adapter to bf16, but PEFT loads adapters (and the Trainer resumes them) in fp32: fp32 throughout also makes a
    # resumed run compute exactly as an uninterrupted one. The cost is 2 bytes per adapter parameter.
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    quantized = recipe.model.quantization == "nf4"
    facts = {
        "base": {
            "path": base,
            "model_type": peft_model.get_base_model().config.model_type,
            "weights_fingerprint": fingerprint_weights(model.weight_files(base)) if Path(base).is_dir() else None,
        },
        "quantization": {
            "method": recipe.model.quantization,
            **(
                model.NF4 | {"quant_storage": str(model.quant_storage(compute_dtype)).removeprefix("torch.")}
                if quantized
                else {}
            ),
            "load_dtype": str(compute_dtype).removeprefix("torch."),
            "compute_dtype": str(compute_dtype).removeprefix("torch."),
            "device_kind": device,
            **layout,
        },
        "data": prepared.facts(),
        "task": recipe.task,
        "labels": prepared.labels,
        "packing": packing,
        "ranks": ranks_facts(trainer),
    }
    return trainer, facts


class RowsOnce:
    """A Trainer mixin: the ranks together train every row once per epoch, as one process does (RankBatches); the
    Trainer's collator must take RankBatches' empty batches."""

    def get_train_dataloader(self):
        return rows_once(super().get_train_dataloader())


class SFTStageTrainer(RowsOnce, SFTTrainer):
    """TRL's SFTTrainer, whose ranks together train every row once per epoch (RowsOnce), and which keeps the eval
    examples one per row (`eval_examples`; TRL packs its eval set when it packs) for exact match."""

    def __init__(self, *args, eval_examples=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_examples = eval_examples
        self.data_collator = EmptyBatchTrainsNothing(self.data_collator, self.processing_class.pad_token_id)


class ClassifierTrainer(RowsOnce, Trainer):
    """transformers' Trainer for task seq_cls, whose ranks together train every row once per epoch (RowsOnce), and on
    several ranks each micro-batch's loss the mean over the examples of all ranks together (a classifier's loss is a
    mean over examples, and ranks with uneven shares would otherwise weigh them unequally when DDP averages the ranks'
    gradients)."""

    loss_is_scaled_for_ga = False  # a mean per micro-batch: the Trainer divides it by the accumulation steps

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.data_collator = EmptyBatchClassifiesNothing(self.data_collator, self.processing_class)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training or self.args.world_size == 1:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs.logits.float()
        total = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), reduction="sum")
        examples = self.accelerator.reduce((labels != -100).sum().float(), reduction="sum")
        # DDP averages the ranks' gradients: scaled by the world size, the average is the sum over all examples
        # divided by their count, one process's mean over this micro-batch
        loss = total * self.args.world_size / examples.clamp(min=1)
        return (loss, outputs) if return_outputs else loss


@dataclass
class EmptyBatchClassifiesNothing:
    """The collator, and for an empty batch (RankBatches) one short text whose label is ignored (-100), so that the
    rank still runs the forward and backward DDP needs from it, and adds nothing to the loss."""

    collate: Callable[[list[dict]], dict]
    tokenizer: object

    def __call__(self, examples: list[dict]) -> dict:
        if examples:
            return self.collate(examples)
        features = dict(self.tokenizer("."))
        return self.collate([features | {"labels": -100}])


def rows_once(loader):
    """Make the ranks of `loader` (accelerate's DataLoaderShard) take RankBatches' batches."""
    shard = getattr(loader, "batch_sampler", None)
    if not isinstance(shard, BatchSamplerShard) or shard.num_processes == 1 or shard.split_batches:
        return loader
    shard.batch_sampler = RankBatches(shard.batch_sampler, shard.num_processes, shard.process_index)
    # The shard now passes the batches through as they are (batch_size None: of any size, no filling), as
    # transformers makes it do for its own rank-aware BatchRebalanceSampler (Trainer._get_dataloader).
    shard.num_processes, shard.process_index, shard.batch_size = 1, 0, None
    return loader


class RankBatches:
    """One rank's batches of an epoch: its share of each global batch, the epoch's last (short) one included, and an
    empty batch where that one has no rows left for this rank.

    One process with batch N*b trains the epoch's last short batch once. accelerate's BatchSamplerShard cannot do that
    on N ranks: with even_batches (the default) it fills the last global batch with rows from the start of the epoch,
    which then train twice (and count as tokens seen twice); without, a rank that ran out has one batch less, and
    the others wait for it forever in DDP's all-reduce. Here every rank takes the same number of batches; an empty one
    trains nothing (EmptyBatchTrainsNothing), and the Trainer normalises each step's loss over the trained tokens
    of all ranks together (average_tokens_across_devices), so the step equals one process's.
    """

    def __init__(self, batches, ranks: int, rank: int):
        self.batches, self.ranks, self.rank = batches, ranks, rank

    # accelerate sets the epoch's seeded sampler through this attribute (DataLoaderShard.set_sampler, set_epoch).
    @property
    def sampler(self):
        return self.batches.sampler

    @sampler.setter
    def sampler(self, sampler) -> None:
        self.batches.sampler = sampler

    def __len__(self) -> int:
        return math.ceil(len(self.batches) / self.ranks)

    def __iter__(self) -> Iterator[list[int]]:
        group = []
        for batch in self.batches:
            group.append(batch)
            if len(group) == self.ranks:
                yield group[self.rank]
                group = []
        if group:
            yield group[self.rank] if self.rank < len(group) else []


@dataclass
class EmptyBatchTrainsNothing:
    """The collator, and for an empty batch (RankBatches) one pad token that trains nothing: the rank still runs the
    step's forward and backward, which DDP needs from every rank. Padding-free, so that the Trainer counts no token
    of it as seen (it counts input ids other than the pad token where there is no attention mask)."""

    collate: Callable[[list[dict]], dict]
    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict:
        if examples:
            return self.collate(examples)
        # Its only label is at a sequence start, which the padding-free collator masks (-100).
        return DataCollatorForLanguageModeling(pad_token_id=self.pad_token_id, padding_free=True)(
            [{"input_ids": [self.pad_token_id]}]
        )


def ranks_facts(trainer) -> dict:
    """How many processes trained, how, and the batch each step averaged over."""
    args = trainer.args
    strategy = "fsdp" if trainer.is_fsdp_enabled else "deepspeed" if trainer.is_deepspeed_enabled else "ddp"
    return {
        "world_size": args.world_size,
        "strategy": strategy if args.world_size > 1 else "single process",
        "per_rank_batch": args.per_device_train_batch_size,
        "grad_accumulation": args.gradient_accumulation_steps,
        "global_batch": args.world_size * args.per_device_train_batch_size * args.gradient_accumulation_steps,
    }


def check_sharding(recipe: Recipe, device: str) -> None:
    """FSDP-QLoRA runs as bitsandbytes and PEFT document it: FSDP1 on CUDA (recipes/accelerate/fsdp_qlora.yaml)."""
    version = model.fsdp_version()
    if version is None:
        return
    if device != "cuda":
        raise UserError(
            f"FSDP shards the model across GPUs and this run is on {device}; launch with "
            "recipes/accelerate/ddp.yaml (one full copy per rank) instead"
        )
    if version == 2 and recipe.model.quantization == "nf4":
        # accelerate#3983: FSDP2 with Params4bit crashes or trains silently wrong (loss 0, grad_norm nan); its fix,
        # accelerate#3987, keeps the 4-bit weights out of the shards (no memory saved); axolotl#2992: FSDP2 gathers
        # Params4bit into plain parameters that lose their quantization state.
        raise UserError(
            "FSDP2 with 4-bit weights is broken upstream (huggingface/accelerate#3983, #3987; "
            "axolotl-ai-cloud/axolotl#2992): use FSDP1 (fsdp_version: 1, as recipes/accelerate/fsdp_qlora.yaml "
            "sets it), or model.quantization: none"
        )


def check_data(out: Path, prepared: data.PreparedData, checked: data.CheckedData) -> None:
    """The data check runs on the writer (which keeps its report; the other ranks only tokenize), and its verdict
    reaches every rank; each rank then makes sure it read the same files (several nodes may hold separate copies)."""

    def verdict() -> dict:
        if checked.fatal:
            raise UserError(data.refusal(checked))
        out.mkdir(parents=True, exist_ok=True)
        (out / DATA_CHECK).write_text(json.dumps(checked.report, indent=2, ensure_ascii=False) + "\n")
        return prepared.facts()

    read_by_writer = on_writer(verdict)
    if prepared.facts() != read_by_writer:
        raise UserError(
            f"rank {rank()} read other data than rank 0 (rank 0: {read_by_writer}; rank {rank()}: "
            f"{prepared.facts()}); give every node the same data files"
        )


def check_trackers(value: str | list[str]) -> None:
    """train.report_to names trackers transformers knows and this machine has (else the Trainer fails after the model
    is loaded)."""
    names = [value] if isinstance(value, str) else value
    available = set(get_available_reporting_integrations())
    for name in (n for n in names if n not in ("none", "all")):
        if name not in INTEGRATION_TO_CALLBACK:
            known = ", ".join(["none", "all", *sorted(INTEGRATION_TO_CALLBACK)])
            raise UserError(f"train.report_to: unknown tracker {name!r}; choose from {known}")
        if name not in available:
            raise UserError(f"train.report_to: {name} is not installed here; install it, or set report_to: none")


def adapted_model(
    recipe: Recipe,
    base: str,
    compute_dtype: torch.dtype,
    labels: list[str] | None,
    pad_token_id: int,
    adapter_init: Path | None,
) -> tuple[peft.PeftModel, dict]:
    """The base loaded for training (NF4 or full precision) with the LoRA adapter (fresh, or LoftQ's initialisation),
    and the quantization layout the merge needs."""
    torch.manual_seed(recipe.train.seed)  # LoRA A is drawn at get_peft_model time
    net = model.load_base(
        dataclasses.replace(recipe.model, base=base), compute_dtype, recipe.model.quantization == "nf4", labels=labels
    )
    if labels:  # decoder classifiers read the prediction at the last non-pad token
        net.config.pad_token_id = pad_token_id
    # A KV cache is useless in training, and with one transformers cannot see packed example boundaries.
    net.config.use_cache = False
    layout = model.describe_quantization(net, compute_dtype)
    if recipe.model.quantization == "nf4":
        model.set_cpu_bf16_fastpath(net, False)
    # PEFT's prepare_model_for_kbit_training is not called: it upcasts every frozen unquantized parameter
    # (embeddings, lm_head, norms) to fp32, 3.9 GiB more for Llama-3.1-8B, and makes the residual stream and so every
    # checkpointed layer input fp32. Frozen weights keep the load dtype (the merge reads them in it either way, so the
    # merged model is the same); get_peft_model freezes them; checkpointing is switched on by the trainer.
    if recipe.train.tiled_mlp and not model.tile_mlps(net, model.mlp_tile_tokens(text_sizes(net)[2])):
        logger.warning("train.tiled_mlp: %s has no per-token MLP to tile", net.config.model_type)
    if recipe.model.frozen_dtype == "float32":
        for param in net.parameters():
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()
    if adapter_init:
        return peft.PeftModel.from_pretrained(net, adapter_init, is_trainable=True), layout
    return peft.get_peft_model(net, model.lora_config(recipe)), layout


def training_args(
    recipe: Recipe, out: Path, compute_dtype: torch.dtype, has_eval: bool, packing: bool = False
) -> TrainingArguments:
    """TRL's SFTConfig for causal LM (data arrives tokenized and masked, so TRL only truncates and packs), the
    transformers TrainingArguments for classification."""
    t = recipe.train
    if recipe.task != "causal_lm":
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
        optim=optimizer_name(t.optimizer, local_device()),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accumulation,
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        ddp_find_unused_parameters=False,  # every LoRA parameter is used in every step: no search for unused ones
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
        use_cpu=local_device() == "cpu",
    )


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


def keeps_packed_examples_apart(net: torch.nn.Module, vocab_size: int) -> bool:
    """Whether the model keeps packed examples apart (no attention or position leakage across them).

    TRL's padding-free packing hands the model one row with position_ids restarting at each example; transformers
    turns that into a block-diagonal mask only for models that build their mask from position_ids (and only without
    a KV cache). ALiBi models such as BLOOM, and any model that ignores position_ids, silently leak. So we measure it
    on the loaded model: the logits of example b must not change when the example packed before it changes, and must
    match b run alone.
    """
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
    # Fail loudly if a TRL release renames what we set, rather than silently running with its defaults.
    assert hasattr(trl_head, "TOKEN_CHUNK_SIZE") and hasattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE")
    trl_head.TOKEN_CHUNK_SIZE = chunk_tokens
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = min(vocab_size, HEAD_TILE_VOCAB)
    use_triton = trl_utils._use_triton
    if not getattr(use_triton, "qlora_pipe", False):
        trl_utils._use_triton = lambda device: device.type == "cpu" or use_triton(device)
        trl_utils._use_triton.qlora_pipe = True
        trl_utils._use_triton.original = use_triton


def accuracy(prediction) -> dict[str, float]:
    logits, labels = prediction
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}
