"""Chat templates: Jinja templates that come with a stranger's checkpoint, rendered sandboxed as
transformers renders them, and bounded in steps and output so that a hostile one fails at once."""

from __future__ import annotations

import sys
from datetime import datetime
from functools import cache
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import TemplateError


def render_chat(
    template_text: str,
    conversation: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = False,
    continue_final_message: bool = False,
    **context: Any,
) -> str:
    """The conversation as the template writes it; `continue_final_message` cuts after the final
    message's content, so generation continues it."""
    if add_generation_prompt and continue_final_message:
        raise TemplateError("add_generation_prompt and continue_final_message ask for opposite endings")
    try:
        template = _environment().from_string(template_text)
        text = _bounded_render(
            template, messages=conversation, add_generation_prompt=add_generation_prompt, **context
        )
    except TemplateError:
        raise
    except Exception as err:  # jinja2 errors of every kind, and sandbox violations
        raise TemplateError(f"chat template failed to render: {err}") from err
    return _open_final_message(text, conversation) if continue_final_message else text


@cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)  # dated system prompts
    return env


# A chat template comes with a stranger's checkpoint: its rendering is bounded in steps (lines of the
# compiled template run, loop iterations included) and in output, so nested loops fail at once.
MAX_TEMPLATE_STEPS = 1_000_000
MAX_TEMPLATE_OUTPUT = 10_000_000


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with `*` and `**` refused where they would build a huge value in one operation."""

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # jinja's default renders a blocked attribute as an empty string; a template reaching for
        # internals is refused outright instead
        raise TemplateError(
            f"chat template reads `{attribute}` of a {type(obj).__name__}, which templates may not"
        )

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for value, times in ((left, right), (right, left)):
                if (
                    isinstance(value, str | list | tuple)
                    and isinstance(times, int)
                    and len(value) * times > MAX_TEMPLATE_OUTPUT
                ):
                    raise TemplateError(
                        f"chat template builds a value of more than {MAX_TEMPLATE_OUTPUT:,} items"
                    )
        if (
            operator == "**"
            and isinstance(right, int)
            and isinstance(left, int)
            and abs(left) > 1
            and right > 4096
        ):
            raise TemplateError("chat template raises a number to a power too large to compute")
        return super().call_binop(context, operator, left, right)


def _bounded_render(template: Any, **context: Any) -> str:
    steps = 0

    def count(frame: Any, event: str, arg: Any) -> Any:
        nonlocal steps
        if event == "line":
            steps += 1
            if steps > MAX_TEMPLATE_STEPS:
                raise TemplateError(f"chat template takes more than {MAX_TEMPLATE_STEPS:,} steps to render")
        return count

    def trace(frame: Any, event: str, arg: Any) -> Any:
        # only the template's own compiled code is counted (and slowed), not jinja's or Python's
        return count if frame.f_code.co_filename == "<template>" else None

    parts: list[str] = []
    size = 0
    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        for part in template.generate(**context):
            size += len(part)
            if size > MAX_TEMPLATE_OUTPUT:
                raise TemplateError(f"chat template renders more than {MAX_TEMPLATE_OUTPUT:,} characters")
            parts.append(part)
    finally:
        sys.settrace(previous)
    return "".join(parts)


def _open_final_message(text: str, conversation: list[dict[str, Any]]) -> str:
    """The rendered chat cut after the final message's content, so generation continues it."""
    content = conversation[-1].get("content") if conversation else None
    if not isinstance(content, str) or not content.strip():
        raise TemplateError("continue_final_message needs a final message with text content")
    at = text.rfind(content.strip())
    if at < 0:
        raise TemplateError("continue_final_message: the final message's text is not in the rendered chat")
    return text[: at + len(content.strip())]
