"""Chat prompts from a model's Jinja chat template, rendered in a sandbox.

Templates come from model files (GGUF `tokenizer.chat_template`, HF `tokenizer_config.json`), so they are
untrusted code: they run in jinja2's ImmutableSandboxedEnvironment, with the same helpers and settings as
Hugging Face transformers' `apply_chat_template` (trim_blocks, lstrip_blocks, loop controls,
`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from edgert.errors import EdgertError, FormatError


class ChatTemplateError(EdgertError):
    """A chat template is broken, refused to render the messages, or tried to escape its sandbox."""


# Used when a model ships no template.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma 2/3 instruction format (the gemma-3 GGUFs carry no template; llama.cpp has this one built in).
# Unlike the HF original it does not print bos_token: the tokenizer adds BOS, as llama.cpp does.
GEMMA = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

BUILTIN_TEMPLATES = {"chatml": CHATML, "gemma": GEMMA}


def default_template(arch: str | None) -> str:
    """The template to use for a model without one: Gemma's for gemma architectures, else ChatML."""
    return GEMMA if arch and arch.startswith("gemma") else CHATML


def render_chat(
    template: str | None,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **extra: Any,
) -> str:
    """Render `messages` ([{"role": ..., "content": ...}, ...]) with a Jinja chat template.

    Args:
        template: Jinja source, a BUILTIN_TEMPLATES name, or None for ChatML.
        add_generation_prompt: end with the header of the assistant's turn.
        bos_token, eos_token: the special-token texts the template may insert.
        extra: more template variables (e.g. `tools`).

    Raises:
        ChatTemplateError: the template does not parse, calls raise_exception, fails while rendering, or
            touches something the sandbox forbids (e.g. `__class__`, `__subclasses__`).
    """
    import jinja2
    from jinja2.sandbox import SecurityError

    source = BUILTIN_TEMPLATES.get(template, template) if template else CHATML
    try:
        compiled = _compile(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not parse (line {e.lineno}): {e.message}") from e
    variables = {
        **extra,
        "messages": [dict(m) for m in messages],
        "add_generation_prompt": add_generation_prompt,
        "bos_token": bos_token,
        "eos_token": eos_token,
    }
    try:
        return compiled.render(**variables)
    except ChatTemplateError:
        raise
    except SecurityError as e:
        raise ChatTemplateError(f"chat template refused by the sandbox: {e}") from e
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise ChatTemplateError(f"chat template failed to render: {type(e).__name__}: {e}") from e


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template refused the messages: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(source: str):
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    class StrictSandbox(ImmutableSandboxedEnvironment):
        # jinja2 renders a forbidden attribute as an empty undefined; refuse it at once instead
        def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
            raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is not allowed")

    if not isinstance(source, str):
        raise FormatError(f"chat template must be a string, got {type(source).__name__}")
    env = StrictSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols], autoescape=False
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)
