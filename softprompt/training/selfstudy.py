"""Self-study (`softprompt train --method cartridge --corpus FILE`): the training data of a cartridge, written by the
frozen model itself about a corpus, and the teacher's next-token distributions it is distilled from.

For each chunk of the corpus (data/corpus.py) and each of `--selfstudy-conversations` conversations:
1. the model, with the chunk in its context, answers a seed prompt (`SEED_PROMPTS`, cycling through question,
   summary, quote, structure) that asks it to write one question or request about the chunk;
2. the model, with the chunk in its context, answers that question;
3. the conversation (the question as the template's prompt, the answer as its target) runs once more through the
   frozen model with the chunk in front (the teacher, no gradient), and its `--top-k` most likely tokens and their
   log-probabilities are kept for every conversation token.
Training then runs the student, the cartridge + the conversation, and matches the teacher's distribution at every
conversation token after the first (forward.label_kl; the first token has nothing before it but the cartridge's
keys, which predict nothing, as for every key/value method).

Generation goes through the inference engine (seeded sampling: each turn's generator is seeded from --seed, the
chunk and the conversation, so the same settings write the same conversations). Everything the loop needs is
saved in OUT/selfstudy.safetensors (token ids, the teacher's top-k ids and log-probabilities, the settings that made
them); OUT/selfstudy.jsonl holds the same conversations as text to read. A run whose settings match the file reuses
it (a --resume, or a second run into the same folder), so resuming is exact and regenerates nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from softprompt.core import forward
from softprompt.data import batching
from softprompt.data.corpus import chunk_ids
from softprompt.data.records import DataError
from softprompt.data.templates import Template, encode_text

DATA_FILE = "selfstudy.safetensors"
TEXT_FILE = "selfstudy.jsonl"
FORMAT_VERSION = 1
SEPARATOR = "\n\n"  # between a chunk and the conversation after it
GENERATE_BATCH = 8
TEACHER_TOKENS = 2048  # padded tokens per teacher forward pass

# kind -> (the seed prompt the model answers with a question or request, the request used if it writes nothing)
SEED_PROMPTS = {
    "question": (
        "Write one question about a specific fact stated in the text above, which the text answers. "
        "Write only the question.",
        "What is one fact the text above states?",
    ),
    "summary": (
        "Write one request asking for a short summary of one part of the text above; name the part. "
        "Write only the request.",
        "Summarise the text above in a few sentences.",
    ),
    "quote": (
        "Write one request asking to quote, word for word, the sentence of the text above that says something "
        "specific; say what it is about. Write only the request.",
        "Quote the first sentence of the text above.",
    ),
    "structure": (
        "Write one question about how the text above is organised: its sections, numbered items, lists or order. "
        "Write only the question.",
        "How is the text above organised?",
    ),
}
KINDS = tuple(SEED_PROMPTS)


@dataclass
class Conversation:
    chunk: int
    kind: str
    question: str
    answer: str


@dataclass
class SelfStudyData:
    """The examples the loop trains on (labels: every conversation token after the first) and, per example, the
    teacher's top-k ids and log-probabilities [len, k] of each of its tokens (row t: the distribution that predicts
    token t)."""

    examples: list[batching.Example]
    teacher_ids: list[torch.Tensor]
    teacher_logprobs: list[torch.Tensor]
    conversations: list[Conversation]
    reused: bool = False


def settings(config, base, template: Template, corpus_text: str) -> dict:
    """What the saved data depends on: a file made with other settings is not reused."""
    return {
        "format": FORMAT_VERSION,
        "corpus_sha256": hashlib.sha256(corpus_text.encode("utf-8")).hexdigest(),
        "model": base.name,
        "dtype": str(base.dtype).removeprefix("torch."),
        "template": template.to_json(),
        "chunk_tokens": config.chunk_tokens,
        "conversations": config.selfstudy_conversations,
        "max_tokens": config.selfstudy_max_tokens,
        "top_k": config.top_k,
        "seed": config.seed,
        "temperature": config.selfstudy_temperature,
        "top_p": config.selfstudy_top_p,
    }


def prepare(config, base, template: Template, corpus_text: str, out: Path, resume: bool) -> SelfStudyData:
    """The self-study data of this run: OUT/selfstudy.safetensors when its settings match, else made now (and
    saved). With --resume the file must be there and match (resuming never regenerates)."""
    wanted = settings(config, base, template, corpus_text)
    path = out / DATA_FILE
    if path.exists():
        found = read_settings(path)
        if found == wanted:
            data = load(path)
            data.reused = True
            return data
        if resume:
            differ = ", ".join(k for k in wanted if found.get(k) != wanted[k])
            raise DataError(f"{path}: made with other settings than this run ({differ}); resume with the same ones")
    elif resume:
        raise DataError(f"{path}: missing, so this --corpus run cannot resume exactly; start it again")
    chunks = chunk_ids(encode_text(base.tokenizer, corpus_text), config.chunk_tokens)
    check_budget(base, template, config.chunk_tokens, config.selfstudy_max_tokens)
    conversations = synthesise(base, template, chunks, config.selfstudy_conversations, config, config.seed)
    data = distil_targets(base, template, chunks, conversations, config.top_k)
    save(path, data, wanted)
    return data


def check_budget(base, template: Template, chunk_tokens: int, max_tokens: int) -> None:
    """Refuse, before any generation, chunks that leave no room for a conversation in the model's context."""
    context = getattr(base.model.config, "max_position_embeddings", None)
    if context is None:
        return
    overhead = len(encode_text(base.tokenizer, SEPARATOR + template.prompt("x", "", base.tokenizer))) + 1
    longest = max(len(encode_text(base.tokenizer, prompt)) for prompt, _ in SEED_PROMPTS.values())
    need = chunk_tokens + overhead + max(longest, max_tokens) + max_tokens
    if need > context:
        raise DataError(
            f"--chunk-tokens {chunk_tokens} + a conversation (up to 2 x --selfstudy-max-tokens {max_tokens} and "
            f"{overhead} tokens of template) need {need} positions, more than the model's context of {context}; "
            "lower --chunk-tokens or --selfstudy-max-tokens"
        )


def _seed(seed: int, chunk: int, index: int, turn: int) -> int:
    return (seed * 1_000_003 + (chunk * 65_536 + index) * 2 + turn) % (2**63)


def context_ids(base, chunk: list[int]) -> list[int]:
    """What the teacher has in front of a conversation: the chunk, then a blank line."""
    return list(chunk) + encode_text(base.tokenizer, SEPARATOR)


def synthesise(base, template: Template, chunks: list[list[int]], per_chunk: int, config, seed: int):
    """The conversations: per chunk, `per_chunk` questions (from the seed prompts, in turn) and their answers, both
    written by the frozen model with the chunk in its context (sampled, seeded)."""
    from softprompt.inference.batch import GenerationRequest
    from softprompt.inference.engine import Engine
    from softprompt.inference.prefix_cache import PrefixCache

    engine = Engine(base, default_template=template, prefix_cache=PrefixCache(512 << 20))
    slots = [(c, i, KINDS[i % len(KINDS)]) for c in range(len(chunks)) for i in range(per_chunk)]
    contexts = [context_ids(base, chunk) for chunk in chunks]

    def request(c: int, i: int, turn: int, text: str, stop: tuple[str, ...]) -> GenerationRequest:
        ids = contexts[c] + encode_text(base.tokenizer, template.prompt(text, "", base.tokenizer))
        return GenerationRequest(
            ids,
            max_new_tokens=config.selfstudy_max_tokens,
            temperature=config.selfstudy_temperature,
            top_p=config.selfstudy_top_p,
            seed=_seed(seed, c, i, turn),
            stop=stop,
        )

    # each chunk's keys/values once, into the prefix cache, so that its conversations' prompts (admitted together,
    # before any of them could store it) reuse them instead of each prefilling the chunk again
    engine.generate([GenerationRequest(ids, max_new_tokens=1) for ids in contexts], batch_size=GENERATE_BATCH)
    asks = engine.generate(
        [request(c, i, 0, SEED_PROMPTS[kind][0], ("\n",)) for c, i, kind in slots],
        batch_size=GENERATE_BATCH,
        progress=config.progress,
    )
    questions = [r.text.strip() or SEED_PROMPTS[kind][1] for r, (_, _, kind) in zip(asks, slots)]
    answers = engine.generate(
        [request(c, i, 1, q, ("\nHuman:",)) for (c, i, _), q in zip(slots, questions)],
        batch_size=GENERATE_BATCH,
        progress=config.progress,
    )
    return [Conversation(c, kind, q, a.text.strip()) for (c, _, kind), q, a in zip(slots, questions, answers)]


def conversation_example(base, template: Template, conversation: Conversation, where: str) -> batching.Example:
    """A conversation's tokens (the question as the template's prompt, the answer + EOS as its target); every token
    after the first is distilled."""
    tokenizer = base.tokenizer
    ids = encode_text(tokenizer, template.prompt(conversation.question, "", tokenizer)) + encode_text(
        tokenizer, template.target(conversation.answer, tokenizer)
    )
    return batching.Example(ids, [-100] + ids[1:], where)


def distil_targets(base, template: Template, chunks, conversations: list[Conversation], top_k: int) -> SelfStudyData:
    """The teacher's top-k ids and log-probabilities for every token of every conversation: the frozen model with
    the conversation's chunk in front (run once per chunk, forward.SharedPrefix), no gradient."""
    model = base.model
    examples = [
        conversation_example(base, template, c, f"{DATA_FILE}: conversation {n + 1}")
        for n, c in enumerate(conversations)
    ]
    top_ids: list[torch.Tensor | None] = [None] * len(examples)
    top_lps: list[torch.Tensor | None] = [None] * len(examples)
    device = base.device
    with torch.no_grad():
        for c, chunk in enumerate(chunks):
            members = [n for n, conv in enumerate(conversations) if conv.chunk == c]
            if not members:
                continue
            prefix = forward.SharedPrefix(model, None, torch.tensor(context_ids(base, chunk), device=device))
            lengths = [len(examples[n]) for n in members]
            for batch in batching.micro_batches(list(range(len(members))), lengths, TEACHER_TOKENS):
                rows = [members[b] for b in batch]
                tensors = batching.collate([examples[n] for n in rows], base.tokenizer.pad_token_id, device)
                hidden, last = forward.text_hidden(
                    model, None, tensors["input_ids"], tensors["attention_mask"], prefix=prefix
                )
                previous = torch.cat([last.expand(hidden.shape[0], 1, -1), hidden[:, :-1]], dim=1)
                for r, n in enumerate(rows):
                    logprobs = torch.log_softmax(forward.lm_logits(model, previous[r, : len(examples[n])]), dim=-1)
                    values, ids = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
                    top_ids[n], top_lps[n] = ids.to(torch.int32).cpu(), values.float().cpu()
    return SelfStudyData(examples, top_ids, top_lps, conversations)  # type: ignore[arg-type]


def save(path: Path, data: SelfStudyData, made_with: dict) -> None:
    """OUT/selfstudy.safetensors (atomically) and OUT/selfstudy.jsonl beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = [len(e) for e in data.examples]
    tensors = {
        "ids": torch.tensor([t for e in data.examples for t in e.ids], dtype=torch.int64),
        "lengths": torch.tensor(lengths, dtype=torch.int64),
        "teacher_ids": torch.cat(data.teacher_ids).contiguous(),
        "teacher_logprobs": torch.cat(data.teacher_logprobs).contiguous(),
    }
    conversations = [vars(c) for c in data.conversations]
    metadata = {"settings": json.dumps(made_with, sort_keys=True), "conversations": json.dumps(conversations)}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    text_tmp = path.with_name(TEXT_FILE + ".tmp")
    with open(text_tmp, "w", encoding="utf-8") as handle:
        for conversation in conversations:
            handle.write(json.dumps(conversation, ensure_ascii=False) + "\n")
    os.replace(text_tmp, path.with_name(TEXT_FILE))


def read_settings(path: Path) -> dict:
    """The settings a data file was made with ({} when it cannot be read)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return json.loads((handle.metadata() or {}).get("settings", "{}"))
    except Exception:  # an unreadable or foreign file is simply not reused
        return {}


def load(path: Path) -> SelfStudyData:
    """The data a run saved (its examples rebuilt from the token ids, labels as conversation_example makes them)."""
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    lengths = tensors["lengths"].tolist()
    ids = tensors["ids"].tolist()
    conversations = [Conversation(**c) for c in json.loads(meta["conversations"])]
    examples, offset = [], 0
    for n, length in enumerate(lengths):
        row = ids[offset : offset + length]
        examples.append(batching.Example(row, [-100] + row[1:], f"{path.name}: conversation {n + 1}"))
        offset += length
    top_ids = list(tensors["teacher_ids"].split(lengths))
    top_lps = list(tensors["teacher_logprobs"].split(lengths))
    return SelfStudyData(examples, top_ids, top_lps, conversations)
