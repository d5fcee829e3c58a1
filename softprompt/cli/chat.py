"""`softprompt chat`: flags generated from inference.config.ChatConfig."""

from __future__ import annotations

import argparse
import sys

from softprompt.cli.args import config_from_args
from softprompt.inference.config import ChatConfig

HELP = "chat interactively with a base model and an optional adapter (streamed answers)"
DESCRIPTION = ("Read messages from stdin, one per line; print each answer as it is generated. Commands: /reset "
               "forgets the conversation, /quit leaves.")

OPTIONS = (ChatConfig,)


def run(args: argparse.Namespace) -> int:
    from softprompt.core.models import load_base
    from softprompt.data.templates import CHAT
    from softprompt.inference.chat import Conversation, chat_loop
    from softprompt.inference.generate import add_adapter, build_engine

    config = config_from_args(ChatConfig, args)
    base = load_base(config.model, device=config.device, dtype=config.dtype)
    engine = build_engine(base, config.chat_template)
    name = add_adapter(engine, config.adapter)
    if engine.template(name).spec != CHAT:
        print("softprompt chat: this template has no turns; each message is answered on its own "
              "(use --chat-template for multi-turn with the base model's chat template)", file=sys.stderr)
    conversation = Conversation(engine, name, config.sampling(), config.max_new_tokens, config.stop, config.seed,
                                config.system)
    return chat_loop(conversation, sys.stdin, sys.stdout, sys.stderr)
