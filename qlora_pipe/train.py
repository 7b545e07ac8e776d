"""Train stage: NF4 base → prepare_model_for_kbit_training → all-linear LoRA (PEFT) → TRL SFTTrainer → adapter.

Thin on purpose: transformers loads and quantizes, PEFT builds the adapter, TRL tokenizes, masks and trains. We map
the recipe onto their configs, check the inputs before the model is loaded, and record what the merge needs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import peft
import torch
from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments
from trl import SFTConfig, SFTTrainer

from qlora_pipe import UserError, data, loftq, model
from qlora_pipe.config import Recipe, recipe_to_dict
from qlora_pipe.manifest import MANIFEST, atomic_dir, fingerprint_weights, read_manifest, write_manifest

logger = logging.getLogger(__name__)

ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
TRAIN_LOG = "train_log.jsonl"
DATA_CHECK = "data_check.json"


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


def check_packing(net: torch.nn.Module, vocab_size: int) -> None:
    """Refuse packing where the model would attend or position across packed examples.

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
    if (after_a - after_c).abs().max().item() > 1e-3 * scale or (after_a - alone).abs().max().item() > 0.05 * scale:
        raise UserError(
            f"train.packing: this model ({net.config.model_type}) attends across packed examples (it does not take "
            f"example boundaries from position_ids); set train.packing: false"
        )


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


def training_args(recipe: Recipe, out: Path, compute_dtype: torch.dtype, has_eval: bool) -> TrainingArguments:
    """TRL's SFTConfig for causal LM (data arrives tokenized and masked, so TRL only truncates and packs), the
    transformers TrainingArguments for classification."""
    t = recipe.train
    if recipe.task == "seq_cls":
        cls, task_args = TrainingArguments, {}
    else:
        cls = SFTConfig
        task_args = {"packing": t.packing, "max_length": recipe.data.max_seq_length, "assistant_only_loss": False}
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
        optim=t.optimizer,
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
        report_to=t.report_to,
        bf16=compute_dtype == torch.bfloat16,
        fp16=compute_dtype == torch.float16,
        use_cpu=not torch.cuda.is_available(),
    )


def build_trainer(recipe: Recipe) -> tuple[SFTTrainer, dict]:
    """Everything up to `trainer.train()`: checks, tokenizer, data, NF4 model, LoRA, trainer. Returns the trainer and
    the facts the manifest records."""
    out = Path(recipe.output_dir)
    check_output_dir(out)
    base = model.check_base(recipe.model.base)
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
        # Checkpointing is switched on by the trainer (non-reentrant, so inputs need not require grads).
        base_model = peft.prepare_model_for_kbit_training(base_model, use_gradient_checkpointing=False)
    if adapter_init:
        peft_model = peft.PeftModel.from_pretrained(base_model, adapter_init, is_trainable=True)
    else:
        peft_model = peft.get_peft_model(base_model, lora_config(recipe))
    if recipe.train.packing:
        check_packing(peft_model, len(tokenizer))
    out.mkdir(parents=True, exist_ok=True)
    common = dict(
        model=peft_model,
        args=training_args(recipe, out, compute_dtype, "eval" in checked.tokenized),
        train_dataset=checked.tokenized["train"],
        eval_dataset=checked.tokenized.get("eval"),
        processing_class=tokenizer,
        callbacks=[LossLog(out / TRAIN_LOG)],
    )
    if recipe.task == "seq_cls":
        trainer = Trainer(**common, data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    else:
        trainer = SFTTrainer(**common)
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


def train(recipe: Recipe) -> Path:
    """Run the train stage; return the run directory (adapter/, manifest.json, checkpoints/, train_log.jsonl)."""
    out = Path(recipe.output_dir)
    trainer, facts = build_trainer(recipe)
    (out / TRAIN_LOG).unlink(missing_ok=True)
    start = time.monotonic()
    metrics = {}
    if trainer.eval_dataset is not None:
        metrics |= eval_metrics(trainer, "before", recipe.train.label_accuracy)
    result = trainer.train()
    if trainer.eval_dataset is not None:
        metrics |= eval_metrics(trainer, "after", recipe.train.label_accuracy)
    loss = result.training_loss
    if not math.isfinite(loss):
        raise UserError(f"training loss is {loss}; lower train.learning_rate or check the data")
    metrics |= {
        "train_loss_mean": loss,
        **_loss_summary(trainer.state.log_history),
        "steps": trainer.state.global_step,
        "train_seconds": round(time.monotonic() - start, 2),
    }
    if trainer.is_world_process_zero():
        with atomic_dir(out / ADAPTER) as tmp:
            trainer.model.save_pretrained(tmp)
            trainer.processing_class.save_pretrained(tmp)
        write_manifest(out, "train", recipe=recipe_to_dict(recipe), **facts, adapter=ADAPTER, metrics=metrics)
    logger.info("adapter written to %s", out / ADAPTER)
    return out


def load_run(run_dir: str | Path) -> tuple[dict, Path]:
    """The manifest of a finished training run and its adapter directory."""
    manifest = read_manifest(run_dir, "train")
    adapter = Path(run_dir) / manifest["adapter"]
    if not (adapter / "adapter_config.json").exists():
        raise UserError(f"{run_dir}: the adapter directory {adapter} is missing; re-run `qlora-pipe train`")
    return manifest, adapter
