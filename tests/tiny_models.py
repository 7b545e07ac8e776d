"""Tiny random models with an in-process trained BPE tokenizer, for the tests (conftest's fixtures), the demo and the
benchmarks.

Deterministic from a seed; nothing is downloaded. Two ways:
- `--arch`: a decoder with a ChatML template (the demo's Llama; the tests' Mistral, Qwen2 with tied embeddings,
  GPT-2 with Conv1D layers).
- `--like DIR`: the architecture of a real base, shrunk: DIR holds the base's config.json and special_tokens.json
  (as every `recipes/<model>/` does), and the tiny model keeps its model_type, architecture class, special tokens and
  chat template. Recipes are dry-run on these.

    python tools/make_tiny_model.py OUT_DIR [--arch llama | --like recipes/llama-2-7b] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    PreTrainedTokenizerFast,
)

SPECIAL = {"bos": "<|bos|>", "eos": "<|im_end|>", "pad": "<|pad|>", "start": "<|im_start|>"}
# ChatML with {% generation %} markers, so TRL can mask the loss to assistant tokens. The end-of-turn token (the eos)
# sits inside the marked span: it is trained, and the model learns to stop.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
DEFAULT_CORPUS = Path(__file__).resolve().parent.parent / "data" / "tiny" / "train.jsonl"

# init_std 0.1 rather than transformers' 0.02: with a frozen random lm_head of std 0.02 the largest logit margin a
# LoRA can reach is ~5 nats, which caps the demo's loss near 2.3; at 0.1 it falls by ~95 % in half a minute.
# Widths divisible by 32 so bitsandbytes' avx512-bf16 CPU path can repack them.
ARCHS = {
    "llama": dict(
        model_type="llama",
        hidden_size=256,
        intermediate_size=768,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
    "mistral": dict(
        model_type="mistral",
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=64,
        tie_word_embeddings=False,
    ),
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "gpt2": dict(model_type="gpt2", n_embd=128, n_head=4, n_inner=256, tie_word_embeddings=True),
}


def corpus_lines(path: Path) -> list[str]:
    """Text to train the tokenizer on: every string value of a JSONL file, plus a fixed fallback sentence."""
    lines = ["The quick brown fox jumps over the lazy dog. 0123456789"]
    if path.exists():
        for row in map(json.loads, path.read_text().splitlines()):
            stack = [row]
            while stack:
                item = stack.pop()
                if isinstance(item, str):
                    lines.append(item)
                elif isinstance(item, dict):
                    stack.extend(item.values())
                elif isinstance(item, list):
                    stack.extend(item)
    return lines


def build_tokenizer(lines: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"],
        pad_token=SPECIAL["pad"],
        additional_special_tokens=[SPECIAL["start"]],
        chat_template=CHAT_TEMPLATE,
    )


def random_llama(out: Path, config: dict, device: str = "cpu") -> None:
    """A random Llama of the given config fields (hidden_size, num_hidden_layers, vocab_size, ...) in bf16, seeded,
    built on `device`, with the demo's tokenizer: the shapes the memory and speed benchmarks measure."""
    tokenizer = build_tokenizer(corpus_lines(DEFAULT_CORPUS), 512)
    ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    torch.manual_seed(0)
    with torch.device(device):
        net = AutoModelForCausalLM.from_config(
            AutoConfig.for_model("llama", tie_word_embeddings=False, **config, **ids), dtype=torch.bfloat16
        )
    net.save_pretrained(out)
    tokenizer.save_pretrained(out)


def llama_speaking(tokenizer, out: Path, with_tokenizer: bool = True, **config) -> Path:
    """A tiny random fp32 Llama that speaks `tokenizer` (an embedding for each of its tokens, its bos and eos), saved
    in `out`, with the tokenizer unless it is there already; `config` overrides the shape (2 layers of width 64)."""
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    shape |= {"num_key_value_heads": 2, "max_position_embeddings": 512} | config
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    torch.manual_seed(0)
    net_config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), **shape, **ids)
    AutoModelForCausalLM.from_config(net_config).save_pretrained(out)
    if with_tokenizer:
        tokenizer.save_pretrained(out)
    return out


def build(
    out_dir: str | Path,
    arch: str = "llama",
    seed: int = 0,
    num_layers: int = 4,
    vocab_size: int = 1024,
    corpus: Path = DEFAULT_CORPUS,
    dtype: torch.dtype = torch.float32,
    init_std: float = 0.1,
) -> Path:
    """Write a tiny random model of `arch` with tokenizer and chat template to `out_dir`; return the directory."""
    out = Path(out_dir)
    tokenizer = build_tokenizer(corpus_lines(corpus), vocab_size)
    spec = dict(ARCHS[arch])
    model_type = spec.pop("model_type")
    ids = {f"{k}_token_id": tokenizer.convert_tokens_to_ids(SPECIAL[k]) for k in ("bos", "eos", "pad")}
    layers = {"n_layer": num_layers} if model_type == "gpt2" else {"num_hidden_layers": num_layers}
    positions = {"n_positions": 512} if model_type == "gpt2" else {"max_position_embeddings": 512}
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), initializer_range=init_std, **layers, **positions, **spec, **ids
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# Size keys of transformers configs, under their various names, and their tiny values (widths divisible by 32).
TINY_SIZES = {
    "hidden_size": 64,
    "n_embd": 64,
    "d_model": 64,
    "intermediate_size": 128,
    "n_inner": 128,
    "ffn_dim": 128,
    "num_hidden_layers": 2,
    "n_layer": 2,
    "num_attention_heads": 4,
    "n_head": 4,
    "max_position_embeddings": 512,
    "n_positions": 512,
}
TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def tiny_config(config: dict, token_ids: dict[str, int], vocab_size: int) -> dict:
    """A real config with every size shrunk, the grouped-query ratio kept and special token ids remapped."""
    tiny = dict(config) | {k: v for k, v in TINY_SIZES.items() if k in config}
    heads = tiny.get("num_attention_heads", tiny.get("n_head"))
    if "num_key_value_heads" in config:
        tiny["num_key_value_heads"] = max(1, heads * config["num_key_value_heads"] // config["num_attention_heads"])
    if "head_dim" in config:
        tiny["head_dim"] = tiny["hidden_size"] // heads
    if config.get("sliding_window"):
        tiny["sliding_window"] = 64
    if (config.get("rope_scaling") or {}).get("original_max_position_embeddings"):
        tiny["rope_scaling"] = config["rope_scaling"] | {"original_max_position_embeddings": 256}
    for key in ("layer_types", "max_window_layers", "quantization_config", "transformers_version"):
        tiny.pop(key, None)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id"):
        if key in tiny:
            tiny[key] = token_ids.get(key.removesuffix("_id"))
    return tiny | {"vocab_size": vocab_size, "initializer_range": 0.1, "torch_dtype": "float32"}


def build_like(out_dir: str | Path, facts_dir: str | Path, seed: int = 0, corpus: Path = DEFAULT_CORPUS) -> Path:
    """A tiny random model of the architecture described by facts_dir/config.json and special_tokens.json."""
    import importlib.resources

    import transformers
    from tokenizers import processors

    facts_dir, out = Path(facts_dir), Path(out_dir)
    config = json.loads((facts_dir / "config.json").read_text())
    facts = json.loads((facts_dir / "special_tokens.json").read_text())
    named = {k: facts[k] for k in TOKEN_KEYS if facts.get(k)}
    extra = facts.get("additional_special_tokens", [])
    specials = list(dict.fromkeys([*named.values(), *extra]))
    tok = Tokenizer(models.BPE(unk_token=named.get("unk_token")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(corpus_lines(corpus), trainer)
    if facts.get("add_bos_token") and "bos_token" in named:  # Llama/Mistral tokenizers prepend bos to plain text
        bos = named["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    if "cls_token" in named and "sep_token" in named:  # BERT: [CLS] text [SEP]
        cls, sep = named["cls_token"], named["sep_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}",
            pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))],
        )
    template = facts.get("chat_template")
    if template and "{%" not in template:  # the name of a template TRL ships (the real model's own, e.g. qwen2_5)
        template = (importlib.resources.files("trl") / "chat_templates" / f"{template}.jinja").read_text()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, additional_special_tokens=extra, chat_template=template, **named
    )
    token_ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in named.items()}
    cfg = tiny_config(config, token_ids, len(tokenizer))
    model_type = cfg.pop("model_type")
    architecture = (cfg.pop("architectures", None) or ["AutoModelForCausalLM"])[0]
    architecture = facts.get("checkpoint_class", architecture)  # bert-base-uncased: BertForPreTraining weights
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(AutoConfig.for_model(model_type, **cfg))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="llama")
    parser.add_argument("--like", type=Path, help="directory with a base's config.json and special_tokens.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--init-std", type=float, default=0.1, help="std of the random weights")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="JSONL whose strings train the tokenizer")
    args = parser.parse_args()
    if args.like:
        out = build_like(args.out_dir, args.like, args.seed, args.corpus)
        print(f"tiny model like {args.like} written to {out}")
        return
    out = build(args.out_dir, args.arch, args.seed, args.layers, args.vocab_size, args.corpus, init_std=args.init_std)
    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(out).parameters())
    print(f"tiny {args.arch} model ({n / 1e6:.1f}M parameters) written to {out}")


if __name__ == "__main__":
    main()


DEMO_DATA = Path(__file__).resolve().parent.parent / "data" / "tiny"


def small_recipe(path: Path, base: Path, **sections) -> Path:
    """Write a small fast recipe to `path`: fp32 compute, rank 8, the demo's chat data, 3 steps, output in `run/`
    beside it. A dict in `sections` updates that section, anything else (output_dir) replaces it."""
    import yaml

    recipe = {
        "model": {"base": str(base), "compute_dtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(DEMO_DATA / "train.jsonl"), "eval": str(DEMO_DATA / "eval.jsonl"), "max_seq_length": 96},
        "train": {
            "max_steps": 3,
            "batch_size": 4,
            "grad_accumulation": 1,
            "learning_rate": 5e-3,
            "logging_steps": 1,
            "save_steps": 100,
            "warmup_ratio": 0.0,
        },
        "output_dir": str(path.parent / "run"),
    }
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values} if isinstance(values, dict) else values
    path.write_text(yaml.safe_dump(recipe))
    return path
