"""`softprompt chat`: an interactive loop — type a message, watch the answer stream in.

Reads one message per line from stdin (so it also works with piped input), prints each answer as it is generated
followed by a newline. `/reset` forgets the conversation, `/quit` (or end of input) leaves. With the model's chat
template every turn is sent; other templates (human-assistant, user templates, an adapter's saved one) have no
notion of turns, so only the latest message is used.
"""

from __future__ import annotations

from typing import TextIO

from softprompt.inference.batch import GenerationRequest
from softprompt.inference.engine import Engine


class Conversation:
    """The message history and how one more turn is generated."""

    def __init__(
        self,
        engine: Engine,
        adapter: str | None,
        settings: dict,
        max_new_tokens: int,
        stop=(),
        seed: int | None = None,
        system: str | None = None,
    ):
        self.engine, self.adapter, self.settings = engine, adapter, settings
        self.max_new_tokens, self.stop, self.seed, self.system = max_new_tokens, tuple(stop), seed, system
        self.turns = 0
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def request(self, text: str) -> GenerationRequest:
        """The next request; the oldest turns are dropped while the conversation does not fit the context."""
        self.messages.append({"role": "user", "content": text})
        while True:
            request = GenerationRequest(
                self.engine.encode_chat(self.messages, self.adapter),
                adapter=self.adapter,
                max_new_tokens=self.max_new_tokens,
                stop=self.stop,
                seed=None if self.seed is None else self.seed + self.turns,
                **self.settings,
            )
            try:
                self.engine.check(request)
                return request
            except ValueError:
                first = 1 if self.system else 0
                if len(self.messages) - first <= 1:
                    self.messages.pop()
                    raise
                del self.messages[first : first + 2]

    def reply(self, text: str, out: TextIO) -> str:
        """Generate the answer to one user message, writing it to `out` as it is produced."""
        request = self.request(text)
        pieces = []
        for event in self.engine.stream(request):
            if event.text:
                pieces.append(event.text)
                out.write(event.text)
                out.flush()
        out.write("\n")
        out.flush()
        answer = "".join(pieces)
        self.messages.append({"role": "assistant", "content": answer})
        self.turns += 1
        return answer


def chat_loop(conversation: Conversation, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    """Run the read-generate-print loop until /quit or end of input."""
    interactive = stdin.isatty()
    while True:
        if interactive:
            stderr.write("you> ")
            stderr.flush()
        line = stdin.readline()
        if not line:
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            return 0
        if text == "/reset":
            conversation.reset()
            stderr.write("(conversation cleared)\n")
            continue
        if interactive:
            stderr.write("assistant> ")
            stderr.flush()
        conversation.reply(text, stdout)
