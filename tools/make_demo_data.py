"""Generate the synthetic data sets that ship in data/ (label-style tasks a tiny LoRA learns in seconds).

    python tools/make_demo_data.py data/tiny                     # the demo: `messages`
    python tools/make_demo_data.py data/seeds --seeds            # the seed recipes' three data sets
    python tools/make_demo_data.py runs/stdlib_qa --stdlib       # real data, from this machine's Python

Writes train.jsonl and eval.jsonl, deterministically from a seed. The files ship in the repo; this script documents
how they were made. The seed sets have the shape of the originals: causal-LM text (GPT-2), "Tweet text : … Label :"
prompts with complaint / no complaint completions (RAFT twitter_complaints as PEFT's BLOOMZ example trains on it),
and GLUE SST-2's sentence/label/idx rows.

--stdlib writes real data instead, read from the installed Python's standard library (it differs between Python
versions, so it is made on the machine, not shipped): for each documented public function of some common modules,
the question which module has it, with the first line of its docstring, answered by the module's name. The
real-model demo fine-tunes SmolLM2 on it.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
from pathlib import Path

WORDS = {
    "positive": ["wonderful", "great", "lovely", "excellent", "delightful", "superb", "pleasant", "fantastic"],
    "negative": ["awful", "terrible", "boring", "dreadful", "poor", "horrible", "disappointing", "bland"],
}
TOPICS = {
    "sports": ["match", "goal", "team", "coach", "league", "stadium", "referee", "season"],
    "food": ["soup", "bread", "recipe", "dessert", "kitchen", "spices", "pasta", "dinner"],
    "tech": ["laptop", "software", "server", "battery", "screen", "network", "update", "keyboard"],
}
FILLER = ["the", "a", "this", "our", "that", "very", "really", "quite", "was", "is", "and", "with"]


def sentence(rng: random.Random, key_words: list[str]) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(3, 7))]
    for word in rng.sample(key_words, 2):
        words.insert(rng.randint(0, len(words)), word)
    return " ".join(words).capitalize() + "."


def example(rng: random.Random) -> dict:
    if rng.random() < 0.5:
        label = rng.choice(sorted(WORDS))
        text = sentence(rng, WORDS[label] + [rng.choice(TOPICS[rng.choice(sorted(TOPICS))])])
        user = f"Classify the sentiment of this review as positive or negative.\nReview: {text}"
    else:
        label = rng.choice(sorted(TOPICS))
        text = sentence(rng, TOPICS[label])
        user = f"Which topic is this about: sports, food or tech?\nText: {text}"
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": label}]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": "Answer with one word."})
    return {"messages": messages}


COMPLAINT = ["delayed", "refund", "broken", "worst", "cancelled", "lost", "rude", "waiting", "charged", "outage"]
PRAISE = ["thanks", "love", "great", "happy", "quick", "helpful", "amazing", "smooth", "kind", "perfect"]
HANDLES = ["@airline", "@telco", "@bank", "@shop", "@courier"]


def tweet(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(["complaint", "no complaint"])
    text = f"{rng.choice(HANDLES)} " + sentence(rng, COMPLAINT if label == "complaint" else PRAISE)
    return text, label


def seed_rows(task: str, rng: random.Random, count: int) -> list[dict]:
    rows = []
    for i in range(count):
        if task == "gpt2_causal_lm":
            label = rng.choice(sorted(WORDS))
            rows.append({"text": f"Review: {sentence(rng, WORDS[label])}\nSentiment: {label}"})
        elif task == "twitter_complaints":
            text, label = tweet(rng)
            rows.append({"prompt": f"Tweet text : {text} Label :", "completion": f" {label}"})
        else:
            label = rng.randint(0, 1)
            rows.append(
                {"sentence": sentence(rng, WORDS["positive" if label else "negative"]), "label": label, "idx": i}
            )
    return rows


# Modules whose functions a Python programmer meets; os.path once (posixpath and ntpath repeat it).
STDLIB = (
    *("os", "os.path", "sys", "shutil", "glob", "fnmatch", "tempfile", "pathlib", "io", "stat", "filecmp"),
    *("json", "csv", "pickle", "base64", "binascii", "hashlib", "hmac", "zlib", "gzip", "bz2", "struct", "codecs"),
    *("math", "cmath", "statistics", "random", "secrets", "decimal", "fractions", "operator", "functools"),
    *("itertools", "heapq", "bisect", "copy", "string", "textwrap", "re", "difflib", "unicodedata", "shlex"),
    *("html", "urllib.parse", "urllib.request", "email.utils", "mimetypes", "ipaddress", "socket", "time"),
    *("calendar", "locale", "platform", "subprocess", "signal", "threading", "asyncio", "inspect", "ast", "dis"),
    *("tokenize", "traceback", "warnings", "logging", "pprint", "typing", "dataclasses", "contextlib", "site"),
    *("importlib", "pkgutil", "sysconfig", "uuid", "zipfile", "tarfile", "keyword", "colorsys", "gc", "weakref"),
)


def docstring_rows(per_module: int = 12) -> list[dict]:
    """A question per documented public function, at most `per_module` of each module: which module has it, with the
    first line of its docstring; the answer is the module's name. Lines that name the function, or do not end a
    sentence, are left out; a function two modules export is asked once."""
    rows, seen = [], set()
    for module_name in STDLIB:
        module, asked = importlib.import_module(module_name), 0
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)) or asked == per_module:
                continue
            line = (inspect.getdoc(obj) or "").strip().split("\n")[0].strip()
            if not (15 <= len(line) <= 120 and line.endswith(".")) or name.lower() in line.lower() or name in seen:
                continue
            seen.add(name)
            asked += 1
            messages = [
                {"role": "system", "content": "Answer with the module name."},
                {"role": "user", "content": f'Which Python module has `{name}`: "{line}"?'},
                {"role": "assistant", "content": module_name},
            ]
            rows.append({"messages": messages})
    return rows


def write(out_dir: Path, rows: dict[str, list[dict]]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, split in rows.items():
        (out_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train", type=int, default=480)
    parser.add_argument("--eval", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--seeds", action="store_true", help="write the three seed-task data sets instead")
    parser.add_argument("--stdlib", action="store_true", help="write the standard-library docstring questions")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    if args.stdlib:
        rows = docstring_rows()
        rng.shuffle(rows)
        held_out = min(args.eval, len(rows) // 5)
        write(args.out_dir, {"train": rows[held_out:][: args.train], "eval": rows[:held_out]})
        print(f"wrote {len(rows[held_out:][: args.train])} train and {held_out} eval questions to {args.out_dir}")
        return
    if args.seeds:
        for task in ("gpt2_causal_lm", "twitter_complaints", "sst2"):
            write(
                args.out_dir / task,
                {n: seed_rows(task, rng, c) for n, c in (("train", args.train), ("eval", args.eval))},
            )
        print(f"wrote the seed data sets to {args.out_dir}")
        return
    write(args.out_dir, {n: [example(rng) for _ in range(c)] for n, c in (("train", args.train), ("eval", args.eval))})
    print(f"wrote {args.train} train and {args.eval} eval examples to {args.out_dir}")


if __name__ == "__main__":
    main()
