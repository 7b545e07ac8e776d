"""Build a tiny random model with an in-process trained BPE tokenizer, deterministic from a seed (nothing is
downloaded). The builder lives with the tests that use it, in tests/tiny_models.py; this is its command line.

    python tools/make_tiny_model.py OUT_DIR [--arch llama | --like recipes/llama-2-7b] [--seed 0]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from tiny_models import main  # noqa: E402

if __name__ == "__main__":
    main()
