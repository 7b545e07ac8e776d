"""Data stage: read the user's rows, detect their format and hand TRL one of its native shapes.

TRL's SFTTrainer tokenizes, applies the chat template, masks the loss to assistant/completion tokens and appends eos;
we only convert to the shapes it understands (`messages`, `prompt`/`completion`, `text`) and check what it cannot.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import datasets

from qlora_pipe import UserError
from qlora_pipe.config import DataConfig

logger = logging.getLogger(__name__)

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
FORMAT_COLUMNS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt-completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
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


def is_local(source: str) -> bool:
    """A path-like source (existing, or with a data-file suffix, or explicitly relative/absolute) is a local file."""
    return Path(source).exists() or Path(source).suffix in LOCAL_SUFFIXES or source.startswith((".", "/", "~"))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_json_rows(path: Path) -> list[dict]:
    """Parse JSON Lines ourselves so a broken row is reported with its file and line, not as a pyarrow trace."""
    text = path.read_text()
    if path.suffix == ".json" and text.lstrip().startswith(("[", "{")):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        rows = rows.get("data", rows) if isinstance(rows, dict) else rows
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(
                    f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object"
                ) from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{path}: expected JSON objects, one per example")
    return rows


def read_file(path: Path) -> datasets.Dataset:
    kind = LOCAL_SUFFIXES.get(path.suffix)
    if kind is None:
        raise UserError(f"{path}: unsupported data file type; use one of {', '.join(LOCAL_SUFFIXES)}")
    if kind == "json":
        return datasets.Dataset.from_list(_read_json_rows(path))
    return datasets.load_dataset(kind, data_files=str(path), split="train")


def read_rows(source: str) -> tuple[datasets.Dataset, dict]:
    """Load a local file, a directory of them, or a hub data set; return it with a record of where it came from."""
    if not is_local(source):
        return datasets.load_dataset(source, split="train"), {"hub": source}
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise UserError(f"{path}: a directory without data files ({', '.join(LOCAL_SUFFIXES)})")
    elif path.is_file():
        files = [path]
    else:
        raise UserError(f"data file not found: {source} (data.train / data.eval take a file path or a hub name)")
    parts = [read_file(f) for f in files]
    columns = {tuple(sorted(p.column_names)) for p in parts}
    if len(columns) > 1:
        raise UserError(f"{path}: its files have different columns ({'; '.join(', '.join(c) for c in columns)})")
    ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if len(ds) == 0:
        raise UserError(f"{path}: contains no examples")
    hashes = {str(f.resolve()): file_sha256(f) for f in files}
    return ds, {"path": str(path.resolve()), "sha256": hashes[str(files[0].resolve())] if path.is_file() else hashes,
                "rows": len(ds)}  # fmt: skip


def rename_columns(ds: datasets.Dataset, columns: dict[str, str] | None, source: str) -> datasets.Dataset:
    """data.columns: {format's name: the file's name}."""
    for ours, theirs in (columns or {}).items():
        if theirs not in ds.column_names:
            raise UserError(f"data.columns: {source} has no column {theirs!r} (to read as {ours!r}); "
                            f"its columns are {', '.join(ds.column_names)}")  # fmt: skip
        if ours != theirs:
            ds = ds.rename_column(theirs, ours)
    return ds


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "system": "system"}  # fmt: skip


def _sharegpt_to_messages(example: dict) -> dict:
    messages = []
    for turn in example["conversations"]:
        role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise UserError(f"sharegpt turn with unknown `from` {turn.get('from')!r}; expected one of "
                            f"{', '.join(SHAREGPT_ROLES)}")  # fmt: skip
        messages.append({"role": role, "content": turn["value"]})
    return {"messages": messages}


def detect_format(columns: list[str], requested: str, source: str) -> str:
    if requested != "auto":
        missing = [c for c in FORMAT_COLUMNS[requested] if c not in columns]
        if missing:
            raise UserError(
                f"{source}: data.format is {requested!r} but column(s) {', '.join(missing)} are missing "
                f"(found: {', '.join(columns)})"
            )
        return requested
    for fmt, needed in FORMAT_COLUMNS.items():
        if all(c in columns for c in needed):
            return fmt
    expected = "; ".join(f"{fmt}: {', '.join(cols)}" for fmt, cols in FORMAT_COLUMNS.items())
    raise UserError(f"{source}: cannot tell the data format from columns {', '.join(columns)}; expected {expected}")


def has_generation_markers(tokenizer) -> bool:
    """TRL's assistant-only loss needs a chat template that marks assistant text with {% generation %}."""
    return "{% generation %}" in (tokenizer.chat_template or "").replace("{%-", "{%").replace("-%}", "%}")


def _split_last_assistant(example: dict) -> dict:
    messages = example["messages"]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise UserError("a `messages` example has no assistant turn, so it has nothing to train on")
    return {"prompt": messages[:last], "completion": [messages[last]]}


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
                "the data is in `messages` format but the base tokenizer has no chat template; "
                "use data.format text or prompt-completion, or a base that ships a chat template"
            )
        keep = ["messages"]
        ds = ds.remove_columns([c for c in ds.column_names if c not in keep])
        if has_generation_markers(tokenizer):
            return ds, True
        # Without {% generation %} markers TRL cannot find assistant tokens in a whole conversation, but it can
        # mask a conversational prompt/completion pair: train on the last assistant turn only.
        logger.warning("chat template has no {%% generation %%} markers: training on the last assistant turn only")
        return ds.map(_split_last_assistant, remove_columns=keep), False
    if fmt == "alpaca":
        return ds.map(_alpaca_to_pc, fn_kwargs={"chat": chat}, remove_columns=ds.column_names), False
    keep = list(FORMAT_COLUMNS[fmt])
    return ds.remove_columns([c for c in ds.column_names if c not in keep]), False


def load_data(cfg: DataConfig, tokenizer, seed: int) -> PreparedData:
    """Read train (and eval) data, convert both to the same TRL shape, hold out an eval split if asked."""
    train, train_src = read_rows(cfg.train)
    train = rename_columns(train, cfg.columns, cfg.train)
    fmt = detect_format(train.column_names, cfg.format, cfg.train)
    train, assistant_only = to_trl(train, fmt, tokenizer)
    sources = {"train": train_src}
    if cfg.eval:
        evaluation, eval_src = read_rows(cfg.eval)
        evaluation = rename_columns(evaluation, cfg.columns, cfg.eval)
        evaluation, _ = to_trl(evaluation, detect_format(evaluation.column_names, fmt, cfg.eval), tokenizer)
        sources["eval"] = eval_src
    elif cfg.eval_fraction > 0 and len(train) >= 2:
        split = train.train_test_split(test_size=cfg.eval_fraction, seed=seed)
        train, evaluation = split["train"], split["test"]
        sources["eval"] = {"held_out_fraction": cfg.eval_fraction, "rows": len(evaluation)}
    else:
        evaluation = None
    return PreparedData(train, evaluation, fmt, assistant_only, sources)


def render(example: dict, tokenizer) -> str:
    """The full text of one TRL-shaped example, as the model sees it in training (for reports and generation)."""
    if "messages" in example:
        return tokenizer.apply_chat_template(example["messages"], tokenize=False)
    if "text" in example:
        return example["text"]
    if isinstance(example["prompt"], list):
        return tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=False)
    return example["prompt"] + example["completion"]
