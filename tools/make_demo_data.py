"""Generate the synthetic data sets that ship in data/ (label-style tasks a tiny LoRA learns in seconds).

    python tools/make_demo_data.py data/tiny                     # the demo: `messages`
    python tools/make_demo_data.py data/seeds --seeds            # the seed recipes' three data sets

Writes train.jsonl and eval.jsonl, deterministically from a seed. The files ship in the repo; this script documents
how they were made. The seed sets have the shape of the originals: causal-LM text (GPT-2), "Tweet text : … Label :"
prompts with complaint / no complaint completions (RAFT twitter_complaints as PEFT's BLOOMZ example trains on it),
and GLUE SST-2's sentence/label/idx rows.
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args()
    rng = random.Random(args.seed)
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
