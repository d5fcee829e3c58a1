"""Label words found in the data: classification-like answers used as label words, and each example's class.

Only the tokenizer is used (to check a word is not empty once tokenised); no model runs here.
"""

from __future__ import annotations

# Classification-like data (detect_label_words): at most this many distinct answers over at least this many records,
# each answer seen at least twice and short: at most this many words and characters (a few tokens with any
# subword tokenizer; counted without one, so the rule does not depend on the model).
AUTO_LABELS_MAX_ANSWERS = 10
AUTO_LABELS_MIN_RECORDS = 20
AUTO_LABELS_MAX_WORDS = 3
AUTO_LABELS_MAX_CHARS = 24


def detect_label_words(outputs: list[str], tokenizer, num_virtual_tokens: int) -> list[str] | None:
    """The distinct answers (in order of first appearance) when the data looks like classification: 2 to
    AUTO_LABELS_MAX_ANSWERS distinct answers over at least AUTO_LABELS_MIN_RECORDS records, each short (at most
    AUTO_LABELS_MAX_WORDS words and AUTO_LABELS_MAX_CHARS characters, no comma), seen at least twice, non-empty once
    tokenised, and no more of them than virtual tokens (they initialise the prompt); else None."""
    if len(outputs) < AUTO_LABELS_MIN_RECORDS:
        return None
    counts: dict[str, int] = {}
    for out in outputs:
        counts[out] = counts.get(out, 0) + 1
        if len(counts) > AUTO_LABELS_MAX_ANSWERS:
            return None
    words = list(counts)
    if len(words) < 2 or len(words) > num_virtual_tokens or min(counts.values()) < 2:
        return None
    if any(
        not w.strip()
        or "," in w
        or len(w) > AUTO_LABELS_MAX_CHARS
        or len(w.split()) > AUTO_LABELS_MAX_WORDS
        or not tokenizer(w, add_special_tokens=False)["input_ids"]
        for w in words
    ):
        return None
    return words


def example_classes(examples: list, records: list, label_words: list[str] | None) -> list[int] | None:
    """Each example's class (the index of its record's answer among the label words; examples and records are
    matched by `where`), or None unless every answer is one."""
    if not label_words:
        return None
    output = {r.where: r.output for r in records}
    classes = [label_words.index(output[e.where]) if output[e.where] in label_words else -1 for e in examples]
    return None if -1 in classes else classes
