"""The four prompt-learning adapter types PEFT 0.21 writes, as softprompt reads and writes them.

| method    | peft_type      | prompt_embeddings                                  | extra adapter_config.json fields        |
|-----------|----------------|----------------------------------------------------|-----------------------------------------|
| `prompt`  | PROMPT_TUNING  | [N, hidden] input embeddings                       | prompt_tuning_init(_text), tokenizer_*  |
| `ptuning` | P_TUNING       | [N, hidden] the prompt encoder's output            | encoder_reparameterization_type, ...   |
| `prefix`  | PREFIX_TUNING  | [N, num_layers * 2 * token_dim] keys and values    | prefix_projection, encoder_hidden_size  |
| `cartridge` | CARTRIDGE    | [N, num_layers * 2 * token_dim] keys and values    | num_frozen_tokens                       |
| `multitask` | MULTITASK_PROMPT_TUNING | [N, hidden] shared prompt, + prefix_task_cols [tasks, N, ranks] and prefix_task_rows [tasks, ranks, hidden] | prompt tuning's, num_tasks, num_ranks, prompt_tuning_init_task, prompt_tuning_init_state_dict_path |

For a prefix and a cartridge (the KV_METHODS), PEFT sizes token_dim as num_key_value_heads x head_dim and records num_attention_heads as the number of
key/value heads on grouped-query models (peft/utils/other.py, _prepare_prompt_learning_config); the tensor is the
keys/values themselves whether or not a projection produced them while training (PEFT saves the projection's output).
"""

from __future__ import annotations

from softprompt.core import KV_METHODS, PEFT_TYPES
from softprompt.core.forward import prefix_layout

METHOD_OF = {peft_type: method for method, peft_type in PEFT_TYPES.items()}


def method_of(config: dict) -> str | None:
    """The method of an adapter_config.json (None for a peft_type softprompt does not load)."""
    return METHOD_OF.get(config.get("peft_type"))


def config_fields(method: str, model_config, peft_fields: dict | None = None) -> dict:
    """The adapter_config.json fields that depend on the method (peft_type, shape fields, encoder fields), for a
    base model whose transformers config is `model_config` (None: unknown base, shape fields left null)."""
    peft_fields = dict(peft_fields or {})
    layers = getattr(model_config, "num_hidden_layers", None)
    heads = getattr(model_config, "num_attention_heads", None)
    hidden = getattr(model_config, "hidden_size", None)
    fields = {"peft_type": PEFT_TYPES[method], "num_layers": layers, "num_attention_heads": heads}
    if method in KV_METHODS:
        if model_config is not None:
            _, kv_heads, head_dim = prefix_layout(model_config)
            fields.update(num_attention_heads=kv_heads, token_dim=kv_heads * head_dim)
        else:
            fields.update(token_dim=None)
    if method == "multitask":
        fields.update(
            token_dim=hidden,
            num_tasks=int(peft_fields.get("num_tasks", 1)),
            num_ranks=int(peft_fields.get("num_ranks", 1)),
            # softprompt.json records an init from a source adapter: PEFT would re-read the source at every load
            prompt_tuning_init_state_dict_path=None,
            prompt_tuning_init_task=0,
        )
    elif method == "cartridge":
        fields.update(num_frozen_tokens=int(peft_fields.get("num_frozen_tokens", 1)))
    elif method == "prefix":
        fields.update(
            prefix_projection=bool(peft_fields.get("prefix_projection", False)),
            encoder_hidden_size=peft_fields.get("encoder_hidden_size") or fields["token_dim"],
            init_weights=None,
        )
    elif method == "ptuning":
        fields.update(
            token_dim=hidden,
            encoder_reparameterization_type=str(peft_fields.get("encoder_reparameterization_type", "MLP")).upper(),
            encoder_hidden_size=peft_fields.get("encoder_hidden_size") or hidden,
            encoder_num_layers=2,
            encoder_dropout=0.0,
        )
    return fields


def expected_width(method: str, config: dict) -> int | None:
    """The width of prompt_embeddings an adapter_config.json announces (None when it does not say)."""
    token_dim = config.get("token_dim")
    if not isinstance(token_dim, int) or isinstance(token_dim, bool):
        return None
    if method not in KV_METHODS:
        return token_dim
    layers = config.get("num_layers")
    if not isinstance(layers, int) or isinstance(layers, bool):
        return None
    return layers * 2 * token_dim


def base_width(method: str, base) -> int:
    """The width of prompt_embeddings that fits a base model (a core.models.FrozenModel)."""
    if method in KV_METHODS:
        layers, kv_heads, head_dim = prefix_layout(base.model)
        return layers * 2 * kv_heads * head_dim
    return base.hidden_size


def misfit(method: str, width: int, base, config: dict | None = None) -> str:
    """The error message for an adapter of `width` that does not fit `base` (`config`: its adapter_config.json, whose
    shape fields a cartridge's message names)."""
    if method == "cartridge":
        layers, kv_heads, head_dim = prefix_layout(base.model)
        config = config or {}
        theirs = (
            f" ({config['num_layers']} layers x 2 x token_dim {config['token_dim']})"
            if (isinstance(config.get("num_layers"), int) and isinstance(config.get("token_dim"), int))
            else ""
        )
        return (
            f"cartridge of width {width}{theirs} does not fit the base model {base.name}: its cartridges have width "
            f"{layers * 2 * kv_heads * head_dim} = {layers} layers x 2 x {kv_heads} kv heads x {head_dim} head dim"
        )
    if method == "prefix":
        layers, kv_heads, head_dim = prefix_layout(base.model)
        return (
            f"prefix adapter width {width} does not fit the base model {base.name} (prefix width "
            f"{layers * 2 * kv_heads * head_dim} = {layers} layers x 2 x {kv_heads} kv heads x {head_dim} head dim)"
        )
    return f"adapter hidden size {width} does not fit the base model {base.name} (hidden size {base.hidden_size})"
