"""Built-in chat templates for bases that ship none (or one without `{% generation %}` markers).

Each marks the assistant's text *and its end-of-turn token* with `{% generation %}`, so TRL's assistant-only loss
trains every assistant turn and the model learns to stop. TRL ships training templates only for the chat templates of
instruct models it recognises; a base model (Llama-2, Mistral v0.1, Llama-3.1 base) has none, which is why these live
here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and the tokens it needs to exist, as single tokens, in the tokenizer."""

    template: str
    end_of_turn: str | None
    """Token that ends an assistant turn, made the tokenizer's eos so training and generation stop on it; None: the
    tokenizer's own eos (`eos_token` in the template)."""
    required: tuple[str, ...] = ()


def _system_first(opening: str, closing: str) -> str:
    """Llama-2 / Mistral style: the system prompt is folded into the first user turn; roles must alternate."""
    return (
        "{%- if messages[0]['role'] == 'system' %}"
        "{%- set system = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
        "{%- else %}{%- set system = '' %}{%- set loop_messages = messages %}{%- endif %}"
        "{%- for message in loop_messages %}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{- raise_exception('roles must alternate user/assistant after an optional system message') }}"
        "{%- endif %}"
        "{%- if message['role'] == 'user' %}"
        "{%- set content = message['content'] | trim %}"
        "{%- if loop.first and system %}{%- set content = " + opening + " + content %}{%- endif %}"
        "{{- " + closing + " }}"
        "{%- else %}"
        "{%- generation %}{{- ' ' + message['content'] | trim + eos_token }}{%- endgeneration %}"
        "{%- endif %}"
        "{%- endfor %}"
    )


CHAT_TEMPLATES = {
    "chatml": ChatTemplate(
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['role'] == 'assistant' %}"
        "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
        "{%- else %}{{- message['content'] + '<|im_end|>\\n' }}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
        end_of_turn="<|im_end|>",
        required=("<|im_start|>", "<|im_end|>"),
    ),
    "llama-3": ChatTemplate(
        "{{- bos_token }}"
        "{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{%- if message['role'] == 'assistant' %}"
        "{%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}"
        "{%- else %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}",
        end_of_turn="<|eot_id|>",
        required=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    # Meta's format: <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s><s>[INST] ...
    "llama-2": ChatTemplate(
        _system_first("'<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n'", "bos_token + '[INST] ' + content + ' [/INST]'"),
        end_of_turn=None,
    ),
    # Mistral v0.1's format: <s>[INST] {system}\n\n{user} [/INST] {answer}</s>[INST] ...
    "mistral": ChatTemplate(
        "{{- bos_token }}" + _system_first("system + '\\n\\n'", "'[INST] ' + content + ' [/INST]'"),
        end_of_turn=None,
    ),
}
