"""Generate the demo's synthetic instruction data (label-style tasks a tiny LoRA learns in seconds).

    python tools/make_demo_data.py data/tiny

Writes train.jsonl and eval.jsonl in `messages` format, deterministically from a seed. The files ship in the repo;
this script documents how they were made.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train", type=int, default=480)
    parser.add_argument("--eval", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, count in (("train", args.train), ("eval", args.eval)):
        rows = [json.dumps(example(rng)) for _ in range(count)]
        (args.out_dir / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    print(f"wrote {args.train} train and {args.eval} eval examples to {args.out_dir}")


if __name__ == "__main__":
    main()
