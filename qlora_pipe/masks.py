"""Assistant-only loss masks for any chat template: which tokens of a conversation are the model's to learn.

TRL masks assistant tokens only through `{% generation %}` markers in the template, or by swapping in its own training
version of a template it recognises byte for byte (Llama 3, Qwen2.5/3, Phi-3, Gemma, ...). Real models' templates
almost never carry markers, and a template that differs from TRL's copy by one character is refused with an error.
So for every other template we find the assistant turns from the template itself: render the conversation up to
each assistant turn with the generation prompt, then with that turn, and check that each rendering is a prefix of
the next and of the whole conversation. The text between the generation prompt and the turn's end-of-turn token is
trained; headers, system and user text never are. A template that renders earlier turns differently once a later
turn follows (one that drops earlier reasoning, say) cannot be split that way and is refused, naming the row.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from trl.chat_template_utils import get_training_chat_template

from qlora_pipe import UserError

MARKERS = "generation markers"
TRL_TEMPLATE = "TRL training template"
PREFIXES = "template prefixes"


def has_generation_markers(template: str | dict | None) -> bool:
    """TRL's assistant-only loss reads assistant text from `{% generation %}` blocks in the template."""
    if isinstance(template, dict):  # a template shipped as named variants: `default` is the one rendered
        template = template.get("default")
    return "{% generation %}" in (template or "").replace("{%-", "{%").replace("-%}", "%}")


def trl_training_template(tokenizer) -> str | None:
    """The training version of this template TRL swaps in, or None where it has none (TRL raises then)."""
    try:
        return get_training_chat_template(tokenizer)
    except Exception:  # noqa: BLE001 - TRL raises ValueError for templates it lacks, and renders probe conversations
        # (tool calls) that real templates answer with TypeErrors and their own raise_exception: none is TRL's then
        return None


def method(tokenizer) -> str:
    """How assistant tokens are found: the template's own markers; else the template's own prefixes, where it renders
    turn by turn (exact, and the very text the model sees at inference); else TRL's training version of a template
    it knows (prefix-preserving rewrites of templates such as Qwen3's); else prefixes, which then refuse the first
    conversation they cannot split, naming it."""
    if has_generation_markers(tokenizer.chat_template):
        return MARKERS
    if splits_turn_by_turn(tokenizer) is False and trl_training_template(tokenizer):
        return TRL_TEMPLATE
    return PREFIXES


# Conversations to try a template on, most demanding first: templates may refuse a system turn (Gemma) or more turns.
PROBES = (
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say yes."},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "Say no."},
        {"role": "assistant", "content": "no"},
    ],
    [
        {"role": "user", "content": "Say yes."},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "Say no."},
        {"role": "assistant", "content": "no"},
    ],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
)


def renderer(tokenizer) -> Callable[[list[dict], bool], str]:
    def render(messages: list[dict], prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)

    return render


def splits_turn_by_turn(tokenizer) -> bool | None:
    """Whether the template renders the first probe conversation it takes turn by turn (None: it takes none)."""
    render, added = renderer(tokenizer), added_tokens(tokenizer)
    for probe in PROBES:
        try:
            assistant_spans(render, probe, added)
        except Unsplittable:
            return False
        except Exception:  # noqa: BLE001 - a template may raise anything for a conversation it does not take
            continue
        return True
    return None


def turn_end(whole: str, after: int, added: list[str]) -> int:
    """Where an assistant turn's trained text ends in the rendered conversation, its content ending at `after`: after
    the first added token (`<|im_end|>`, `<|eot_id|>`, `</s>`, ...) that follows with only template text between
    (`\n<|end|>`), else at the content's end (a template whose turns end without a special token)."""
    found = [(at, len(t)) for t in added if (at := whole.find(t, after)) >= 0]
    if not found:
        return after
    at, length = min(found)
    between = whole[after:at]
    return at + length if not between.strip() or not any(c.isalnum() for c in between) else after


class Unsplittable(Exception):
    """A conversation the template does not render turn by turn as a prefix of the whole."""


def hide_tokens(text: str, added: list[str]) -> str:
    """`text` with each added token blanked out (same length): a search for content never matches inside one."""
    for token in added:
        text = text.replace(token, "\0" * len(token))
    return text


def assistant_spans(render: Callable[[list[dict], bool], str], messages: list[dict], added: list[str]) -> tuple:
    """(the whole rendered conversation, [(start, end) character span of each assistant turn's trained text]).

    `render(messages, add_generation_prompt)` renders with the model's template. A turn's trained text starts where
    its generation prompt ends — the text before it is exactly what the model is given at inference — and runs through
    its content and end-of-turn token as the whole conversation renders them. Raises Unsplittable, saying how, when
    the generation prompt is not a prefix of the conversation, or the turn's content is not where it should be."""
    whole = render(messages, False)
    hidden = hide_tokens(whole, added)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:i], True)
        if not whole.startswith(prompt):
            same = len(os.path.commonprefix([prompt, whole]))
            raise Unsplittable(
                f"before assistant turn {len(spans) + 1} the generation prompt renders {prompt[same:][:40]!r} where "
                f"the conversation has {whole[same:][:40]!r} (the template opens turns at inference with text the "
                "conversation's turns lack, such as a reasoning block, or moves earlier text, such as the system "
                "message, to the last turn)"
            )
        content = message.get("content")
        content = content.strip() if isinstance(content, str) else ""
        at = hidden.find(content, len(prompt))
        if at < 0:
            raise Unsplittable(
                f"the content of assistant turn {len(spans) + 1} is not in the rendered conversation as given (the "
                "template rewrites earlier turns, such as dropping their reasoning)"
            )
        spans.append((len(prompt), turn_end(whole, at + len(content), added)))
    return whole, spans


def first_words(messages: list[dict]) -> str:
    """Where to find a conversation in the data file (the split shuffles rows): its first user text."""
    text = next((str(m.get("content")) for m in messages if m.get("role") == "user"), "")
    return repr(text if len(text) <= 60 else text[:60] + "…")


def added_tokens(tokenizer) -> list[str]:
    """The tokenizer's added tokens (special and not): where a template's turn markers live."""
    return sorted({t.content for t in tokenizer.added_tokens_decoder.values()}, key=len, reverse=True)


def tokenize_conversations(conversations: list[list[dict]], tokenizer, name: str) -> dict[str, list[list[int]]]:
    """`input_ids` and `assistant_masks` (1 on trained tokens) of each conversation, masked by template prefixes.

    The ids are those apply_chat_template gives (the rendered text tokenized without added special tokens: the
    template writes its own bos); a token is trained when any of its characters is in an assistant span, as
    transformers does for `{% generation %}` blocks."""
    if not tokenizer.is_fast:
        raise UserError(
            "assistant-only loss by template prefixes needs a fast tokenizer (character offsets); this base has a "
            "slow one: use a base with a tokenizer.json, or set data.chat_template to a built-in template"
        )
    render, added = renderer(tokenizer), added_tokens(tokenizer)
    ids, masks = [], []
    for messages in conversations:
        try:
            text, spans = assistant_spans(render, messages, added)
        except Unsplittable as e:
            raise UserError(
                f"the chat template cannot be split into turns for an assistant-only loss: in the {name} example "
                f"{first_words(messages)}, {e}. "
                "Give such conversations one assistant turn each (one example per turn), or set "
                "data.chat_template to a built-in template (chatml, llama-2, llama-3, mistral)"
            ) from None
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids.append(encoded["input_ids"])
        masks.append([int(any(s < end and e > start for start, end in spans)) for s, e in encoded["offset_mapping"]])
    return {"input_ids": ids, "assistant_masks": masks}
