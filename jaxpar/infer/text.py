"""Text in and out of token ids: incremental detokenisation with stop strings, and chat templates.

A tokenizer here is anything with `encode(text) -> list[int]` and `decode(ids) -> str` (and optionally
`chat_template`, `stop_token_ids`): jaxpar.data.tokenizer's ByteTokenizer (byte-level runs) and
HFTokenizer (a Hugging Face tokenizer.json).
"""

from __future__ import annotations

import functools

import jinja2
import jinja2.sandbox

from jaxpar.data.tokenizer import ByteTokenizer, HFTokenizer

__all__ = ["ByteTokenizer", "HFTokenizer", "TextStream", "apply_chat_template"]


class TextStream:
    """The completion's text as tokens arrive. `push(token)` returns (new text safe to show, whether a
    stop string appeared). Held back: a trailing incomplete UTF-8 character (decoded as U+FFFD until its
    last byte comes) and, with stop strings, the tail that could still become one. `text` is the
    completion so far, cut before the first stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""
        self.shown = 0

    def push(self, token: int) -> tuple[str, bool]:
        self.ids.append(token)
        if self.tokenizer is None:
            return "", False
        self.text = self.tokenizer.decode(self.ids)
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self.flush(), True
        safe = len(self.text.rstrip("\ufffd"))
        if self.stop:
            safe = min(safe, len(self.text) - max(len(s) for s in self.stop) + 1)
        return self._show(safe), False

    def flush(self) -> str:
        """Everything not shown yet (the request is finishing)."""
        return self._show(len(self.text))

    def _show(self, upto: int) -> str:
        delta = self.text[self.shown : upto] if upto > self.shown else ""
        self.shown = max(self.shown, upto)
        return delta


@functools.cache
def _compiled(template: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template)


def apply_chat_template(template: str, messages: list[dict]) -> str:
    """The prompt text of a chat: a Hugging Face style Jinja chat template rendered (sandboxed) with
    `messages` ([{"role", "content"}]) and add_generation_prompt=True."""
    return _compiled(template).render(messages=messages, add_generation_prompt=True)
