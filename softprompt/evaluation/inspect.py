"""`softprompt inspect ADAPTER`: what a soft prompt "says".

Shows the adapter's config (its method), its size on disk, its parameter count, and then:

- prompt-tuning and P-tuning adapters (input embeddings): for every virtual token its norm and the vocabulary tokens
  whose input embeddings are nearest by cosine similarity — the analysis Lester et al. (2021) did by hand. The norm
  of an average vocabulary embedding is printed alongside, for scale.
- prefix adapters: per layer, the norms of the prefix's keys and values (mean over the virtual positions). A prefix
  is not in the input-embedding space — it is keys and values inside each layer, which no token's embedding is — so
  there is no nearest-token lookup. What can honestly be compared is scale: with a base model, the mean key and
  value norms that real text produces at the same layer are printed alongside (norms do not depend on the rotary
  rotation that real keys carry). A layer whose prefix norms are far above its text's norms dominates attention.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from softprompt.core import KV_METHODS, forward
from softprompt.core.models import DEFAULT_MODEL, DEFAULT_MODEL_NAME, load_base
from softprompt.core.prompt import DEFAULT_INIT_TEXT, prefill_kv
from softprompt.formats.adapter import load_adapter

PREFIX_NOTE = (
    "a prefix holds keys and values inside every layer, not input embeddings, so its vectors have no "
    "nearest vocabulary tokens; shown: per-layer norms"
)


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
        "method": adapter.method,
        "config": adapter.config,
        "softprompt": adapter.extra,
        "template": adapter.template.spec,
        "files": files,
        "size_bytes": sum(files.values()),
        "num_virtual_tokens": emb.shape[0],
        "hidden_size": emb.shape[1],
        "trainable_parameters": emb.numel() + sum(t.numel() for t in (adapter.factors or {}).values()),
        "base_model": base.name if base is not None else None,
    }
    if adapter.factors is not None:  # a multitask adapter: the tokens below are its shared prompt's
        info.update(num_tasks=adapter.num_tasks, num_ranks=adapter.factors["prefix_task_cols"].shape[2])
    if adapter.method in KV_METHODS:
        return _prefix_report(info, adapter, base)
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


def _prefix_report(info: dict, adapter, base) -> dict:
    """Per-layer key/value norms of a prefix adapter, and those of real text at each layer when `base` is given."""
    config = adapter.config
    layers, width = config.get("num_layers"), adapter.embeddings.shape[1]
    token_dim = config.get("token_dim")
    if base is not None:
        layers, kv_heads, head_dim = forward.prefix_layout(base.model)
        token_dim = kv_heads * head_dim
    if not layers or not token_dim or layers * 2 * token_dim != width:
        layers, token_dim = None, None
    info["hidden_size"] = None
    info["prefix_width"] = width
    info["note"] = PREFIX_NOTE
    info["tokens"] = [{"index": i, "norm": round(float(n), 4)} for i, n in enumerate(adapter.embeddings.norm(dim=-1))]
    if layers is None:
        return info
    per = adapter.embeddings.float().view(adapter.embeddings.shape[0], layers, 2, token_dim)
    norms = per.norm(dim=-1).mean(0)  # [layers, 2]: mean over positions of each position's key / value norm
    text = _text_kv_norms(base) if base is not None else None
    info["layers"] = [
        {
            "layer": i,
            "key_norm": round(float(norms[i, 0]), 4),
            "value_norm": round(float(norms[i, 1]), 4),
            **({"text_key_norm": round(text[i][0], 4), "text_value_norm": round(text[i][1], 4)} if text else {}),
        }
        for i in range(layers)
    ]
    return info


@torch.no_grad()
def _text_kv_norms(base, text: str = DEFAULT_INIT_TEXT) -> list[tuple[float, float]]:
    """Mean key and value norm per layer (over kv heads flattened, mean over positions) of a sample text."""
    ids = base.tokenizer(text, return_tensors="pt")["input_ids"].to(base.device)
    flat = prefill_kv(base, base.model.get_input_embeddings()(ids)[0])  # the keys/values a text gives
    layers = forward.prefix_layout(base.model)[0]
    per = flat.view(flat.shape[0], layers, 2, -1).norm(dim=-1).mean(0)
    return [(float(per[i, 0]), float(per[i, 1])) for i in range(layers)]


def format_report(info: dict) -> str:
    """Human-readable text for `inspect_adapter`'s result."""
    cfg, extra = info["config"], info["softprompt"]
    lines = [
        f"adapter: {info['path']}",
        f"  method {info.get('method', 'prompt')}: peft_type {cfg.get('peft_type')}, task_type {cfg.get('task_type')}, init "
        f"{extra.get('init') or cfg.get('prompt_tuning_init')}"
        + (f" ({cfg.get('prompt_tuning_init_text')!r})" if cfg.get("prompt_tuning_init_text") else ""),
        f"  base model: {cfg.get('base_model_name_or_path')}",
        f"  template: {info['template']!r}"
        + (f", label words: {extra['label_words']}" if extra.get("label_words") else ""),
        f"  size on disk: {info['size_bytes']:,} bytes ({', '.join(f'{k} {v:,}' for k, v in info['files'].items())})",
        f"  virtual tokens: {info['num_virtual_tokens']} x hidden {info['hidden_size']} = "
        f"{info['trainable_parameters']:,} trainable parameters"
        + (
            f" (with {info['num_tasks']} tasks' factors of rank {info['num_ranks']}; the tokens below are the shared "
            "prompt's)"
            if "num_tasks" in info
            else ""
        )
        if info.get("method") not in KV_METHODS
        else f"  virtual positions: {info['num_virtual_tokens']} x prefix width {info['prefix_width']} "
        f"(layers x 2 x kv heads x head dim) = {info['trainable_parameters']:,} parameters"
        + (
            f", the first {cfg.get('num_frozen_tokens', 1)} frozen"
            if info.get("method") == "cartridge" and cfg.get("num_frozen_tokens", 1)
            else ""
        ),
    ]
    summary = {k: v for k, v in extra.items() if k not in ("template", "label_words")}
    if summary:
        lines.append(f"  training: {json.dumps(summary, ensure_ascii=False)}")
    if info.get("method") in KV_METHODS:
        return "\n".join(lines + _prefix_lines(info))
    if "vocab_mean_norm" in info:
        lines.append(
            f"  nearest vocabulary tokens by cosine similarity (mean vocabulary embedding norm "
            f"{info['vocab_mean_norm']:.3f}):"
        )
    else:
        lines.append("  per-token norms:")
    for entry in info["tokens"]:
        line = f"  {entry['index']:>4}  norm {entry['norm']:8.3f}"
        if "nearest" in entry:
            line += "  " + "  ".join(
                f"{json.dumps(n['token'], ensure_ascii=False)} {n['cosine']:.2f}" for n in entry["nearest"]
            )
        lines.append(line)
    return "\n".join(lines)


def _prefix_lines(info: dict) -> list[str]:
    lines = [f"  {info['note']}"]
    if "layers" not in info:
        lines.append(
            "  (the layer layout is unknown without a base model or the config's num_layers/token_dim; "
            "per-position norms over all layers:)"
        )
        lines += [f"  {e['index']:>4}  norm {e['norm']:8.3f}" for e in info["tokens"]]
        return lines
    text = "text_key_norm" in info["layers"][0]
    lines.append(
        "  layer  key norm  value norm"
        + (
            "   text key norm  text value norm   (mean over positions; text: the keys/values real text produces there)"
            if text
            else "   (mean over positions)"
        )
    )
    for e in info["layers"]:
        line = f"  {e['layer']:>5}  {e['key_norm']:8.3f}  {e['value_norm']:10.3f}"
        if text:
            line += f"   {e['text_key_norm']:13.3f}  {e['text_value_norm']:15.3f}"
        lines.append(line)
    return lines
