"""Reading the user's rows and validating each against its format, before any library sees them.

Data exported from spreadsheets, scrapers and other tools is messy: a null completion, a row in another format, a
number where text belongs, a line that is not UTF-8. datasets, pyarrow and TRL answer those with tracebacks from deep
inside; here every row is checked first, and a problem is reported with where it is (file:line for JSON Lines, the row
number for JSON arrays, CSV, Parquet and hub data), the key, and what was expected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from qlora_pipe import UserError

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
FORMAT_COLUMNS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt-completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
    "classification": ("text", "label"),
}
OPTIONAL_COLUMNS = {"alpaca": ("input",)}
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "system": "system",
}
SHOWN_PROBLEMS = 5


@dataclass
class Rows:
    """The rows of one source, each with where it is, and what reading them found."""

    rows: list[dict]
    where: list[str]
    """Per row: file:line, or file/hub id and row number."""
    source: dict
    """What the manifest records: path and sha256, or the hub id; the row count."""
    problems: list[tuple[str, str]] = field(default_factory=list)
    """(where, what) of rows that could not be read at all (not JSON, not UTF-8, not an object)."""
    notes: list[str] = field(default_factory=list)
    """Harmless facts worth knowing (a byte-order mark, CRLF line endings)."""


def is_local(source: str) -> bool:
    """A path-like source (existing, or with a data-file suffix, or explicitly relative/absolute) is a local file."""
    return Path(source).exists() or Path(source).suffix in LOCAL_SUFFIXES or source.startswith((".", "/", "~"))


def check_hub_id(value: str, key: str, what: str) -> None:
    """A source that is no local path must be a valid hub id: else one line saying neither."""
    try:
        validate_repo_id(value)
    except HFValidationError:
        raise UserError(
            f"{key}: {value!r} is neither an existing {what} nor a valid hub id (name or owner/name)"
        ) from None


def _decode_lines(path: Path, data: bytes) -> tuple[list[tuple[int, str | None, str]], list[str]]:
    """(line number, text or None where the line is not UTF-8, where the first bad byte is) for every line, and
    notes on the encoding."""
    notes = []
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
        notes.append(f"{path.name} starts with a UTF-8 byte-order mark (ignored)")
    if b"\r\n" in data:
        notes.append(f"{path.name} has Windows (CRLF) line endings (read as plain newlines)")
    lines = []
    for number, raw in enumerate(data.splitlines(), 1):
        try:
            lines.append((number, raw.decode("utf-8"), ""))
        except UnicodeDecodeError as e:
            lines.append((number, None, f"byte 0x{raw[e.start]:02x} at column {e.start + 1}"))
    return lines, notes


def read_jsonl(path: Path) -> Rows:
    lines, notes = _decode_lines(path, path.read_bytes())
    out = Rows([], [], {}, notes=notes)
    for number, text, bad_byte in lines:
        where = f"{path}:{number}"
        if text is None:
            out.problems.append((where, f"not valid UTF-8 ({bad_byte}); re-save the file as UTF-8"))
        elif text.strip():
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                out.problems.append((where, f"not valid JSON ({e.msg}); each line must be one JSON object"))
                continue
            if isinstance(row, dict):
                out.rows.append(row)
                out.where.append(where)
            else:
                out.problems.append((where, f"expected a JSON object, got {describe(row)}"))
    return out


def read_json_array(path: Path) -> Rows:
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        parsed = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8; re-save the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    parsed = parsed.get("data", parsed) if isinstance(parsed, dict) else parsed
    if not isinstance(parsed, list):
        raise UserError(f"{path}: expected a list of JSON objects (one per example), got {describe(parsed)}")
    out = Rows([], [], {})
    for i, row in enumerate(parsed, 1):
        if isinstance(row, dict):
            out.rows.append(row)
            out.where.append(f"{path}: item {i}")
        else:
            out.problems.append((f"{path}: item {i}", f"expected a JSON object, got {describe(row)}"))
    return out


def read_table(path: Path, kind: str) -> Rows:
    """CSV or Parquet through datasets (typed columns); a file it cannot parse is one error naming the file."""
    notes = []
    if kind == "csv":
        lines, notes = _decode_lines(path, path.read_bytes())
        bad = [(number, bad_byte) for number, text, bad_byte in lines if text is None]
        if bad:  # a CSV's rows are parsed by pandas, whole: the file must be fixed first
            raise UserError(
                f"{path}:{bad[0][0]}: not valid UTF-8 ({bad[0][1]}; {len(bad)} such lines); re-save the file as UTF-8"
            )
    try:
        table = datasets.Dataset.from_csv(str(path)) if kind == "csv" else datasets.Dataset.from_parquet(str(path))
    except Exception as e:  # pyarrow and pandas raise many types for a malformed file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: cannot be read as {kind.upper()}: {first}") from None
    return Rows(table.to_list(), [f"{path}: row {i}" for i in range(1, len(table) + 1)], {}, notes=notes)


def read_file(path: Path) -> Rows:
    kind = LOCAL_SUFFIXES.get(path.suffix)
    if kind is None:
        raise UserError(f"{path}: unsupported data file type; use one of {', '.join(LOCAL_SUFFIXES)}")
    if kind == "json":
        text_start = path.read_bytes()[:64].removeprefix(b"\xef\xbb\xbf").lstrip()
        if path.suffix == ".json" and text_start.startswith((b"[", b"{")) and not _is_jsonl(path):
            return read_json_array(path)
        return read_jsonl(path)
    return read_table(path, kind)


def _is_jsonl(path: Path) -> bool:
    """A .json file holding one object per line (a common export) rather than one JSON document."""
    lines = [line for line in path.read_bytes().removeprefix(b"\xef\xbb\xbf").splitlines() if line.strip()]
    if len(lines) < 2:
        return False
    try:
        return all(isinstance(json.loads(line), dict) for line in lines[:2])
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def hub_table(name: str, key: str, local: str = "file") -> datasets.Dataset:
    """The train split of hub data set `name` (from the local cache when offline); a user error naming `key` and the
    `local` alternative when it cannot be loaded."""
    check_hub_id(name, key, local)
    try:
        return datasets.load_dataset(name, split="train")
    except (OSError, ConnectionError) as e:  # offline, not in the local cache, no such data set
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{key}: the hub data set {name} cannot be loaded ({first}); without network it must be in the local "
            f"cache: download it first, or give a local {local}"
        ) from None


def read_hub(name: str, key: str) -> Rows:
    table = hub_table(name, key)
    return Rows(table.to_list(), [f"{name}: row {i}" for i in range(1, len(table) + 1)], {"hub": name})


def describe(value: Any) -> str:
    """How a wrong value is named in a message: its JSON kind, with a short preview."""
    kinds = {
        type(None): "null",
        bool: "true/false",
        int: "a number",
        float: "a number",
        str: "text",
        list: "a list",
        dict: "an object",
    }
    kind = next((name for tp, name in kinds.items() if isinstance(value, tp)), type(value).__name__)
    return kind if value is None or isinstance(value, list | dict) else f"{kind} {json.dumps(value)[:40]}"


# ---- the format of each row ---------------------------------------------------------------------------------------


def row_format(row: dict) -> str | None:
    """The first format whose columns the row has."""
    return next((fmt for fmt, columns in FORMAT_COLUMNS.items() if all(c in row for c in columns)), None)


def rename(rows: Rows, columns: dict[str, str] | None, source: str) -> None:
    """data.columns: {format's name: the name in the user's files}, applied to every row in place."""
    for ours, theirs in (columns or {}).items():
        if rows.rows and not any(theirs in row for row in rows.rows):
            found = list(dict.fromkeys(k for row in rows.rows[:1000] for k in row))
            raise UserError(
                f"data.columns: {source} has no column {theirs!r} (to read as {ours!r}); its columns are "
                f"{', '.join(found)}"
            )
        for row in rows.rows:
            if theirs in row and ours != theirs:
                row[ours] = row.pop(theirs)


def detect_format(rows: Rows, requested: str, source: str) -> str:
    """The data format: the requested one (some row must have its columns), or for `auto` the format most rows
    have (rows in another format are then reported one by one)."""
    found = list(dict.fromkeys(k for row in rows.rows[:1000] for k in row))
    if requested != "auto":
        if rows.rows and not any(row_format(row) == requested or _has(row, requested) for row in rows.rows):
            missing = [c for c in FORMAT_COLUMNS[requested] if c not in found]
            raise UserError(
                f"{source}: data.format is {requested!r} but column(s) {', '.join(missing)} are missing "
                f"(found: {', '.join(found)})"
            )
        return requested
    votes: dict[str, int] = {}
    for row in rows.rows:
        fmt = row_format(row)
        if fmt:
            votes[fmt] = votes.get(fmt, 0) + 1
    if votes:
        return max(votes, key=lambda fmt: (votes[fmt], -list(FORMAT_COLUMNS).index(fmt)))
    expected = "; ".join(f"{fmt}: {', '.join(cols)}" for fmt, cols in FORMAT_COLUMNS.items())
    raise UserError(
        f"{source}: cannot tell the data format from columns {', '.join(found)}; expected {expected}; or map your "
        "columns with data.columns, e.g. {prompt: question, completion: answer}"
    )


def _has(row: dict, fmt: str) -> bool:
    return all(c in row for c in FORMAT_COLUMNS[fmt])


# ---- validation -----------------------------------------------------------------------------------------------


def _text(row: dict, key: str, problems: list[str], optional: bool = False) -> None:
    if key not in row:
        if not optional:
            problems.append(f"{key}: missing")
    elif not isinstance(row[key], str) and not (optional and row[key] is None):
        problems.append(f"{key}: expected text, got {describe(row[key])}")


def _turns(turns: Any, key: str, role_key: str, content_key: str, roles, problems: list[str]) -> None:
    """A non-empty list of {role, content} objects with known roles, text content and system turns first."""
    if not isinstance(turns, list) or not turns:
        problems.append(f"{key}: expected a non-empty list of turns, got {describe(turns)}")
        return
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            problems.append(f"{key}[{i}]: expected an object with {role_key} and {content_key}, got {describe(turn)}")
            continue
        role = turn.get(role_key)
        if not isinstance(role, str) or role.lower() not in roles:
            got = f"unknown `{role_key}` {role!r}" if isinstance(role, str) else f"got {describe(role)}"
            problems.append(f"{key}[{i}].{role_key}: {got}; expected one of {', '.join(roles)}")
        elif roles[role.lower()] == "system" and i > 0:
            problems.append(f"{key}[{i}]: a system turn after the first turn; chat templates expect it first")
        if not isinstance(turn.get(content_key), str):
            problems.append(f"{key}[{i}].{content_key}: expected text, got {describe(turn.get(content_key))}")


def row_problems(row: dict, fmt: str) -> list[str]:
    """What is wrong with one row of format `fmt` (empty when nothing is)."""
    other = row_format(row)
    if not _has(row, fmt) and other is not None and not set(FORMAT_COLUMNS[other]) <= set(FORMAT_COLUMNS[fmt]):
        return [f"a {other} row (keys {', '.join(sorted(row))}) in a {fmt} file"]
    problems: list[str] = []
    if fmt == "messages":
        _turns(row.get("messages"), "messages", "role", "content", {r: r for r in ROLES}, problems)
    elif fmt == "sharegpt":
        _turns(row.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES, problems)
    elif fmt == "prompt-completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) != isinstance(completion, list):
            got = f"{describe(prompt)} and {describe(completion)}"
            problems.append(f"prompt and completion: expected both text or both lists of turns, got {got}")
        elif isinstance(prompt, list):
            _turns(row.get("prompt"), "prompt", "role", "content", {r: r for r in ROLES}, problems)
            _turns(row.get("completion"), "completion", "role", "content", {r: r for r in ROLES}, problems)
        else:
            _text(row, "prompt", problems)
            _text(row, "completion", problems)
    elif fmt == "alpaca":
        for key in ("instruction", "output"):
            _text(row, key, problems)
        _text(row, "input", problems, optional=True)
    else:
        _text(row, "text", problems)
        label = row.get("label")
        if fmt == "classification" and (isinstance(label, bool) or not isinstance(label, int | str)):
            problems.append(f"label: expected a class name or number, got {describe(label)}")
    return problems


def normalized(row: dict, fmt: str) -> dict:
    """The row with only its format's columns (turns with only their role and content), so that the data set's
    schema is the same for every row whatever else the file carries."""
    if fmt == "messages":
        return {"messages": [{"role": t["role"], "content": t["content"]} for t in row["messages"]]}
    if fmt == "sharegpt":
        return {"conversations": [{"from": t["from"], "value": t["value"]} for t in row["conversations"]]}
    if fmt == "prompt-completion" and isinstance(row["prompt"], list):
        return {k: [{"role": t["role"], "content": t["content"]} for t in row[k]] for k in ("prompt", "completion")}
    keys = FORMAT_COLUMNS[fmt] + OPTIONAL_COLUMNS.get(fmt, ())
    return {k: row.get(k) for k in keys}


def validated(rows: Rows, fmt: str, skip_invalid: bool, key: str, render=None) -> list[dict]:
    """The rows of format `fmt`, every row checked first and normalized. Invalid rows are an error listing where and
    what (the first few, and how many more), or with data.skip_invalid_rows dropped and counted in the source record.
    `render`, for chat formats: a function that raises when the chat template refuses a conversation."""
    good, problems = [], list(rows.problems)
    conversational = _mostly_conversational(rows.rows) if fmt == "prompt-completion" else None
    for row, where in zip(rows.rows, rows.where, strict=True):
        found = row_problems(row, fmt)
        if not found and conversational is not None and isinstance(row["prompt"], list) != conversational:
            kind = "lists of turns" if conversational else "text"
            found = [f"prompt and completion: expected {kind}, as in the file's other rows"]
        if not found and render is not None:
            found = _render_problem(render, row, fmt)
        if found:
            problems.append((where, "; ".join(found)))
        else:
            good.append(normalized(row, fmt))
    total = len(rows.rows) + len(rows.problems)
    problems.sort(key=lambda problem: _position(problem[0]))
    if problems and not skip_invalid:
        raise UserError(invalid_rows_message(key, problems, total, fmt))
    if problems:
        rows.source["skipped_invalid_rows"] = len(problems)
        rows.source["skipped_at"] = [where for where, _ in problems[:SHOWN_PROBLEMS]]
    if not good:
        where, what = problems[0]
        raise UserError(f"{key}: none of the {total} rows is a valid {fmt} row (first: {where}: {what})")
    return good


def _position(where: str) -> tuple[str, int]:
    """file:line, "file: item N" or "source: row N" as a sortable (source, number)."""
    head, _, number = where.replace(": item ", ":").replace(": row ", ":").rpartition(":")
    return (head, int(number)) if number.isdigit() else (where, 0)


def _mostly_conversational(rows: list[dict]) -> bool:
    lists = sum(isinstance(row.get("prompt"), list) for row in rows)
    return lists > len(rows) - lists


def _render_problem(render, row: dict, fmt: str) -> list[str]:
    turns = row["messages"] if fmt == "messages" else None
    if fmt == "sharegpt":
        turns = [{"role": SHAREGPT_ROLES[t["from"].lower()], "content": t["value"]} for t in row["conversations"]]
    if turns is None:
        return []
    try:
        render(turns)
    except Exception as e:  # jinja2 raises TemplateError (raise_exception), or any error inside the template
        return [
            f"the chat template refuses this conversation: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ]
    return []


def invalid_rows_message(key: str, problems: list[tuple[str, str]], total: int, fmt: str) -> str:
    shown = "\n  ".join(f"{where}: {what}" for where, what in problems[:SHOWN_PROBLEMS])
    more = len(problems) - SHOWN_PROBLEMS
    rest = f"\n  ... and {more} more" if more > 0 else ""
    return (
        f"{key}: {len(problems)} of {total} rows are not valid {fmt} rows:\n  {shown}{rest}\n"
        "fix them, or set data.skip_invalid_rows: true to leave them out"
    )
