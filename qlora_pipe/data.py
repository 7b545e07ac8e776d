"""Data stage: read the user's rows, detect their format and hand TRL one of its native shapes.

TRL's SFTTrainer tokenizes, applies the chat template, masks the loss to assistant/completion tokens and appends eos;
we only convert to the shapes it understands (`messages`, `prompt`/`completion`, `text`) and check what it cannot.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
from trl import SFTConfig, SFTTrainer

from qlora_pipe import UserError, masks
from qlora_pipe.config import DataConfig, Recipe
from qlora_pipe.model import load_tokenizer
from qlora_pipe.rows import (
    FORMAT_COLUMNS,
    LOCAL_SUFFIXES,
    SHAREGPT_ROLES,
    Rows,
    detect_format,
    is_local,
    read_file,
    read_hub,
    rename,
    validated,
)
from qlora_pipe.templates import CHAT_TEMPLATES

logger = logging.getLogger(__name__)

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


@dataclass
class PreparedData:
    """Data in a shape TRL's SFTTrainer consumes, plus what the manifest records about it."""

    train: datasets.Dataset
    eval: datasets.Dataset | None
    format: str
    assistant_only_loss: bool
    sources: dict
    labels: list[str] | None = None
    """Class names, index = class id (task seq_cls)."""
    mask_method: str | None = None
    """How assistant tokens are found (masks.MARKERS, TRL_TEMPLATE or PREFIXES), for an assistant-only loss."""

    def facts(self) -> dict:
        """What the manifest records: the format, the loss mask (and how it is found) and where the rows came from."""
        method = {"assistant_mask": self.mask_method} if self.assistant_only_loss else {}
        return {"format": self.format, "assistant_only_loss": self.assistant_only_loss, **method, **self.sources}

    def splits(self) -> dict[str, datasets.Dataset]:
        return {"train": self.train} | ({"eval": self.eval} if self.eval is not None else {})


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_source(source: str, key: str) -> Rows:
    """The rows of a local file, a directory of them, or a hub data set, with a record of where they came from."""
    if not is_local(source):
        return read_hub(source, key)
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise UserError(f"{path}: a directory without data files ({', '.join(LOCAL_SUFFIXES)})")
    elif path.is_file():
        files = [path]
    else:
        raise UserError(f"data file not found: {source} ({key} takes a file path or a hub name)")
    parts = [read_file(f) for f in files]
    rows = Rows(
        [row for part in parts for row in part.rows],
        [where for part in parts for where in part.where],
        {},
        [problem for part in parts for problem in part.problems],
        [note for part in parts for note in part.notes],
    )
    if not rows.rows and not rows.problems:
        raise UserError(f"{path}: contains no examples")
    hashes = {str(f.resolve()): file_sha256(f) for f in files}
    rows.source = {
        "path": str(path.resolve()),
        "sha256": hashes[str(files[0].resolve())] if path.is_file() else hashes,
        "rows": len(rows.rows) + len(rows.problems),
    }
    return rows


def read_split(cfg: DataConfig, source: str, key: str, fmt: str, render=None) -> tuple[list[dict], str, dict]:
    """One split's rows, renamed by data.columns, in format `fmt` (or the detected one), every row validated: the
    rows, their format and the record of their source (with rows skipped and notes on the encoding)."""
    rows = read_source(source, key)
    rename(rows, cfg.columns, source)
    fmt = detect_format(rows, fmt, source)
    good = validated(rows, fmt, cfg.skip_invalid_rows, key, render if fmt in ("messages", "sharegpt") else None)
    if "skipped_invalid_rows" in rows.source:
        logger.warning(
            "data.skip_invalid_rows: left out %d invalid rows of %s (first at %s)",
            rows.source["skipped_invalid_rows"],
            source,
            ", ".join(rows.source["skipped_at"]),
        )
    return good, fmt, rows.source | ({"notes": rows.notes} if rows.notes else {})


def _sharegpt_to_messages(example: dict) -> dict:
    messages = [{"role": SHAREGPT_ROLES[t["from"].lower()], "content": t["value"]} for t in example["conversations"]]
    return {"messages": messages}


# Pad tokens that exist, unused, in common families' vocabularies (Llama-3's reserved pad, Qwen's endoftext, ...).
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|endoftext|>")


def _single_token(tokenizer, token: str) -> bool:
    return token in tokenizer.get_vocab()


def prepare_tokenizer(tokenizer, cfg: DataConfig) -> None:
    """Install the recipe's chat template and choose eos and pad for training, in place.

    A built-in template's end-of-turn token becomes the eos, so TRL appends and trains it and generation stops on it.
    The pad token must differ from eos where the family has a spare token: TRL masks padding out of the labels, but a
    pad == eos tokenizer makes every later tool that masks by token id (or a collator without labels) untrain eos.
    """
    if cfg.chat_template != "auto":
        spec = CHAT_TEMPLATES[cfg.chat_template]
        needed = (*spec.required, spec.end_of_turn or tokenizer.eos_token)
        missing = [t for t in needed if not _single_token(tokenizer, t)]
        if missing:
            raise UserError(
                f"data.chat_template: {cfg.chat_template} needs the token(s) {', '.join(missing)}, which this "
                f"tokenizer does not have as single tokens; choose the template of this model's family, or `auto`"
            )
        tokenizer.chat_template = spec.template
        if spec.end_of_turn:
            tokenizer.eos_token = spec.end_of_turn
    elif tokenizer.chat_template:
        end = template_end_of_turn(tokenizer)
        if end and end != tokenizer.eos_token:
            # A chat model's template ends its turns with a token of its own (Gemma's <end_of_turn>, Phi-3's
            # <|end|>) where the tokenizer's eos is the pretraining <eos>: as with the built-in templates, the token
            # the model must learn to stop on becomes the eos, so training trains it and generation stops on it.
            logger.info(
                "chat template ends assistant turns with %r: using it as eos (was %r)", end, tokenizer.eos_token
            )
            tokenizer.eos_token = end
    if tokenizer.pad_token is not None and tokenizer.pad_token != tokenizer.eos_token:
        return
    spare = [tokenizer.unk_token, *PAD_CANDIDATES] if tokenizer.unk_token else list(PAD_CANDIDATES)
    pad = next((t for t in spare if t and t != tokenizer.eos_token and _single_token(tokenizer, t)), None)
    if pad is None:
        # GPT-2 style vocabularies have a single special token. TRL pads labels with -100, so eos is still trained;
        # check-data verifies that it is.
        logger.info(
            "no spare pad token in the vocabulary: padding with eos %r (padding is masked by label)",
            tokenizer.eos_token,
        )
        pad = tokenizer.eos_token
    tokenizer.pad_token = pad


def template_end_of_turn(tokenizer) -> str | None:
    """The added token the chat template ends an assistant turn with (`<|im_end|>`, `<end_of_turn>`, ...), or None
    (a template that refuses the probe conversations, or ends turns without a token of its own). It is read off a
    turn that a user turn follows: some templates close the last turn of a conversation otherwise (Phi-3.5 adds
    its pretraining eos, gpt-oss `<|return|>`)."""
    added = masks.added_tokens(tokenizer)
    for probe in masks.PROBES:
        try:
            text, spans = masks.assistant_spans(masks.renderer(tokenizer), probe, added)
        except Exception:  # noqa: BLE001 - a template may raise anything for a conversation it does not take
            continue
        start, end = spans[0]
        return next((t for t in added if text[start:end].endswith(t)), None)
    return None


def _alpaca_to_pc(example: dict, chat: bool) -> dict:
    instruction = example["instruction"]
    if example.get("input"):
        instruction = f"{instruction}\n\n{example['input']}"
    if chat:
        return {
            "prompt": [{"role": "user", "content": instruction}],
            "completion": [{"role": "assistant", "content": example["output"]}],
        }
    return {
        "prompt": f"{ALPACA_PROMPT}\n\n### Instruction:\n{instruction}\n\n### Response:\n",
        "completion": example["output"],
    }


def to_trl(ds: datasets.Dataset, fmt: str, tokenizer) -> tuple[datasets.Dataset, bool]:
    """Convert to a TRL shape; return it and whether TRL should mask the loss to assistant tokens."""
    chat = tokenizer.chat_template is not None
    if fmt == "sharegpt":
        ds = ds.map(_sharegpt_to_messages, remove_columns=ds.column_names)
        fmt = "messages"
    if fmt == "messages":
        if not chat:
            raise UserError(
                "the data is in `messages` format but the base tokenizer has no chat template; set "
                "data.chat_template to the built-in template of this model's family (chatml, llama-2, llama-3, "
                "mistral), or use data.format text or prompt-completion"
            )
        return ds.remove_columns([c for c in ds.column_names if c != "messages"]), True
    if fmt == "alpaca":
        # As a chat turn, the completion also holds the template's text after the answer (a newline); the assistant
        # mask, where TRL can build one, trims the loss to the answer and its end-of-turn token.
        pc = ds.map(_alpaca_to_pc, fn_kwargs={"chat": chat}, remove_columns=ds.column_names)
        return pc, chat and masks.method(tokenizer) != masks.PREFIXES
    keep = list(FORMAT_COLUMNS[fmt])
    return ds.remove_columns([c for c in ds.column_names if c not in keep]), False


def load_data(cfg: DataConfig, tokenizer, seed: int) -> PreparedData:
    """Read train (and eval) data, convert both to the same TRL shape, hold out an eval split if asked."""

    def chat_template(turns: list[dict]) -> None:
        tokenizer.apply_chat_template(turns, tokenize=False)

    render_check = chat_template if tokenizer.chat_template else None
    train, fmt, train_src = read_split(cfg, cfg.train, "data.train", cfg.format, render_check)
    train, assistant_only = to_trl(datasets.Dataset.from_list(train), fmt, tokenizer)

    def read_eval() -> tuple[datasets.Dataset, dict]:
        evaluation, eval_fmt, source = read_split(cfg, cfg.eval, "data.eval", fmt, render_check)
        return to_trl(datasets.Dataset.from_list(evaluation), eval_fmt, tokenizer)[0], source

    train, evaluation, sources = with_eval(cfg, train, train_src, seed, read_eval)
    method = masks.method(tokenizer) if assistant_only else None
    return PreparedData(train, evaluation, fmt, assistant_only, sources, mask_method=method)


def with_eval(cfg: DataConfig, train: datasets.Dataset, train_src: dict, seed: int, read_eval) -> tuple:
    """(train, eval or None, sources): data.eval read and converted like train, else a held-out share of train."""
    sources = {"train": train_src}
    if cfg.eval:
        evaluation, sources["eval"] = read_eval()
        return train, evaluation, sources
    if cfg.eval_fraction > 0 and len(train) >= 2:
        kept, held_out, duplicates = split_by_content(train, cfg.eval_fraction, seed)
        if held_out is not None:
            sources["eval"] = {"held_out_fraction": cfg.eval_fraction, "rows": len(held_out), "duplicates": duplicates}
            if duplicates:
                logger.info(
                    "held-out split by content: %d duplicate rows kept on one side with their copies", duplicates
                )
            return kept, held_out, sources
    return train, None, sources


def split_by_content(ds: datasets.Dataset, fraction: float, seed: int) -> tuple:
    """(train, held out or None, duplicate rows): a held-out share of the distinct examples, drawn with `seed`, every
    copy of an example on the side of its first one, so that the eval split never holds a training example
    (datasets' train_test_split draws rows, and duplicates land on both sides). None when there are too few distinct
    examples to hold one out."""
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(ds):
        groups.setdefault(json.dumps(row, sort_keys=True), []).append(i)
    distinct = list(groups.values())
    if len(distinct) < 2:
        return ds, None, len(ds) - len(distinct)
    order = np.random.default_rng(seed).permutation(len(distinct))
    held = max(1, min(len(distinct) - 1, math.ceil(fraction * len(distinct))))
    eval_rows = sorted(i for g in order[:held] for i in distinct[g])
    train_rows = sorted(i for g in order[held:] for i in distinct[g])
    return ds.select(train_rows), ds.select(eval_rows), len(ds) - len(distinct)


def render(example: dict, tokenizer) -> str:
    """The full text of one TRL-shaped example, as the model sees it in training (for reports and generation)."""
    if "messages" in example:
        return tokenizer.apply_chat_template(example["messages"], tokenize=False)
    if "text" in example:
        return example["text"]
    if isinstance(example["prompt"], list):
        return tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=False)
    return example["prompt"] + example["completion"]


# ---- tokenization and the data check ----------------------------------------------------------------------------

TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"


def has_assistant_turn(example: dict) -> bool:
    return "messages" not in example or any(m["role"] == "assistant" for m in example["messages"])


def tokenize(ds: datasets.Dataset, tokenizer, assistant_only_loss: bool, name: str) -> datasets.Dataset:
    """`input_ids` and `labels` (-100 where no loss), built by TRL's own preparation code, not truncated.

    We call SFTTrainer's dataset preparation directly (it needs only the tokenizer, the chat template TRL would swap
    in and the loss mode, not a model) so that check-data sees exactly the tokens and mask training uses, and so that
    training is handed this same tokenized data instead of tokenizing twice. Conversations whose template TRL cannot
    mask arrive tokenized, with masks.py's assistant masks, and TRL only turns the masks into labels.
    """
    method = masks.method(tokenizer) if assistant_only_loss else None
    if method == masks.PREFIXES and "messages" in ds.column_names:
        ds = datasets.Dataset.from_dict(masks.tokenize_conversations(list(ds["messages"]), tokenizer, name))
    state = SimpleNamespace(
        _tokenizer=tokenizer,
        chat_template=masks.trl_training_template(tokenizer) if method == masks.TRL_TEMPLATE else None,
        completion_only_loss=True,  # applies only where a completion_mask exists (prompt-completion data)
    )
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # SFTConfig's own defaults use renamed transformers fields
        args = SFTConfig(
            output_dir=tmp,
            max_length=None,
            assistant_only_loss=assistant_only_loss,
            shuffle_dataset=False,
            report_to="none",
            use_cpu=True,
        )
        return SFTTrainer._prepare_dataset(state, ds, tokenizer, args, False, None, name)


def _unclosed_run_end(labels: list[int], eos_id: int, is_whitespace) -> int | None:
    """None when every run of trained tokens ends with eos (or eos then whitespace tokens, for templates that put a
    newline after the end-of-turn token inside the completion); else the token the first other run ends with."""
    run_end = [i for i, t in enumerate(labels) if t != -100 and (i + 1 == len(labels) or labels[i + 1] == -100)]
    for end in run_end:
        i = end
        while i >= 0 and labels[i] != -100 and labels[i] != eos_id and is_whitespace(labels[i]):
            i -= 1
        if i < 0 or labels[i] != eos_id:
            return labels[i] if i >= 0 and labels[i] != -100 else labels[end]
    return None


def _whitespace_test(tokenizer):
    special, cache = set(tokenizer.all_special_ids), {}

    def is_whitespace(token_id: int) -> bool:
        if token_id not in cache:
            cache[token_id] = token_id not in special and not tokenizer.decode([token_id]).strip()
        return cache[token_id]

    return is_whitespace


def marked_text(ids: list[int], labels: list[int], tokenizer) -> str:
    """Decode one example with its trained tokens between ⟦ and ⟧."""
    parts, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != -100) != (labels[start] != -100):
            text = tokenizer.decode(ids[start:i])
            parts.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if labels[start] != -100 else text)
            start = i
    return "".join(parts)


def length_summary(lengths: list[int]) -> dict[str, int]:
    """Token-length percentiles and maximum of a split."""
    lengths = np.array(lengths or [0])
    return {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)} | {"max": int(lengths.max())}


def check_split(
    examples: int, tokenized: datasets.Dataset, kept: list[int], skipped: list[int], tokenizer, max_len: int
) -> dict:
    """Counts, length percentiles and the problems of one split: `tokenized` holds rows `kept` of its `examples`;
    `skipped` are the rows with no assistant turn."""
    eos_id, is_whitespace = tokenizer.eos_token_id, _whitespace_test(tokenizer)
    all_labels = tokenized["labels"] if "labels" in tokenized.column_names else []
    empty, eos_missing, cut, over, ends = list(skipped), [], [], 0, {}
    for row, labels in zip(kept, all_labels, strict=True):
        if all(t == -100 for t in labels):
            empty.append(row)
            continue
        end = _unclosed_run_end(labels, eos_id, is_whitespace)
        if end is not None:
            eos_missing.append(row)
            ends[end] = ends.get(end, 0) + 1
        if len(labels) > max_len:
            over += 1
            if any(t != -100 for t in labels[max_len:]):
                cut.append(row)
    sample = next((i for i, labels in enumerate(all_labels) if any(t != -100 for t in labels)), None)
    return {
        "examples": examples,
        "tokens": length_summary([len(labels) for labels in all_labels]),
        "longer_than_max_seq_length": over,
        "trained_tokens_cut": len(cut),
        "empty_loss_mask": len(empty),
        "eos_not_trained": len(eos_missing),
        "trained_spans_end_with": {tokenizer.convert_ids_to_tokens(t): n for t, n in ends.items()},
        "first_rows": {
            "empty_loss_mask": sorted(empty)[:5],
            "eos_not_trained": eos_missing[:5],
            "trained_tokens_cut": cut[:5],
        },
        "example": marked_text(tokenized[sample]["input_ids"], tokenized[sample]["labels"], tokenizer)
        if sample is not None
        else None,
    }


def fatal_problems(name: str, report: dict, cfg: DataConfig, tokenizer) -> list[str]:
    """The problems that make training pointless or harmful, each with the fix."""
    n, rows = report["examples"], report["first_rows"]
    problems = []
    if report["empty_loss_mask"]:
        problems.append(
            f"{name}: {report['empty_loss_mask']} of {n} examples have no trained token (rows "
            f"{rows['empty_loss_mask']}): a chat without an assistant turn, or a template whose assistant part is "
            f"not marked; fix or drop those rows"
        )
    if report["eos_not_trained"]:
        instead = ", ".join(repr(t) for t in report["trained_spans_end_with"])
        problems.append(
            f"{name}: in {report['eos_not_trained']} of {n} examples (rows {rows['eos_not_trained']}) a trained "
            f"span ends with {instead}, not with the eos token {tokenizer.eos_token!r}, so the model would not "
            f"learn to stop; set data.chat_template to the built-in template of this model's family (chatml, "
            f"llama-2, llama-3, mistral), which makes its end-of-turn token the eos"
        )
    empty_share = report.get("empty_replies", 0) / max(n, 1)
    if empty_share > cfg.max_empty_replies:
        problems.append(
            f"{name}: {report['empty_replies']} of {n} examples have an empty reply (rows "
            f"{report['content_rows']['empty_replies']}), which would teach the model to answer nothing; fill or drop "
            f"them, or raise data.max_empty_replies"
        )
    share = report["trained_tokens_cut"] / max(n, 1)
    if share > cfg.max_truncated:
        problems.append(
            f"{name}: {report['trained_tokens_cut']} of {n} examples ({share:.0%}) lose trained tokens to "
            f"data.max_seq_length={cfg.max_seq_length} (p99 length {report['tokens']['p99']}, max "
            f"{report['tokens']['max']}); raise data.max_seq_length or data.max_truncated"
        )
    return problems


@dataclass
class CheckedData:
    """Tokenized splits ready for the trainer, the check report, and the fatal problems found."""

    tokenized: dict[str, datasets.Dataset]
    report: dict
    fatal: list[str]


def check(prepared: PreparedData, tokenizer, cfg: DataConfig, checks: bool = True) -> CheckedData:
    """Tokenize every split as TRL does and check it: what `qlora-pipe check-data` prints and `train` enforces.
    Without `checks`, only tokenize (the ranks other than the one that checks)."""
    tokenized, report, fatal = {}, {}, []
    for name, ds in prepared.splits().items():
        has_turn = [has_assistant_turn(ex) for ex in ds]
        kept = [i for i, ok in enumerate(has_turn) if ok]
        skipped = [i for i, ok in enumerate(has_turn) if not ok]
        usable = ds.select(kept) if skipped else ds
        tokenized[name] = tokenize(usable, tokenizer, prepared.assistant_only_loss, name) if len(usable) else usable
        if not checks:
            continue
        report[name] = check_split(len(ds), tokenized[name], kept, skipped, tokenizer, cfg.max_seq_length)
        report[name] |= content(ds, tokenizer, cfg.max_seq_length)
        fatal += fatal_problems(name, report[name], cfg, tokenizer)
    fatal += check_repeats(prepared, report) if checks else []
    return CheckedData(tokenized, report, fatal)


# ---- content: what the rows say, beyond their shape ------------------------------------------------------------

# Eval examples that are also training examples measure memory, not learning: above this share of the eval split
# training refuses to start (below it they are reported).
MAX_LEAKED_SHARE = 0.02


def _as_turns(example: dict) -> list[dict]:
    """An example as turns: chat rows as they are, plain prompt/completion/text rows as one user and one assistant
    turn."""
    if "messages" in example:
        return example["messages"]
    if "text" in example:
        return [{"role": "assistant", "content": example["text"]}]
    if isinstance(example["prompt"], list):
        return example["prompt"] + example["completion"]
    return [{"role": "user", "content": example["prompt"]}, {"role": "assistant", "content": example["completion"]}]


def content(ds: datasets.Dataset, tokenizer, max_len: int) -> dict:
    """Per split: examples with an empty reply, conversations without a user turn, and examples with a single turn
    longer than max_seq_length (no truncation can make those useful)."""
    empty, no_user, long_turns = [], [], []
    for i, example in enumerate(ds):
        turns = _as_turns(example)
        if any(t["role"] == "assistant" and not (t["content"] or "").strip() for t in turns):
            empty.append(i)
        if "messages" in example and not any(t["role"] == "user" for t in turns):
            no_user.append(i)
        # a turn has at most one token per UTF-8 byte (plus the special tokens the tokenizer adds): only longer ones
        # can be over the limit, so only those are tokenized
        candidates = [t["content"] for t in turns if len((t["content"] or "").encode()) + 2 > max_len]
        if candidates and max(len(ids) for ids in tokenizer(candidates)["input_ids"]) > max_len:
            long_turns.append(i)
    return {
        "empty_replies": len(empty),
        "no_user_turn": len(no_user),
        "turns_longer_than_max_seq_length": len(long_turns),
        "content_rows": {"empty_replies": empty[:5], "no_user_turn": no_user[:5], "long_turns": long_turns[:5]},
    }


def check_repeats(prepared: PreparedData, report: dict) -> list[str]:
    """Exact duplicates within each split, and eval examples that are also in the training data: counted in the
    report, leakage fatal above MAX_LEAKED_SHARE."""
    keys = {name: [json.dumps(row, sort_keys=True) for row in ds] for name, ds in prepared.splits().items()}
    for name, split in keys.items():
        report[name]["duplicates"] = len(split) - len(set(split))
    if prepared.eval is None:
        return []
    train = set(keys["train"])
    leaked = sum(key in train for key in keys["eval"])
    report["eval"]["also_in_train"] = leaked
    share = leaked / max(len(prepared.eval), 1)
    if share <= MAX_LEAKED_SHARE:
        return []
    return [
        f"eval: {leaked} of {len(prepared.eval)} examples ({share:.0%}) are also training examples, so the eval loss "
        f"would measure memory: remove those examples from data.eval (or from data.train), or leave data.eval out "
        f"and let data.eval_fraction hold out a share of the training data, split by content so copies stay together"
    ]


# ---- sequence classification (task: seq_cls) ---------------------------------------------------------------------


def label_names(values: list, source: str) -> list[str]:
    """Class names by id: integer labels 0..n-1 keep their ids; string labels are numbered in sorted order."""
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        if min(values) < 0:
            raise UserError(f"{source}: integer labels must be 0 or more, found {min(values)}")
        return [str(i) for i in range(max(values) + 1)]
    if all(isinstance(v, str) for v in values):
        return sorted(set(values))
    raise UserError(f"{source}: the label column must hold all integers or all strings")


def _label_ids(rows: list[dict], labels: list[str], source: str) -> datasets.Dataset:
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted({str(row["label"]) for row in rows} - set(index))
    if unknown:
        raise UserError(
            f"{source}: labels {', '.join(unknown[:5])} do not occur in the training data ({', '.join(labels)})"
        )
    return datasets.Dataset.from_list([{"text": row["text"], "label": index[str(row["label"])]} for row in rows])


def load_classification(cfg: DataConfig, seed: int) -> PreparedData:
    """text/label rows for task seq_cls; labels become ids 0..n-1 over the training data's classes."""
    train, _, train_src = read_split(cfg, cfg.train, "data.train", "classification")
    labels = label_names([row["label"] for row in train], cfg.train)
    if len({row["label"] for row in train}) < 2:
        raise UserError(f"{cfg.train}: every example has the same label; a classifier needs at least two classes")

    def read_eval() -> tuple[datasets.Dataset, dict]:
        evaluation, _, source = read_split(cfg, cfg.eval, "data.eval", "classification")
        return _label_ids(evaluation, labels, cfg.eval), source

    train, evaluation, sources = with_eval(cfg, _label_ids(train, labels, cfg.train), train_src, seed, read_eval)
    return PreparedData(train, evaluation, "classification", False, sources, labels)


def check_classification(prepared: PreparedData, tokenizer, cfg: DataConfig) -> CheckedData:
    """Token lengths, inputs cut by max_seq_length and class balance; the splits tokenized (truncated) for training."""
    tokenized, report, fatal = {}, {}, []
    for name, ds in prepared.splits().items():
        lengths = [len(ids) for ids in tokenizer(list(ds["text"]))["input_ids"]]
        over = sum(n > cfg.max_seq_length for n in lengths)
        counts = {
            prepared.labels[i]: int(n) for i, n in zip(*np.unique(list(ds["label"]), return_counts=True), strict=True)
        }
        report[name] = {
            "examples": len(ds),
            "tokens": length_summary(lengths),
            "longer_than_max_seq_length": over,
            "trained_tokens_cut": over,  # every input token feeds the prediction
            "empty_loss_mask": 0,
            "eos_not_trained": 0,
            "labels": counts,
            "example": f"{ds[0]['text']} {TRAINED_OPEN}{prepared.labels[ds[0]['label']]}{TRAINED_CLOSE}",
        }
        if over / max(len(ds), 1) > cfg.max_truncated:
            fatal.append(
                f"{name}: {over} of {len(ds)} examples ({over / len(ds):.0%}) are cut by "
                f"data.max_seq_length={cfg.max_seq_length} (max length {max(lengths, default=0)}); "
                "raise data.max_seq_length or data.max_truncated"
            )
        tokenized[name] = ds.map(
            lambda batch: tokenizer(batch["text"], truncation=True, max_length=cfg.max_seq_length),
            batched=True,
            remove_columns=["text"],
        )
    fatal += check_repeats(prepared, report)
    return CheckedData(tokenized, report, fatal)


# ---- the data check, as `qlora-pipe check-data` reports it and `train` enforces it ------------------------------


def prepare_data(recipe: Recipe, base: str, *, checks: bool = True) -> tuple[object, PreparedData, CheckedData]:
    """Tokenizer (with the recipe's chat template, eos and pad), data, and the data check (unless `checks` is off),
    before any model is loaded."""
    tokenizer = load_tokenizer(base, recipe.model.trust_remote_code)
    prepare_tokenizer(tokenizer, recipe.data)
    if recipe.task == "seq_cls":
        prepared = load_classification(recipe.data, recipe.train.seed)
        return tokenizer, prepared, check_classification(prepared, tokenizer, recipe.data)
    prepared = load_data(recipe.data, tokenizer, recipe.train.seed)
    return tokenizer, prepared, check(prepared, tokenizer, recipe.data, checks)


def refusal(checked: CheckedData) -> str:
    problems = "\n  ".join(checked.fatal)
    return f"the data check failed (`qlora-pipe check-data RECIPE` prints the full report):\n  {problems}"
