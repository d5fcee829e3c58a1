"""The trainable soft prompts of the prompt-learning family, each an nn.Module whose `forward()` returns the tensor an
adapter saves (PEFT's `prompt_embeddings`) and whose `virtual()` hands that to core.forward:

- `SoftPrompt` (method `prompt`, prompt tuning): N trainable virtual-token vectors (fp32) placed in front of a frozen
  model's token embeddings;
- `PrefixEncoder` (method `prefix`, prefix tuning / P-tuning v2): per-layer keys and values of N virtual positions,
  learned directly [N, layers * 2 * kv_heads * head_dim], or, with `projection`, produced while training by PEFT's
  two-layer MLP (Linear, tanh, Linear) from N vectors; either way the saved tensor is the keys/values;
- `Cartridge` (method `cartridge`, PEFT's CARTRIDGE): per-layer keys/values of N virtual positions learned directly,
  the first `num_frozen_tokens` of them frozen (an attention sink);
- `PromptEncoder` (method `ptuning`, P-tuning): N vectors reparameterised by PEFT's MLP (3 linear layers with ReLU) or
  bidirectional LSTM + MLP; the saved tensor is the encoder's output, [N, hidden], as PEFT saves P_TUNING adapters;
- `MultitaskPrompt` (method `multitask`, PEFT's MULTITASK_PROMPT_TUNING): a shared prompt [N, hidden] and per-task
  low-rank factors, cols [tasks, N, ranks] and rows [tasks, ranks, hidden]; task t's prompt is the shared one times
  (cols[t] @ rows[t]) elementwise (`task_prompt`), an ordinary [N, hidden] input-embedding prompt.

`build_prompt(base, method, ...)` makes any of them.

Initialisation strategies (for a prefix learned directly and a cartridge: the keys/values the initial vectors produce
in a no-grad prefill of the frozen model, `prefill_kv`, so a fresh prefix starts where the same prompt-tuning init
starts; for a projected prefix and P-tuning: the encoder's input vectors):
- `text`: embeddings of a tokenised init text (N defaults to its token count; tiled or truncated otherwise);
- `vocab`: embedding rows sampled from frequent tokens;
- `random`: Gaussian with the embedding table's own mean and std (not N(0, 1), which is far off scale);
- `labels`: the task's label words (embeddings averaged over sub-tokens), the rest filled as `vocab`
  (Lester et al. 2021);
- `zero` (prefix, cartridge only): keys/values all zero (a projected prefix: the projection's last layer zeroed);
- from an existing adapter (prompt transfer): `formats.adapter.load_adapter(path).soft_prompt()`.
"""

from __future__ import annotations

import torch
from torch import nn

from softprompt.core import ENCODER_TYPES, FACTOR_INITS, INIT_METHODS, KV_METHODS, METHODS, MULTITASK_INITS
from softprompt.core.forward import Virtual, check_prefix_fits, flat_prefix, prefix_layout, prefix_width, prompt_kv

DEFAULT_INIT_TEXT = "The following is a conversation between a person and a robot."
# Frequent tokens: BPE vocabularies assign low ids to merges seen most often, so the first ids after the special
# tokens approximate "the 5,000 most frequent tokens" of Lester et al. without needing corpus counts.
FREQUENT_VOCAB = 5000


class SoftPrompt(nn.Module):
    """N learned embedding vectors, kept in fp32 whatever the base model's dtype."""

    method = "prompt"

    def __init__(self, embeddings: torch.Tensor, init: str = "random", init_text: str | None = None):
        super().__init__()
        if embeddings.ndim != 2 or embeddings.shape[0] < 1:
            raise ValueError(
                f"a soft prompt needs shape [num_virtual_tokens >= 1, hidden], got {tuple(embeddings.shape)}"
            )
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

    def virtual(self) -> Virtual:
        return Virtual(self(), self.method)

    def peft_fields(self) -> dict:
        """Method-specific adapter_config.json fields."""
        return {}

    @classmethod
    def initialise(
        cls,
        base,
        method: str = "text",
        num_virtual_tokens: int | None = None,
        init_text: str | None = None,
        label_words: list[str] | None = None,
        seed: int = 0,
    ) -> "SoftPrompt":
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
            choices = ", ".join(m for m in INIT_METHODS if m != "zero")
            raise ValueError(f"unknown init {method!r}: use one of {choices}")
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


class PrefixEncoder(nn.Module):
    """Prefix tuning: keys/values of N virtual positions for every layer, fp32.

    Without projection the trainable tensor is the prefix itself, `embedding` [N, width]; with projection it is
    `embedding` [N, hidden] and PEFT's `transform` (Linear(hidden, encoder_hidden_size), tanh,
    Linear(encoder_hidden_size, width)). width = layers x 2 x kv_heads x head_dim (forward.prefix_layout).
    """

    method = "prefix"

    def __init__(
        self,
        start: torch.Tensor,
        width: int,
        projection: bool = False,
        encoder_hidden_size: int | None = None,
        init: str = "random",
        init_text: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if start.ndim != 2 or start.shape[0] < 1:
            raise ValueError(f"a prefix needs shape [num_virtual_tokens >= 1, ...], got {tuple(start.shape)}")
        self.projection = projection
        self.width = width
        self.init, self.init_text = init, init_text
        self.embedding = nn.Parameter(start.detach().to(torch.float32).clone())
        self.encoder_hidden_size = encoder_hidden_size
        if projection:
            if not encoder_hidden_size:
                raise ValueError("a projected prefix needs its encoder_hidden_size")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.transform = nn.Sequential(
                    nn.Linear(start.shape[1], self.encoder_hidden_size),
                    nn.Tanh(),
                    nn.Linear(self.encoder_hidden_size, width),
                )
        else:
            if start.shape[1] != width:
                raise ValueError(f"a prefix for this model needs shape [N, {width}], got {tuple(start.shape)}")

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.shape[0]

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding) if self.projection else self.embedding

    def virtual(self) -> Virtual:
        return Virtual(self(), self.method)

    def peft_fields(self) -> dict:
        return {"prefix_projection": self.projection, "encoder_hidden_size": self.encoder_hidden_size}


class PromptEncoder(nn.Module):
    """P-tuning: N vectors `embedding` [N, hidden] through PEFT's prompt encoder (peft/tuners/p_tuning/model.py):
    `mlp`: Linear(hidden, e), ReLU, Linear(e, e), ReLU, Linear(e, hidden); `lstm`: a 2-layer bidirectional LSTM of
    hidden size e, then Linear(2e, 2e), ReLU, Linear(2e, hidden). Only the output is saved."""

    method = "ptuning"

    def __init__(
        self,
        start: torch.Tensor,
        encoder_hidden_size: int | None = None,
        encoder_type: str = "mlp",
        init: str = "random",
        init_text: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if encoder_type not in ENCODER_TYPES:
            raise ValueError(f"unknown encoder type {encoder_type!r}: use one of {', '.join(ENCODER_TYPES)}")
        if start.ndim != 2 or start.shape[0] < 1:
            raise ValueError(
                f"a P-tuning prompt needs shape [num_virtual_tokens >= 1, hidden], got {tuple(start.shape)}"
            )
        hidden = start.shape[1]
        self.encoder_type = encoder_type
        self.encoder_hidden_size = e = encoder_hidden_size or hidden
        self.init, self.init_text = init, init_text
        self.embedding = nn.Parameter(start.detach().to(torch.float32).clone())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if encoder_type == "lstm":
                self.lstm_head = nn.LSTM(hidden, e, num_layers=2, bidirectional=True, batch_first=True)
                self.mlp_head = nn.Sequential(nn.Linear(2 * e, 2 * e), nn.ReLU(), nn.Linear(2 * e, hidden))
            else:
                self.mlp_head = nn.Sequential(
                    nn.Linear(hidden, e), nn.ReLU(), nn.Linear(e, e), nn.ReLU(), nn.Linear(e, hidden)
                )

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.shape[0]

    def forward(self) -> torch.Tensor:
        if self.encoder_type == "lstm":
            return self.mlp_head(self.lstm_head(self.embedding.unsqueeze(0))[0])[0]
        return self.mlp_head(self.embedding)

    def virtual(self) -> Virtual:
        return Virtual(self(), self.method)

    def peft_fields(self) -> dict:
        return {
            "encoder_reparameterization_type": self.encoder_type.upper(),
            "encoder_hidden_size": self.encoder_hidden_size,
        }


class Cartridge(nn.Module):
    """A cartridge (PEFT's CARTRIDGE): the keys/values of N virtual positions for every layer, learned directly (no
    projection), fp32, [N, layers x 2 x kv_heads x head_dim] like a prefix and served exactly like one. The first
    `num_frozen_tokens` positions are a buffer, not a parameter: they never change (an attention sink, as the
    Cartridges paper recommends), so their gradient is zero and no optimiser, weight decay or clipping touches them.
    """

    method = "cartridge"

    def __init__(
        self,
        start: torch.Tensor,
        width: int,
        num_frozen_tokens: int = 1,
        init: str = "random",
        init_text: str | None = None,
    ):
        super().__init__()
        if start.ndim != 2 or start.shape[0] < 1 or start.shape[1] != width:
            raise ValueError(f"a cartridge for this model needs shape [N >= 1, {width}], got {tuple(start.shape)}")
        if not 0 <= num_frozen_tokens <= start.shape[0]:
            raise ValueError(
                f"num_frozen_tokens must be in 0..{start.shape[0]} (the virtual tokens), got {num_frozen_tokens}"
            )
        start = start.detach().to(torch.float32)
        self.width, self.init, self.init_text = width, init, init_text
        self.register_buffer("frozen", start[:num_frozen_tokens].clone())
        self.embedding = nn.Parameter(start[num_frozen_tokens:].clone())

    @property
    def num_frozen_tokens(self) -> int:
        return self.frozen.shape[0]

    @property
    def num_virtual_tokens(self) -> int:
        return self.frozen.shape[0] + self.embedding.shape[0]

    def forward(self) -> torch.Tensor:
        return torch.cat([self.frozen, self.embedding]) if self.num_frozen_tokens else self.embedding

    def virtual(self) -> Virtual:
        return Virtual(self(), self.method)

    def peft_fields(self) -> dict:
        return {"num_frozen_tokens": self.num_frozen_tokens}


FACTOR_STD = 0.02  # PEFT's initialisation of a multitask prompt's task factors: N(0, 0.02)


def task_prompt(shared: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor, task: int) -> torch.Tensor:
    """Task `task`'s prompt [N, hidden] of a multitask prompt: shared [N, hidden] * (cols[task] [N, ranks] @
    rows[task] [ranks, hidden]), in the factors' dtype (fp32), as PEFT's MultitaskPromptEmbedding computes it."""
    return shared * torch.matmul(cols[task], rows[task])


class MultitaskPrompt(nn.Module):
    """Multitask prompt tuning (PEFT's MULTITASK_PROMPT_TUNING): a shared prompt `embedding` [N, hidden] and, per task,
    low-rank factors `task_cols` [tasks, N, ranks] and `task_rows` [tasks, ranks, hidden], all fp32 and trained
    together. `forward()` returns the three tensors an adapter saves (PEFT's keys); `virtual(task)` is task's prompt,
    which core.forward uses as any prompt-tuning prompt."""

    method = "multitask"

    def __init__(
        self,
        shared: torch.Tensor,
        cols: torch.Tensor,
        rows: torch.Tensor,
        init: str = "random",
        init_text: str | None = None,
    ):
        super().__init__()
        check_factors(shared.shape, cols.shape, rows.shape)
        self.embedding = nn.Parameter(shared.detach().to(torch.float32).clone())
        self.task_cols = nn.Parameter(cols.detach().to(torch.float32).clone())
        self.task_rows = nn.Parameter(rows.detach().to(torch.float32).clone())
        self.init, self.init_text = init, init_text

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.shape[0]

    @property
    def num_tasks(self) -> int:
        return self.task_cols.shape[0]

    @property
    def num_ranks(self) -> int:
        return self.task_cols.shape[2]

    def forward(self) -> dict[str, torch.Tensor]:
        return {
            "prompt_embeddings": self.embedding,
            "prefix_task_cols": self.task_cols,
            "prefix_task_rows": self.task_rows,
        }

    def task_prompt(self, task: int) -> torch.Tensor:
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task {task} is out of range: this multitask prompt has tasks 0..{self.num_tasks - 1}")
        return task_prompt(self.embedding, self.task_cols, self.task_rows, task)

    def virtual(self, task: int | None = None) -> Virtual:
        if task is None:
            raise ValueError("a multitask prompt needs a task id (its prompt differs per task)")
        return Virtual(self.task_prompt(task), self.method)

    def peft_fields(self) -> dict:
        return {"num_tasks": self.num_tasks, "num_ranks": self.num_ranks}


def check_factors(shared: tuple, cols: tuple, rows: tuple) -> None:
    """Raise ValueError unless shapes [N, hidden], [tasks, N, ranks], [tasks, ranks, hidden] fit together."""
    ok = len(shared) == 2 and len(cols) == 3 and len(rows) == 3 and min(*shared, *cols, *rows) >= 1
    if not ok or cols[1] != shared[0] or rows[2] != shared[1] or rows[0] != cols[0] or rows[1] != cols[2]:
        raise ValueError(
            f"a multitask prompt needs shapes [N, hidden], [tasks, N, ranks], [tasks, ranks, hidden], got "
            f"{tuple(shared)}, {tuple(cols)}, {tuple(rows)}"
        )


def multitask_factors(
    num_tasks: int,
    num_virtual_tokens: int,
    hidden: int,
    num_ranks: int = 1,
    seed: int = 0,
    source: tuple[torch.Tensor, torch.Tensor] | None = None,
    mode: str = "average-tasks",
    source_task: int = 0,
    start: str = "near-one",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Task factors (cols, rows) for a new multitask prompt. Fresh ones (no `source`, or `shared-only`): `near-one`,
    1/sqrt(ranks) plus N(0, 0.02) noise (seeded; the noise tells the ranks apart), so cols[t] @ rows[t] is about 1
    and every task's prompt starts at the shared prompt; or `peft`, N(0, 0.02) as PEFT draws them, so every task's
    prompt starts near zero. From the `source` adapter's factors: their mean over its tasks (`average-tasks`) or its
    task `source_task`'s (`exact-task`), copied to every task (PEFT's AVERAGE_SOURCE_TASKS / EXACT_SOURCE_TASK, which
    give a one-task target these same values); `shared-only` (ONLY_SOURCE_SHARED) draws fresh factors."""
    if mode not in MULTITASK_INITS:
        raise ValueError(f"unknown multitask init {mode!r}: use one of {', '.join(MULTITASK_INITS)}")
    if start not in FACTOR_INITS:
        raise ValueError(f"unknown factor init {start!r}: use one of {', '.join(FACTOR_INITS)}")
    if source is None or mode == "shared-only":
        generator = torch.Generator().manual_seed(seed)
        cols = torch.randn(num_tasks, num_virtual_tokens, num_ranks, generator=generator) * FACTOR_STD
        rows = torch.randn(num_tasks, num_ranks, hidden, generator=generator) * FACTOR_STD
        if start == "near-one":
            cols, rows = cols + num_ranks**-0.5, rows + num_ranks**-0.5
        return cols, rows
    cols, rows = (t.detach().to(torch.float32) for t in source)
    if mode == "exact-task":
        if not 0 <= source_task < cols.shape[0]:
            raise ValueError(f"task {source_task} is out of range: the source has tasks 0..{cols.shape[0] - 1}")
        cols, rows = cols[source_task], rows[source_task]
    else:
        cols, rows = cols.mean(0), rows.mean(0)
    expected = ((num_virtual_tokens, num_ranks), (num_ranks, hidden))
    if (tuple(cols.shape), tuple(rows.shape)) != expected:
        raise ValueError(
            f"the source's task factors are {tuple(cols.shape)} and {tuple(rows.shape)}, this prompt needs "
            f"{expected[0]} and {expected[1]} (same --num-virtual-tokens and --num-ranks)"
        )
    return cols.expand(num_tasks, -1, -1).clone(), rows.expand(num_tasks, -1, -1).clone()


def build_prompt(
    base,
    method: str = "prompt",
    init: str = "vocab",
    num_virtual_tokens: int | None = None,
    init_text: str | None = None,
    label_words: list[str] | None = None,
    seed: int = 0,
    *,
    prefix_projection: bool = False,
    encoder_hidden_size: int | None = None,
    encoder_type: str = "mlp",
    num_frozen_tokens: int = 1,
    num_tasks: int = 1,
    num_ranks: int = 1,
    factor_init: str = "near-one",
) -> nn.Module:
    """A fresh trainable soft prompt of `method` (see METHODS) for `base` (a models.FrozenModel), on its device.

    For a prefix (without projection) and a cartridge every init is a no-grad prefill: the keys/values the frozen model
    computes for the init's vectors at positions 0..N-1 (for `text`, its first N tokens); `zero` starts them at zero
    (for a projected prefix: the projection's last layer is zeroed, so its output, the keys/values, starts at zero).
    A multitask prompt's shared prompt takes the init; its `num_tasks` x `num_ranks` task factors start per
    `factor_init` (see multitask_factors)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if init == "zero" and method not in KV_METHODS:
        raise ValueError(f"init 'zero' is for the key/value methods ({', '.join(KV_METHODS)}), not {method!r}")
    seed_init = "vocab" if init == "zero" else init  # a projected prefix's MLP still needs non-zero inputs
    start = SoftPrompt.initialise(base, seed_init, num_virtual_tokens, init_text, label_words, seed)
    start.init = init
    if method == "prompt":
        return start
    if method == "multitask":
        cols, rows = multitask_factors(
            num_tasks, start.num_virtual_tokens, start.hidden_size, num_ranks, seed, start=factor_init
        )
        return MultitaskPrompt(start.embeddings, cols, rows, init, start.init_text).to(base.device)
    if method == "ptuning":
        return PromptEncoder(start.embeddings, encoder_hidden_size, encoder_type, start.init, start.init_text, seed).to(
            base.device
        )
    layers, kv_heads, head_dim = prefix_layout(base.model)
    check_prefix_fits(base.model)
    width = layers * 2 * kv_heads * head_dim
    projected = method == "prefix" and prefix_projection
    vectors = start.embeddings if projected else prefill_kv(base, start.embeddings, zero=init == "zero")
    if method == "cartridge":
        return Cartridge(vectors, width, num_frozen_tokens, init, start.init_text).to(base.device)
    # PEFT's default encoder_hidden_size for a prefix is its token_dim, kv_heads x head_dim (recorded either way)
    encoder_hidden_size = encoder_hidden_size or kv_heads * head_dim
    prefix = PrefixEncoder(vectors, width, projected, encoder_hidden_size, init, start.init_text, seed)
    if projected and init == "zero":
        with torch.no_grad():
            prefix.transform[-1].weight.zero_()
            prefix.transform[-1].bias.zero_()
    return prefix.to(base.device)


def prefill_kv(base, vectors: torch.Tensor, zero: bool = False) -> torch.Tensor:
    """The flat keys/values [N, layers * 2 * kv_heads * head_dim] (fp32) of a no-grad prefill of input vectors [N,
    hidden] (e.g. the embeddings of an init text's first N tokens) at positions 0..N-1; zeros of that shape with
    `zero`. One implementation for every key/value init of a prefix and a cartridge."""
    if zero:
        return torch.zeros(vectors.shape[0], prefix_width(base.model))
    with torch.no_grad():
        kv, _ = prompt_kv(base.model, vectors.to(base.device))
    return flat_prefix(kv).cpu()
