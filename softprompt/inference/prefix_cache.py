"""The automatic prefix cache: keys/values of prompt tokens that many requests share (a system prompt, a template's
fixed text), kept per adapter and reused instead of being recomputed.

After the soft prompt, a prompt token sits at position N + t and attends only to the soft prompt and the tokens
before it, so its keys/values (per layer, already rotated) depend only on the adapter and on the token ids up to and
including it. The cache stores them in blocks of `block_tokens` tokens. A block is keyed by its owner (an adapter's
identity: `PromptCache.identity`, new for every load, so a replaced adapter never meets its predecessor's blocks),
its parent block and its own token ids; a block is therefore found exactly when the whole prefix up to its end
matches (a trie: no hashing of long prefixes, no collisions). `match` walks a prompt's blocks from the start to the
first miss, always leaving at least one token to run (its logits choose the first new token); the engine puts the
found keys/values after the row's soft prompt and runs only the rest, at positions N + cached, N + cached + 1, ...
After the prefill, `store` keeps the prompt's new full blocks.

Memory is bounded: at most `max_bytes` of block tensors (on the model's device) once each `store` returns, least
recently used blocks evicted first. Every lookup and store touches a path from its last block back to its first, so a block is always more
recently used than its descendants: eviction takes leaves first and never leaves a block unreachable. `retain` drops
the blocks of owners that are gone (removed or replaced adapters). All methods take one lock, so the server's worker
thread and a /health request can use the cache at once.

Pinned prefixes (`pin`): the blocks of a prompt start that must stay (a long document many requests ask about, a
system prompt) are never evicted; they count against `max_bytes` (what is left is shared LRU by everything else).
A pin covers a whole path from the first block, so eviction still never strands a block.
Pins end with `unpin` or when their adapter is removed or replaced (`retain`).

What is exact: a cached block holds the tensors any prefill of a prompt with the same start computes for those
tokens (in row-exact mode the engine runs a prefill's attention in chunks of `block_tokens` aligned to the prompt's
start, so a block does not depend on what follows it), and the engine runs the rest of the prompt on top of them.
In row-exact mode (below fp32) the rows' tokens and logits are then bit for bit those of an uncached prefill, also
when another prompt stored the blocks (tests check); in fp32, where the engine keeps batched kernels whose summation order
follows the shapes, the logits agree to rounding (up to 4.5e-5 measured on SmolLM2-135M with ~680-token prompts; the
greedy tokens were equal in every test).
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

ROOT = -1  # the parent of a prompt's first block


@dataclass(frozen=True)
class _Key:
    owner: int  # the adapter's identity (PromptCache.identity)
    parent: int  # the previous block's id, ROOT for a prompt's first block
    tokens: tuple[int, ...]  # this block's token ids


@dataclass(frozen=True)
class _Block:
    id: int
    key: _Key
    kv: torch.Tensor  # [layers, 2 (keys, values), kv_heads, block_tokens, head_dim]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


@dataclass
class PrefixCacheStats:
    """Counters since the cache was made, and what it holds now."""

    block_tokens: int
    max_bytes: int
    lookups: int = 0  # prompts looked up
    hits: int = 0  # of them, prompts that found at least one block
    prompt_tokens: int = 0  # tokens of the prompts looked up
    cached_tokens: int = 0  # of them, tokens whose keys/values came from the cache (not recomputed)
    stored_blocks: int = 0
    evicted_blocks: int = 0  # evicted for room (LRU) or dropped with their adapter
    blocks: int = 0  # held now
    bytes: int = 0  # held now
    pinned_blocks: int = 0  # of them, pinned (never evicted)
    pinned_bytes: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class PrefixCache:
    """Per-adapter keys/values of shared prompt prefixes, in blocks, bounded by `max_bytes` (LRU eviction).

    One cache serves one base model (block shapes and owners are that model's)."""

    def __init__(self, max_bytes: int, block_tokens: int = 16):
        if not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an integer >= 0, got {max_bytes!r}")
        if not isinstance(block_tokens, int) or block_tokens < 1:
            raise ValueError(f"block_tokens must be an integer >= 1, got {block_tokens!r}")
        self.max_bytes, self.block_tokens = max_bytes, block_tokens
        self._blocks: OrderedDict[_Key, _Block] = OrderedDict()  # least recently used first
        self._owners: dict[int, int] = {}  # owner -> number of blocks held
        self._pinned: set[_Key] = set()
        self._ids = itertools.count()
        self._stats = PrefixCacheStats(block_tokens, max_bytes)
        self._lock = threading.Lock()

    def match(self, owner: int, ids: Sequence[int]) -> torch.Tensor | None:
        """Keys/values [layers, 2, kv_heads, cached, head_dim] of the longest cached prefix of `ids` (whole blocks,
        at least one token left over), or None when the first block is not cached."""
        with self._lock:
            path = self._walk(owner, ids)
            self._touch(path)
            stats = self._stats
            stats.lookups += 1
            stats.prompt_tokens += len(ids)
            if path:
                stats.hits += 1
                stats.cached_tokens += len(path) * self.block_tokens
        if not path:
            return None
        return path[0].kv if len(path) == 1 else torch.cat([block.kv for block in path], dim=3)

    def cached_length(self, owner: int, ids: Sequence[int]) -> int:
        """The number of tokens `match` would find now (counters and recency unchanged)."""
        with self._lock:
            return len(self._walk(owner, ids)) * self.block_tokens

    def store(self, owner: int, ids: Sequence[int], block_kv: Callable[[int], torch.Tensor]) -> None:
        """Keep the full blocks of `ids` that are not cached yet; `block_kv(start)` gives the keys/values
        [layers, 2, kv_heads, block_tokens, head_dim] of tokens start..start + block_tokens - 1 (called only for
        blocks not already held). Evicts least recently used blocks beyond max_bytes."""
        size = self.block_tokens
        with self._lock:
            path, parent = [], ROOT
            for start in range(0, len(ids) // size * size, size):
                key = _Key(owner, parent, tuple(ids[start : start + size]))
                block = self._blocks.get(key)
                if block is None:
                    kv = block_kv(start).detach().contiguous()
                    if kv.numel() * kv.element_size() > self.max_bytes:
                        break
                    block = _Block(next(self._ids), key, kv)
                    self._add(block)
                path.append(block)
                parent = block.id
            self._touch(path)
            self._evict()

    def pin(self, owner: int, ids: Sequence[int]) -> int:
        """Pin the held blocks of `ids`'s start (from its first block to the first one not held) so that they are
        never evicted; returns the number of tokens pinned (fewer than `ids` has when the cache could not hold them
        all)."""
        with self._lock:
            path = self._whole_blocks(owner, ids)
            for block in path:
                if block.key not in self._pinned:
                    self._pinned.add(block.key)
                    self._stats.pinned_blocks += 1
                    self._stats.pinned_bytes += block.nbytes
            self._touch(path)
            return len(path) * self.block_tokens

    def unpin(self, owner: int, ids: Sequence[int]) -> int:
        """Let the blocks of `ids`'s start be evicted again (LRU); returns the number of tokens unpinned."""
        with self._lock:
            path = [block for block in self._whole_blocks(owner, ids) if block.key in self._pinned]
            for block in path:
                self._unpin(block)
            self._evict()
            return len(path) * self.block_tokens

    def retain(self, owners: set[int]) -> None:
        """Drop every block whose owner is not in `owners` (adapters removed or replaced since)."""
        with self._lock:
            if self._owners.keys() <= owners:
                return
            for key in [k for k in self._blocks if k.owner not in owners]:
                self._remove(key)

    def clear(self) -> None:
        with self._lock:
            for key in list(self._blocks):
                self._remove(key)

    def stats(self) -> PrefixCacheStats:
        """A copy of the counters."""
        with self._lock:
            return PrefixCacheStats(**asdict(self._stats))

    def __len__(self) -> int:
        return len(self._blocks)

    # ---- under the lock ------------------------------------------------------------------------------------------
    def _walk(self, owner: int, ids: Sequence[int]) -> list[_Block]:
        """The held blocks of `ids` from its start to the first miss, leaving at least one token."""
        size, path, parent = self.block_tokens, [], ROOT
        for start in range(0, (len(ids) - 1) // size * size, size):
            block = self._blocks.get(_Key(owner, parent, tuple(ids[start : start + size])))
            if block is None:
                break
            path.append(block)
            parent = block.id
        return path

    def _whole_blocks(self, owner: int, ids: Sequence[int]) -> list[_Block]:
        """The held blocks of `ids` from its start to the first miss, its last full block included."""
        return self._walk(owner, list(ids) + [-1])  # _walk leaves one token over: a stand-in token past the end

    def _touch(self, path: list[_Block]) -> None:
        for block in reversed(path):  # the first block ends up most recent: parents outlive their children
            self._blocks.move_to_end(block.key)

    def _add(self, block: _Block) -> None:
        self._blocks[block.key] = block
        self._owners[block.key.owner] = self._owners.get(block.key.owner, 0) + 1
        self._stats.stored_blocks += 1
        self._stats.blocks += 1
        self._stats.bytes += block.nbytes

    def _unpin(self, block: _Block) -> None:
        self._pinned.discard(block.key)
        self._stats.pinned_blocks -= 1
        self._stats.pinned_bytes -= block.nbytes

    def _remove(self, key: _Key) -> None:
        if key in self._pinned:
            self._unpin(self._blocks[key])
        block = self._blocks.pop(key)
        left = self._owners[key.owner] - 1
        if left:
            self._owners[key.owner] = left
        else:
            del self._owners[key.owner]
        self._stats.evicted_blocks += 1
        self._stats.blocks -= 1
        self._stats.bytes -= block.nbytes

    def _evict(self) -> None:
        """Remove least recently used unpinned blocks until the cache fits max_bytes."""
        if self._stats.bytes <= self.max_bytes:
            return
        for key in [k for k in self._blocks if k not in self._pinned]:
            if self._stats.bytes <= self.max_bytes:
                break
            self._remove(key)
