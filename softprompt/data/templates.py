"""Prompt templates: how a record (instruction / input / output) becomes prompt text and target text.

One implementation shared by train, eval, generate and serve, and saved with every adapter, so that a soft prompt
is always used with the formatting it was trained on.

- `human-assistant` (the default): "Human: " + instruction + "\\n" + input (stripped), then "\\n\\nAssistant: ";
  the target is the output followed by EOS. (`reference`, its name in older adapter folders, is accepted too.)
- `chat`: the base model's own chat template (a single user message holding instruction and input).
- any other string: a user template with `{instruction}` and `{input}` placeholders, e.g.
  "Review: {instruction}\\nSentiment:".
"""

from __future__ import annotations

import string
from dataclasses import dataclass

HUMAN_ASSISTANT = "human-assistant"
LEGACY_NAMES = {"reference": HUMAN_ASSISTANT}  # names older softprompt.json files may hold
CHAT = "chat"
PLACEHOLDERS = ("instruction", "input")  # the only fields a user template may name, each plain: {instruction}
_FORMATTER = string.Formatter()


class TemplateError(ValueError):
    """A template string that cannot be used."""


@dataclass(frozen=True)
class Template:
    """A named or user-written prompt format."""

    spec: str = HUMAN_ASSISTANT

    def __post_init__(self) -> None:
        if not isinstance(self.spec, str):
            raise TemplateError(f"a template must be a string, got {type(self.spec).__name__} {self.spec!r:.60}")
        if self.spec in LEGACY_NAMES:
            object.__setattr__(self, "spec", LEGACY_NAMES[self.spec])
        if self.spec in (HUMAN_ASSISTANT, CHAT):
            return
        try:
            placeholders = [
                (name, spec, conv) for _, name, spec, conv in _FORMATTER.parse(self.spec) if name is not None
            ]
        except ValueError as err:
            raise TemplateError(
                f"template {self.spec!r} has a stray brace ({err}); write a literal brace as {{{{ or }}}}"
            ) from err
        for name, spec, conv in placeholders:
            if name not in PLACEHOLDERS or spec or conv:
                text = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
                raise TemplateError(
                    f"template {self.spec!r} has the placeholder {text}; only {{instruction}} and "
                    "{input} are allowed (no index, attribute, conversion or format spec)"
                )
        if not any(name == "instruction" for name, _, _ in placeholders):
            raise TemplateError(
                f"template {self.spec!r} must be 'human-assistant', 'chat', or a string containing {{instruction}} "
                "(and optionally {input})"
            )

    def prompt(self, instruction: str, input: str = "", tokenizer=None) -> str:
        """The text the model sees before the answer."""
        if self.spec == HUMAN_ASSISTANT:
            body = instruction.strip()
            if input and input.strip():
                body = f"{body}\n{input.strip()}"
            return f"Human: {body}\n\nAssistant: "
        if self.spec == CHAT:
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise TemplateError("the chat template was requested but the base model's tokenizer has none")
            content = instruction.strip()
            if input and input.strip():
                content = f"{content}\n{input.strip()}"
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
        return self.spec.format(instruction=instruction, input=input)

    def chat_prompt(self, messages: list[dict], tokenizer=None) -> str:
        """Format a chat conversation. With the chat template all turns are used; otherwise the last user message
        is the instruction (the format the adapter was trained on has no notion of turns)."""
        if self.spec == CHAT:
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise TemplateError("the chat template was requested but the base model's tokenizer has none")
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        users = [m for m in messages if m.get("role") == "user"]
        if not users:
            raise TemplateError("a chat request needs at least one message with role 'user'")
        return self.prompt(str(users[-1].get("content", "")), "", tokenizer)

    def target(self, output: str, tokenizer) -> str:
        """The text the model learns to produce: the answer then EOS."""
        return output + (tokenizer.eos_token or "")

    def to_json(self) -> str:
        return self.spec

    @classmethod
    def from_json(cls, value: str | None) -> "Template":
        return cls(value or HUMAN_ASSISTANT)


def encode_example(
    template: Template, tokenizer, instruction: str, input: str, output: str, max_length: int
) -> tuple[list[int], list[int], bool]:
    """Tokenise one training record: ids, labels (-100 on the prompt), and whether it was truncated.

    Prompt and target are tokenised separately so the prompt/answer boundary is exact. Raises ValueError when the
    prompt alone fills max_length (there would be nothing to learn from).
    """
    prompt_ids = encode_text(tokenizer, template.prompt(instruction, input, tokenizer))
    target_ids = encode_text(tokenizer, template.target(output, tokenizer))
    if len(prompt_ids) >= max_length:
        raise ValueError(f"the prompt alone is {len(prompt_ids)} tokens, which fills max_length={max_length}")
    ids = (prompt_ids + target_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + target_ids)[:max_length]
    return ids, labels, len(prompt_ids) + len(target_ids) > max_length


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of a text without special tokens added (templates carry their own)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]
