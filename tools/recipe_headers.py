"""Rewrite the memory lines in the header of every 7B recipe from `qlora-pipe estimate` (no weights loaded).

The block starts at `# Expected peak GPU memory:` and runs over the `#   ` lines after it; tests/test_recipes.py checks
that each header states the peak the estimate predicts.

    python tools/recipe_headers.py            # rewrite in place
    python tools/recipe_headers.py --check    # exit 1 if a header is out of date
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from qlora_pipe.config import load_recipe
from qlora_pipe.estimate import GIB, estimate, longest_sequence

ROOT = Path(__file__).resolve().parent.parent
MARK = "# Expected peak GPU memory:"


def header(path: Path) -> list[str]:
    recipe = load_recipe(path)
    est = estimate(recipe, device="cuda", facts_dir=path.parent)
    parts = " + ".join(f"{name} {size / GIB:.2f}" for name, size in est.parts.items())
    longest = [
        longest_sequence(recipe, device="cuda", limit=24 * GIB, facts_dir=path.parent, offloading=offload)
        for offload in (False, True)
    ]
    body = (
        f"{parts}. Activation terms measured on an H200 on Llama-3.1-8B's shape (within 3 % of the allocator's "
        f"peak at 32 layers; docs/benchmarks.md). Longest sequence at batch 1 on a 24 GiB card: {longest[0]:,} "
        f"tokens, {longest[1]:,} with train.activation_offloading: true."
    )
    first = f"{MARK} {est.total / GIB:.2f} GiB, from `qlora-pipe estimate` on this file (no weights loaded):"
    return [first, *textwrap.wrap(body, 119, initial_indent="#   ", subsequent_indent="#   ")]


def rewrite(path: Path) -> str:
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(MARK))
    end = start + 1
    while end < len(lines) and lines[end].startswith("#   "):
        end += 1
    return "\n".join([*lines[:start], *header(path), *lines[end:]]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    stale = []
    for path in sorted(ROOT.glob("recipes/*/*.yaml")):
        if MARK not in path.read_text():
            continue
        text = rewrite(path)
        if text != path.read_text():
            stale.append(path)
            if not args.check:
                path.write_text(text)
    print("\n".join(f"{'stale' if args.check else 'rewrote'}: {p.relative_to(ROOT)}" for p in stale) or "up to date")
    sys.exit(1 if args.check and stale else 0)


if __name__ == "__main__":
    main()
