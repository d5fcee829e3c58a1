"""CPT's context: in-context examples picked from the training records and tokenised with PEFT's token types.

`pick_context` chooses the examples (seeded; with label words, the classes in turn), `encode_context` tokenises them
with the template exactly as training rows are tokenised (prompt, then answer + EOS) and gives every token its type
as PEFT's CPT defines them (peft/tuners/cpt): in example j (0-based) the template's own text before the record's last
field is the input template (4j + 1), the record's instruction and input are the input (4j + 2), the template's text
after them the output template (4j + 3), and the answer with its EOS the output (4j + 4). Which token belongs to which
part is read from the tokenizer's character offsets, so the ids are those `templates.encode_example` gives.

No model runs here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from softprompt.data.records import DataError, Record
from softprompt.data.templates import HUMAN_ASSISTANT, Template, encode_text

# Stand-ins for a record's fields while the template is formatted, to find where they land (no template strips them).
_SENTINELS = ("\ue000instruction\ue001", "\ue000input\ue001")


@dataclass(frozen=True)
class Context:
    """The tokens of CPT's in-context examples and their PEFT token types (`cpt_token_ids`, `cpt_tokens_type_mask`)."""

    token_ids: list[int]
    type_mask: list[int]
    examples: list[str]  # where each example came from ("file:line")

    def __len__(self) -> int:
        return len(self.token_ids)


def pick_context(records: list[Record], count: int, seed: int, label_words: list[str] | None = None) -> list[Record]:
    """`count` records (all of them when there are fewer) in a seeded random order; when every answer is one of the
    label words, the classes take turns (in label-word order), so a few examples cover every class."""
    order = list(records)
    random.Random(seed).shuffle(order)
    if label_words and all(r.output in label_words for r in order):
        queues = [[r for r in order if r.output == w] for w in label_words]
        order = []
        while any(queues):
            order += [q.pop(0) for q in queues if q]
    return order[:count]


def encode_context(records: list[Record], tokenizer, template: Template) -> Context:
    """The examples tokenised one after another with their token types (see the module docstring)."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("--method cpt needs a fast tokenizer (it reads token offsets to type the context's tokens)")
    ids, types = [], []
    for j, record in enumerate(records):
        text, spans = _prompt_spans(template, record, tokenizer)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        last = max((end for _, end in spans), default=0)
        for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
            inside = any(start < e and s < end for s, e in spans)
            kind = 2 if inside else 1 if start < last else 3
            ids.append(token)
            types.append(4 * j + kind)
        target = encode_text(tokenizer, template.target(record.output, tokenizer))
        ids += target
        types += [4 * j + 4] * len(target)
    return Context(ids, types, [r.where for r in records])


def _prompt_spans(template: Template, record: Record, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The record's prompt text and the character spans of its own fields in it (none found: no spans)."""
    text = template.prompt(record.instruction, record.input, tokenizer)
    plain = template.spec not in (HUMAN_ASSISTANT, "chat")  # a user template inserts the fields unstripped
    values = [record.instruction, record.input]
    values = values if plain else [v.strip() for v in values]
    marked = template.prompt(_SENTINELS[0], _SENTINELS[1] if values[1] else "", tokenizer)
    spans, rebuilt, rest = [], "", marked
    while True:
        found = [(rest.find(s), k) for k, s in enumerate(_SENTINELS) if s in rest]
        if not found:
            break
        at, k = min(found)
        rebuilt += rest[:at]
        spans.append((len(rebuilt), len(rebuilt) + len(values[k])))
        rebuilt += values[k]
        rest = rest[at + len(_SENTINELS[k]) :]
    rebuilt += rest
    return text, ([s for s in spans if s[1] > s[0]] if rebuilt == text else [])
