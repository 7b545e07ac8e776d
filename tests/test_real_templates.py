"""The assistant-only loss on real chat templates: llama.cpp's corpus of 70 models' templates, each with the real
vocabulary of its family where llama.cpp ships one (else SmolLM2's, with the template's own turn tokens added). On
system + multi-turn conversations, exactly each assistant turn's content and its end-of-turn token are trained, never
headers, system or user text; a template that cannot be split is refused with one clear message."""

from __future__ import annotations

import copy
import json
import math
import re
from functools import cache
from pathlib import Path

import datasets
import pytest
from conftest import write_jsonl
from real_material import chat_templates, llama_cpp_models, smollm2
from tiny_models import llama_speaking
from transformers import AutoTokenizer

from qlora_pipe import UserError, masks
from qlora_pipe.config import DataConfig, load_recipe
from qlora_pipe.data import _unclosed_run_end, _whitespace_test, prepare_tokenizer, tokenize

# The real vocabulary of each family whose vocabulary llama.cpp ships (and transformers reads).
VOCABULARY = {
    "meta-llama-": "llama-bpe",
    "deepseek-ai-DeepSeek-R1-Distill-Llama": "llama-bpe",
    "NousResearch-Hermes": "llama-bpe",
    "fireworks-ai-llama-3": "llama-bpe",
    "meetkai-functionary": "llama-bpe",
    "Qwen-Qwen2.5": "qwen2",
    "Qwen-Qwen3-": "qwen2",
    "Qwen-QwQ": "qwen2",
    "Qwen3-Coder": "qwen2",
    "deepseek-ai-DeepSeek-R1-Distill-Qwen": "qwen2",
    "Qwen3.5": "qwen35",
    "microsoft-Phi-3.5": "phi-3",
    "mistralai-": "llama-spm",
    "unsloth-mistral": "llama-spm",
}
# Turn markers of the templates: <|im_start|>, <｜User｜>, [INST], <start_of_turn>, <think>, <s>, ...
TOKEN_PATTERNS = (
    r"<\|[^<>|\s]+\|>",
    r"<｜[^<>]+?｜>",
    r"\[/?[A-Z_]+\]",
    r"<[a-z_]+_of_[a-z_]+>",
    r"</?think>",
    r"</?s>",
)
# The templates the issue names, and one tool-use template: these must train exactly.
NAMED = (
    "meta-llama-Llama-3.1-8B-Instruct",
    "meta-llama-Llama-3.2-3B-Instruct",
    "meta-llama-Llama-3.3-70B-Instruct",
    "Qwen-Qwen2.5-7B-Instruct",
    "Qwen-Qwen3-0.6B",
    "mistralai-Mistral-Nemo-Instruct-2407",
    "Mistral-Small-3.2-24B-Instruct-2506",
    "microsoft-Phi-3.5-mini-instruct",
    "google-gemma-2-2b-it",
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B",
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",
    "ibm-granite-granite-3.3-2B-Instruct",
    "HuggingFaceTB-SmolLM3-3B",
    "meetkai-functionary-medium-v3.1",  # a tool-use template (Hermes' need a `tools` list, which rows do not carry)
)
# DeepSeek-R1-Distill opens each turn at inference with a reasoning block the conversation lacks, and Mistral Nemo
# moves the system message to the last user turn: with a system turn, they are refused (tested below).
MUST_TRAIN = tuple(n for n in NAMED if "R1-Distill" not in n and "Nemo" not in n)
SYSTEM, USERS, ANSWERS = "SYSTEXT keep it short.", ("USERONE what is 2+2?", "USERTWO and 3+3?"), ("four", "six")


def conversations() -> list[list[dict]]:
    """System + two turns, then the same without the system turn (for templates that refuse one)."""
    turns = [
        m
        for u, a in zip(USERS, ANSWERS, strict=True)
        for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})
    ]
    return [[{"role": "system", "content": SYSTEM}, *turns], turns]


def available() -> dict[str, str]:
    try:
        return chat_templates()
    except RuntimeError as e:  # no package index: the corpus cannot be had
        pytest.skip(str(e), allow_module_level=True)


TEMPLATES = available()


@cache
def base_tokenizer(vocabulary: str | None):
    if vocabulary is None:
        return AutoTokenizer.from_pretrained(smollm2())
    return AutoTokenizer.from_pretrained(llama_cpp_models(), gguf_file=f"ggml-vocab-{vocabulary}.gguf")


def tokenizer_for(name: str):
    """The template's tokenizer: its family's real vocabulary, with the template's turn tokens added where missing."""
    vocabulary = next((v for prefix, v in VOCABULARY.items() if name.startswith(prefix)), None)
    tokenizer = copy.deepcopy(base_tokenizer(vocabulary))
    template = TEMPLATES[name]
    found = {t for pattern in TOKEN_PATTERNS for t in re.findall(pattern, template)}
    vocab = tokenizer.get_vocab()
    tokenizer.add_special_tokens({"additional_special_tokens": sorted(t for t in found if t not in vocab)})
    tokenizer.chat_template = template
    return tokenizer


def trained_spans(tokenizer, example) -> list[str]:
    spans, current = [], []
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if label != -100:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return [tokenizer.decode(s) for s in [*spans, current] if s]


def renders(tokenizer, messages) -> bool:
    try:
        tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - the template refuses this conversation (a system turn, say)
        return False
    return True


def masked(name: str):
    """(tokenizer, conversation, tokenized example) or (tokenizer, conversation, UserError) for one template."""
    tokenizer = tokenizer_for(name)
    prepare_tokenizer(tokenizer, DataConfig(train="unused.jsonl"))
    messages = next((c for c in conversations() if renders(tokenizer, c)), None)
    if messages is None:
        return tokenizer, None, None
    try:
        example = tokenize(datasets.Dataset.from_list([{"messages": messages}]), tokenizer, True, "train")[0]
    except UserError as e:
        return tokenizer, messages, e
    return tokenizer, messages, example


def ends_turns_with_eos(tokenizer, example) -> bool:
    """What check-data requires (else it refuses the data): every trained span ends with the eos."""
    return _unclosed_run_end(example["labels"], tokenizer.eos_token_id, _whitespace_test(tokenizer)) is None


def exact(tokenizer, example) -> bool:
    """The trained spans are the answers, in order, each with the eos (the template's end-of-turn token) and nothing
    else but an empty reasoning block where the template writes one (Qwen3, Kimi)."""
    spans = [re.sub(r"<think>\s*</think>\s*", "", span).strip() for span in trained_spans(tokenizer, example)]
    return spans == [answer + tokenizer.eos_token for answer in ANSWERS]


def span_starts(example) -> list[int]:
    labels = example["labels"]
    return [i for i, label in enumerate(labels) if label != -100 and (i == 0 or labels[i - 1] == -100)]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_a_real_template_trains_exactly_the_answers_or_is_refused_clearly(name):
    tokenizer, messages, result = masked(name)
    if messages is None:
        pytest.skip(f"{name} renders none of the probe conversations without tools or other extra context")
    if isinstance(result, UserError):  # train and check-data stop with this one message
        message = str(result)
        assert "cannot be split into turns" in message and "\n" not in message, message
        assert name not in MUST_TRAIN, f"{name} is refused: {message}"
        return
    spans = trained_spans(tokenizer, result)
    assert not any(s in "".join(spans) for s in (SYSTEM, *USERS)), spans  # system and user text never
    if not ends_turns_with_eos(tokenizer, result):  # check-data refuses it, naming the token turns end with
        assert name not in MUST_TRAIN, f"{name}: turns do not end with the eos: {spans}"
        return
    assert len(spans) == len(ANSWERS) and all(a in s for a, s in zip(ANSWERS, spans, strict=True)), spans
    if masks.method(tokenizer) == masks.PREFIXES:  # headers never: what precedes each turn is its generation prompt
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for start, turn in zip(span_starts(result), turns, strict=True):
            prompt = tokenizer.apply_chat_template(messages[:turn], tokenize=False, add_generation_prompt=True)
            assert tokenizer.decode(result["input_ids"][:start]) == tokenizer.decode(
                tokenizer(prompt, add_special_tokens=False)["input_ids"]
            )
    if name in MUST_TRAIN:
        assert exact(tokenizer, result), spans


def test_templates_that_cannot_be_split_say_what_they_do():
    _, _, refused = masked("mistralai-Mistral-Nemo-Instruct-2407")  # with a system turn
    assert isinstance(refused, UserError) and "moves earlier text, such as the system message" in str(refused)
    tokenizer = tokenizer_for("mistralai-Mistral-Nemo-Instruct-2407")
    prepare_tokenizer(tokenizer, DataConfig(train="unused.jsonl"))
    example = tokenize(datasets.Dataset.from_list([{"messages": conversations()[1]}]), tokenizer, True, "train")[0]
    assert exact(tokenizer, example)  # without one it trains exactly
    _, _, refused = masked("deepseek-ai-DeepSeek-R1-Distill-Llama-8B")
    assert isinstance(refused, UserError) and "generation prompt renders '<think>\\n'" in str(refused)
    assert "such as a reasoning block" in str(refused)


def test_most_real_templates_train_exactly():
    exact_ones = []
    for name in sorted(TEMPLATES):
        tokenizer, messages, result = masked(name)
        if messages is not None and not isinstance(result, UserError) and exact(tokenizer, result):
            exact_ones.append(name)
    assert len(exact_ones) >= 12 and set(MUST_TRAIN) <= set(exact_ones), exact_ones


def tiny_model_with(tokenizer, out: Path) -> Path:
    """A tiny random Llama that speaks `tokenizer` (its template included)."""
    return llama_speaking(tokenizer, out)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in NAMED if "R1-Distill" not in n])
def test_train_runs_on_a_real_template(name, write_recipe, tmp_path):
    from qlora_pipe.train import train

    base = tiny_model_with(tokenizer_for(name), tmp_path / "base")
    messages = conversations()[1]  # no system turn: Mistral Nemo moves it, Gemma refuses it
    rows = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}] * 8)
    recipe = write_recipe(
        base,
        data={
            "train": str(rows),
            "eval": None,
            "eval_fraction": 0.0,
            "max_seq_length": 1024,
        },  # default system prompts
        train={"max_steps": 2},
    )
    run = train(load_recipe(recipe))
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["data"]["assistant_only_loss"] and manifest["data"]["assistant_mask"]
    assert (
        all(math.isfinite(e["loss"]) for e in manifest["train_log"] if "loss" in e)
        if "train_log" in manifest
        else True
    )
    assert (run / "adapter" / "adapter_model.safetensors").exists()
