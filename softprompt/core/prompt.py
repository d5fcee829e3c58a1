"""The soft prompt: N trainable virtual-token vectors (fp32) placed in front of a frozen model's token embeddings.

Initialisation strategies:
- `text`: embeddings of a tokenised init text (N defaults to its token count; tiled or truncated otherwise);
- `vocab`: embedding rows sampled from frequent tokens;
- `random`: Gaussian with the embedding table's own mean and std (not N(0, 1), which is far off scale);
- `labels`: the task's label words (embeddings averaged over sub-tokens), the rest filled as `vocab`
  (Lester et al. 2021);
- from an existing adapter (prompt transfer): `formats.adapter.load_adapter(path).soft_prompt()`.
"""

from __future__ import annotations


import torch
from torch import nn

from softprompt.core import INIT_METHODS
DEFAULT_INIT_TEXT = "The following is a conversation between a person and a robot."
# Frequent tokens: BPE vocabularies assign low ids to merges seen most often, so the first ids after the special
# tokens approximate "the 5,000 most frequent tokens" of Lester et al. without needing corpus counts.
FREQUENT_VOCAB = 5000


class SoftPrompt(nn.Module):
    """N learned embedding vectors, kept in fp32 whatever the base model's dtype."""

    def __init__(self, embeddings: torch.Tensor, init: str = "random", init_text: str | None = None):
        super().__init__()
        if embeddings.ndim != 2 or embeddings.shape[0] < 1:
            raise ValueError("a soft prompt needs shape [num_virtual_tokens >= 1, hidden], "
                             f"got {tuple(embeddings.shape)}")
        self.embeddings = nn.Parameter(embeddings.detach().to(torch.float32).clone())
        self.init = init
        self.init_text = init_text

    @property
    def num_virtual_tokens(self) -> int:
        return self.embeddings.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.embeddings.shape[1]

    def forward(self) -> torch.Tensor:
        return self.embeddings

    @classmethod
    def initialise(cls, base, method: str = "text", num_virtual_tokens: int | None = None,
                   init_text: str | None = None, label_words: list[str] | None = None,
                   seed: int = 0) -> "SoftPrompt":
        """Build a fresh soft prompt for `base` (a models.FrozenModel) with one of INIT_METHODS."""
        table = base.model.get_input_embeddings().weight.detach().float().cpu()
        generator = torch.Generator().manual_seed(seed)
        if method == "text":
            text = init_text or DEFAULT_INIT_TEXT
            # With special tokens, as PEFT does, so PEFT-initialised and softprompt-initialised prompts agree.
            ids = base.tokenizer(text)["input_ids"]
            if not ids:
                raise ValueError(f"init text {text!r} tokenises to nothing")
            n = num_virtual_tokens or len(ids)
            ids = (ids * (n // len(ids) + 1))[:n]
            vectors = table[torch.tensor(ids)]
            return cls(vectors, init="text", init_text=text).to(base.device)
        n = num_virtual_tokens or 20
        if method == "vocab":
            vectors = table[_sample_vocab(table.shape[0], n, base.tokenizer, generator)]
        elif method == "random":
            vectors = torch.randn(n, table.shape[1], generator=generator) * table.std() + table.mean()
        elif method == "labels":
            if not label_words:
                raise ValueError("init 'labels' needs label words (--label-words negative,positive)")
            rows = [table[torch.tensor(_word_ids(base.tokenizer, w))].mean(0) for w in label_words]
            if len(rows) > n:
                raise ValueError(f"{len(rows)} label words do not fit in {n} virtual tokens")
            rest = table[_sample_vocab(table.shape[0], n - len(rows), base.tokenizer, generator)]
            vectors = torch.cat([torch.stack(rows), rest]) if len(rest) else torch.stack(rows)
        else:
            raise ValueError(f"unknown init {method!r}: use one of {', '.join(INIT_METHODS)}")
        return cls(vectors, init=method).to(base.device)


def _word_ids(tokenizer, word: str) -> list[int]:
    # A label word follows a space in running text, so embed " word" (falling back to "word").
    ids = tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]
    return ids or tokenizer(word, add_special_tokens=False)["input_ids"]


def _sample_vocab(vocab_size: int, n: int, tokenizer, generator: torch.Generator) -> torch.Tensor:
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    pool = [i for i in range(min(vocab_size, FREQUENT_VOCAB + len(special))) if i not in special]
    picks = torch.randperm(len(pool), generator=generator)[:n]
    if n > len(pool):
        picks = torch.randint(len(pool), (n,), generator=generator)
    return torch.tensor(pool)[picks]
