"""`softprompt chat`: flags generated from inference.config.ChatConfig."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from softprompt.cli.args import config_from_args
from softprompt.data.records import check_unicode
from softprompt.inference.config import ChatConfig

HELP = "chat interactively with a base model and an optional adapter (streamed answers)"
DESCRIPTION = (
    "Read messages from stdin, one per line; print each answer as it is generated. Commands: /reset "
    "forgets the conversation, /quit leaves."
)

OPTIONS = (ChatConfig,)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(ChatConfig, args)  # every flag checked before the model loads (seconds)
    from softprompt.core.models import load_base
    from softprompt.data.templates import CHAT
    from softprompt.inference.chat import Conversation, chat_loop
    from softprompt.inference.generate import add_adapter, build_engine

    base = load_base(config.model, device=config.device, dtype=config.dtype)
    engine = build_engine(base, config.chat_template)
    name = add_adapter(engine, config.adapter, config.task)
    if engine.template(name).spec != CHAT:
        print(
            "softprompt chat: this template has no turns; each message is answered on its own "
            "(use --chat-template for multi-turn with the base model's chat template)",
            file=sys.stderr,
        )
    conversation = Conversation(
        engine, name, config.sampling(), config.max_new_tokens, config.stop, config.seed, config.system
    )
    return chat_loop(conversation, CheckedLines(sys.stdin), sys.stdout, sys.stderr)


class CheckedLines:
    """A text stream whose lines are checked to be valid Unicode as they are read, each error naming
    `<stdin>:line`. Python decodes stdin with surrogateescape under a C or UTF-8 locale, so bytes that are not
    UTF-8 would arrive as surrogates that no tokenizer can take; a strict stream is switched to surrogateescape so
    that the same message is given."""

    def __init__(self, stream: TextIO, name: str = "<stdin>"):
        if hasattr(stream, "reconfigure") and getattr(stream, "errors", None) == "strict":
            stream.reconfigure(errors="surrogateescape")
        self.stream, self.name, self.number = stream, name, 0

    def isatty(self) -> bool:
        return self.stream.isatty()

    def readline(self) -> str:
        line = self.stream.readline()
        if line:
            self.number += 1
            check_unicode(line, f"{self.name}:{self.number}", raw=True)
        return line
