"""ROUGE-L (longest common subsequence F-measure) and exact match, dependency-free.

Tokens are lower-cased whitespace-separated words, except that every CJK character (and other characters of
scripts written without spaces) is a token of its own, so Chinese answers are compared character by character.
"""

from __future__ import annotations

import re
import unicodedata

# CJK ideographs, kana, hangul syllables, and CJK / full-width punctuation: one token per character.
_CJK = (
    r"\u3000-\u303f\u3040-\u309f\u30a0-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
    r"\uff00-\uffef"
)
_TOKEN = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")


def tokenize(text: str) -> list[str]:
    """Lower-cased words; CJK characters one by one."""
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 between two texts, in [0, 1]; 1.0 when both are empty."""
    pred, ref = tokenize(prediction), tokenize(reference)
    if not pred and not ref:
        return 1.0
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def normalize_answer(text: str) -> str:
    """What exact match compares: NFKC, case-folded, whitespace collapsed, trailing period stripped."""
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return text.rstrip(".。").strip()


def exact_match(prediction: str, reference: str) -> bool:
    """Whether two answers are equal after `normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(reference)
