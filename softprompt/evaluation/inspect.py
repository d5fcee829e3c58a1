"""`softprompt inspect ADAPTER`: what a soft prompt "says".

Shows the adapter's config, its size on disk, its trainable parameter count, and for every virtual token its norm
and the vocabulary tokens whose input embeddings are nearest by cosine similarity — the analysis Lester et al.
(2021) did by hand. The norm of an average vocabulary embedding is printed alongside, for scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from softprompt.formats.adapter import load_adapter
from softprompt.core.models import DEFAULT_MODEL, DEFAULT_MODEL_NAME, load_base


def nearest_tokens(embeddings: torch.Tensor, table: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine similarities, token ids), each [N, top_k], of the vocabulary rows nearest to each prompt vector."""
    prompt = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    vocab = torch.nn.functional.normalize(table.float(), dim=-1)
    return (prompt @ vocab.T).topk(min(top_k, vocab.shape[0]), dim=-1)


def base_for(adapter_config: dict, model: str | None) -> str | None:
    """The base model to load: --model if given, else the adapter's recorded base (the embedded default by name)."""
    if model:
        return model
    name = adapter_config.get("base_model_name_or_path")
    return DEFAULT_MODEL if name in (None, DEFAULT_MODEL_NAME) else name


def inspect_adapter(path: str | Path, base=None, top_k: int = 5) -> dict:
    """A JSON-ready description of an adapter folder. `base` (a models.FrozenModel) is needed for nearest tokens."""
    path = Path(path)
    adapter = load_adapter(path, base)
    emb = adapter.embeddings
    files = {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.is_file()}
    info: dict = {
        "path": str(path),
        "config": adapter.config,
        "softprompt": adapter.extra,
        "template": adapter.template.spec,
        "files": files,
        "size_bytes": sum(files.values()),
        "num_virtual_tokens": emb.shape[0],
        "hidden_size": emb.shape[1],
        "trainable_parameters": emb.numel(),
        "base_model": base.name if base is not None else None,
    }
    norms = emb.norm(dim=-1)
    tokens = [{"index": i, "norm": round(float(norms[i]), 4)} for i in range(emb.shape[0])]
    if base is not None and top_k > 0:
        table = base.model.get_input_embeddings().weight.detach().cpu()
        info["vocab_mean_norm"] = round(float(table.float().norm(dim=-1).mean()), 4)
        sims, ids = nearest_tokens(emb, table, top_k)
        for row, entry in enumerate(tokens):
            entry["nearest"] = [
                {"id": int(i), "token": base.tokenizer.decode([int(i)]), "cosine": round(float(s), 4)}
                for s, i in zip(sims[row], ids[row])
            ]
    info["tokens"] = tokens
    return info


def format_report(info: dict) -> str:
    """Human-readable text for `inspect_adapter`'s result."""
    cfg, extra = info["config"], info["softprompt"]
    lines = [
        f"adapter: {info['path']}",
        f"  peft_type {cfg.get('peft_type')}, task_type {cfg.get('task_type')}, init "
        f"{extra.get('init') or cfg.get('prompt_tuning_init')}"
        + (f" ({cfg.get('prompt_tuning_init_text')!r})" if cfg.get("prompt_tuning_init_text") else ""),
        f"  base model: {cfg.get('base_model_name_or_path')}",
        f"  template: {info['template']!r}"
        + (f", label words: {extra['label_words']}" if extra.get("label_words") else ""),
        f"  size on disk: {info['size_bytes']:,} bytes ({', '.join(f'{k} {v:,}' for k, v in info['files'].items())})",
        f"  virtual tokens: {info['num_virtual_tokens']} x hidden {info['hidden_size']} = "
        f"{info['trainable_parameters']:,} trainable parameters",
    ]
    summary = {k: v for k, v in extra.items() if k not in ("template", "label_words")}
    if summary:
        lines.append(f"  training: {json.dumps(summary, ensure_ascii=False)}")
    if "vocab_mean_norm" in info:
        lines.append(f"  nearest vocabulary tokens by cosine similarity (mean vocabulary embedding norm "
                     f"{info['vocab_mean_norm']:.3f}):")
    else:
        lines.append("  per-token norms:")
    for entry in info["tokens"]:
        line = f"  {entry['index']:>4}  norm {entry['norm']:8.3f}"
        if "nearest" in entry:
            line += "  " + "  ".join(f"{json.dumps(n['token'], ensure_ascii=False)} {n['cosine']:.2f}"
                                     for n in entry["nearest"])
        lines.append(line)
    return "\n".join(lines)
