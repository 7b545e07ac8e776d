"""Eval stage: loss / perplexity on a data set, exact-match accuracy for label tasks, accuracy for classifiers.

Works on a training run (NF4 base + adapter), a merged model or any model directory. The examples are tokenized and
masked exactly as training does (data.check), so the loss is the eval loss training reports, and exact match compares
what the model generates after each example's prompt with the completion it was trained to produce.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DataCollatorWithPadding
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from qlora_pipe import UserError, data
from qlora_pipe.config import LABEL_TOKENS, DataConfig, Recipe
from qlora_pipe.model import load_for_inference, load_with_adapters, weight_files
from qlora_pipe.run import check_adapter_bases, recipe_behind

logger = logging.getLogger(__name__)


def eval_data_config(recipe: Recipe | None, data_file: str | None) -> tuple[DataConfig, str]:
    """The data to evaluate on: --data, else the run's eval split. Returned as the `train` split of a DataConfig."""
    if recipe is None and data_file is None:
        raise UserError("this model has no qlora-pipe manifest to take eval data from; pass --data FILE")
    cfg = recipe.data if recipe else DataConfig(train=data_file)
    if data_file:
        return dataclasses.replace(cfg, train=data_file, eval=None, eval_fraction=0.0, max_truncated=1.0), data_file
    if cfg.eval:
        return dataclasses.replace(cfg, train=cfg.eval, eval=None, eval_fraction=0.0, max_truncated=1.0), cfg.eval
    if cfg.eval_fraction <= 0:
        raise UserError("the run was trained without evaluation data; pass --data FILE")
    return dataclasses.replace(cfg, max_truncated=1.0), f"{cfg.train} (held-out {cfg.eval_fraction:.0%})"


def token_loss(net, tokenized, pad_id: int, batch_size: int) -> tuple[float, int]:
    """Mean cross-entropy over the trained tokens (labels != -100), summed over examples as the trainer does."""
    collate = DataCollatorForLanguageModeling(pad_token_id=pad_id)
    total, count = 0.0, 0
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in tokenized]
    logger.info("loss over %d examples", len(rows))
    for start in tqdm(range(0, len(rows), batch_size), desc="loss", leave=False):
        batch = {k: v.to(net.device) for k, v in collate(rows[start : start + batch_size]).items()}
        with torch.no_grad():
            logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="sum")
        total, count = total + losses.item(), count + int((labels != -100).sum())
    return total / max(count, 1), count


def last_answer(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """(prompt, answer): the tokens before the last trained span, and that span."""
    end = max(i for i, t in enumerate(labels) if t != -100) + 1
    start = end
    while start > 0 and labels[start - 1] != -100:
        start -= 1
    return ids[:start], ids[start:end]


def exact_match(net, tokenizer, tokenized) -> dict:
    """Greedy-generate each example's last answer after its prompt; compare the text with the reference."""
    pairs = [last_answer(r["input_ids"], r["labels"]) for r in tokenized if any(t != -100 for t in r["labels"])]
    if not pairs or max(len(a) for _, a in pairs) > LABEL_TOKENS:
        return {}
    eos = net.generation_config.eos_token_id
    stop = list({tokenizer.eos_token_id, *([eos] if isinstance(eos, int) else eos or [])} - {None})
    hits, wrong = 0, []
    net.eval()
    logger.info("exact match: generating %d answers", len(pairs))
    for prompt, answer in tqdm(pairs, desc="exact match", leave=False):
        with torch.no_grad():
            out = net.generate(
                input_ids=torch.tensor([prompt], device=net.device),
                attention_mask=None,
                max_new_tokens=len(answer) + 2,
                do_sample=False,
                eos_token_id=stop,
                pad_token_id=tokenizer.pad_token_id,
            )
        got = tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True).strip()
        want = tokenizer.decode(answer, skip_special_tokens=True).strip()
        hits += got == want
        if got != want and len(wrong) < 5:
            wrong.append({"expected": want, "generated": got})
    return {"exact_match": hits / len(pairs), "exact_match_examples": len(pairs), "mismatches": wrong}


def classifier_metrics(net, tokenized, tokenizer, batch_size: int) -> dict:
    collate = DataCollatorWithPadding(tokenizer)
    rows = [dict(r) for r in tokenized]
    total, hits = 0.0, 0
    for start in tqdm(range(0, len(rows), batch_size), desc="eval", leave=False):
        batch = {k: v.to(net.device) for k, v in collate(rows[start : start + batch_size]).items()}
        with torch.no_grad():
            logits = net(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        total += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
        hits += int((logits.argmax(-1) == batch["labels"]).sum())
    return {"loss": total / len(rows), "accuracy": hits / len(rows), "examples": len(rows)}


def is_classifier(config, recipe: Recipe | None) -> bool:
    if recipe is not None:
        return recipe.task == "seq_cls"
    return any(a.endswith("ForSequenceClassification") for a in config.architectures or [])


def evaluate_model(net, tokenizer, recipe: Recipe | None, cfg: DataConfig, batch_size: int = 8) -> dict:
    """Metrics of a loaded model on the `train` split of `cfg` (classification when the model is a classifier)."""
    net.eval()
    seed = recipe.train.seed if recipe else 42
    if is_classifier(net.config, recipe):
        prepared = data.load_classification(cfg, seed)
        checked = data.check_classification(prepared, tokenizer, cfg)
        return classifier_metrics(net, checked.tokenized[_split(cfg)], tokenizer, batch_size)
    data.prepare_tokenizer(tokenizer, cfg)
    prepared = data.load_data(cfg, tokenizer, seed)
    checked = data.check(prepared, tokenizer, cfg)
    tokenized = truncated(checked.tokenized[_split(cfg)], cfg.max_seq_length)
    loss, tokens = token_loss(net, tokenized, tokenizer.pad_token_id, batch_size)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50)),
        "examples": len(tokenized),
        "tokens": tokens,
        **exact_match(net, tokenizer, tokenized),
    }


def truncated(tokenized, max_seq_length: int):
    """The tokenized examples, one per row, cut to the `max_seq_length` tokens training reads of them."""
    return tokenized.map(lambda r: {k: r[k][:max_seq_length] for k in ("input_ids", "labels")})


def _split(cfg: DataConfig) -> str:
    """With --data or an eval file the examples are the `train` split of the eval config; else the held-out split."""
    return "eval" if cfg.eval is None and cfg.eval_fraction > 0 else "train"


def evaluate(path: str | Path, *, data_file: str | None = None, out: str | Path | None = None) -> dict:
    """Evaluate a run, a merged model or a model directory; return (and optionally write) the metrics."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such directory (give a run directory, a merged model or a model directory)")
    recipe = recipe_behind(path)
    cfg, source = eval_data_config(recipe, data_file)
    net, tokenizer, description = load_for_inference(path)
    metrics = {"model": description, "data": source, **evaluate_model(net, tokenizer, recipe, cfg)}
    if out:
        Path(out).write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    return metrics


def evaluate_adapters(
    path: str | Path, adapters: dict[str, Path], *, data_file: str | None = None, out: str | Path | None = None
) -> dict[str, dict]:
    """The base of `path` alone and with each adapter (the run's own included), on one data set, the base loaded
    once: {"base": metrics, name: metrics, ...}."""
    check_adapter_bases(Path(path), adapters, weight_files)
    recipe = recipe_behind(Path(path)) or next(filter(None, (recipe_behind(Path(d)) for d in adapters.values())), None)
    cfg, source = eval_data_config(recipe, data_file)
    net, tokenizer, names = load_with_adapters(path, adapters)
    with net.disable_adapter():
        results = {"base": {"data": source, **evaluate_model(net, tokenizer, recipe, cfg)}}
    for name in names:
        net.set_adapter(name)
        results[name] = {"data": source, **evaluate_model(net, tokenizer, recipe, cfg)}
    if out:
        Path(out).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return results
