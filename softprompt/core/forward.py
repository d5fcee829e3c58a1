"""The forward pass with a soft prompt: [soft prompt ; token embeddings] -> frozen model -> loss on answer tokens.

Used by training and evaluation; generation reuses `prompt_kv` and `run_body` with a cache (see kvcache.py).

Two equivalent ways to put the prompt in front (tests check they agree):
- `kv` (default): run the N virtual tokens once (batch 1), then expand their keys/values to every row and run the
  text on top of them. The prompt is the same for every row, so this saves (B-1)*N token positions per batch.
- `concat`: the textbook [prompt ; embeddings] concatenation (used for prompt tuning and P-tuning with gradient
  checkpointing). The text pass of `kv` reads its prompt through a `ReadOnlyCache`, which a checkpointed layer's
  recompute reads again unchanged, so a prefix or cartridge (which has no embeddings to concatenate) trains under
  gradient checkpointing in `kv` mode.

Position ids are always explicit: virtual tokens take 0..N-1 and each row's real tokens continue N, N+1, ...
counting only unmasked tokens, so a row's result does not depend on padding side or on how many pads it has.
The LM head is applied only at positions that have a label, never to the whole sequence, and in training its
cross-entropy is fused (`head_nll`): chunk by chunk, the gradient with respect to the hidden state is computed in the
forward pass, so no [labels x vocabulary] logits tensor is kept for the backward pass.

Within one optimiser step every micro-batch sees the same prompt, so training computes the virtual tokens' keys/values
once per step (`SharedPrefix`) and back-propagates into the prompt once, after the last micro-batch. When every row of
the step also starts with the same text tokens (a fixed instruction, "Human: Is the sentiment ..."), those join the
shared prefix: they run once, at batch 1, on top of the virtual tokens (positions N..N+s-1), the rows keep only what
follows, and the last shared token's hidden state predicts each row's first remaining token. Values and gradients are
those of the full rows (tests check).

Every prompt-learning method is, downstream, the same thing: per-layer keys/values of N virtual positions (`prompt_kv`).
Only their producer differs (`Virtual`: a method and its saved tensor):
- `prompt` (prompt tuning) and `ptuning` (P-tuning, whose saved tensor is its encoder's output): [N, hidden] input
  embeddings, run through the model; the last virtual token's hidden state predicts the first text token;
- `prefix` (prefix tuning / P-tuning v2) and `cartridge` (the same keys/values learned directly, PEFT's CARTRIDGE):
  [N, layers * 2 * kv_heads * head_dim], the keys/values themselves, laid out as PEFT lays them out (`prefix_kv`). Nothing is run, and there is no last virtual hidden state: as in PEFT, the first
  text token is not predicted (labels shift inside the text). Text positions start at N either way, as PEFT's prefix
  forward gives them (cache_position N, N+1, ...).
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from softprompt.core import KV_METHODS, packed
from softprompt.core.attention import NAME, decode_attention, decode_plan
from softprompt.core.fused import fused_product
from softprompt.core.mlp import is_swiglu, silu_mul

try:  # transformers >= 4.56: a cache is a list of layer objects
    from transformers.cache_utils import DynamicLayer
except ImportError:  # pragma: no cover - older transformers: plain DynamicCache, concatenating
    DynamicLayer = None

Kv = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [batch, kv_heads, seq, head_dim]


def cache_kwarg(model) -> str:
    """transformers 5.24 renamed the forward kwarg past_key_values -> cache; support both spellings."""
    body = model.base_model
    name = getattr(body, "_softprompt_cache_kwarg", None)
    if name is None:
        name = "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"
        body._softprompt_cache_kwarg = name
    return name


DECODE_SPARE = 64  # columns of room a cache layer adds when a small append (decoding) outgrows it


if DynamicLayer is not None:

    class GrowingLayer(DynamicLayer):
        """A DynamicLayer that appends in place into spare room instead of concatenating its whole keys/values at
        every step (a decode step then copies one column per layer, not the cache twice). Its keys/values are views
        of a buffer only this layer writes, and only past every view it has handed out, so those views never
        change. Appends that autograd must see (training) concatenate as DynamicLayer does."""

        def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
            super().__init__()
            self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
            self._written = 0  # columns of the buffers written so far (every view handed out is within them)
            if keys is not None:  # held as given (no copy); the first append copies them into a buffer
                self.device, self.keys, self.values, self.is_initialized = keys.device, keys, values, True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:  # as DynamicLayer starts (its lazy_initialization's signature varies)
                self.device, self.is_initialized = key_states.device, True
                self.keys, self.values = key_states.new_empty(0), value_states.new_empty(0)
            if torch.is_grad_enabled() and (
                key_states.requires_grad or value_states.requires_grad or self.keys.requires_grad
            ):
                self._buffers = None
                return super().update(key_states, value_states, *args, **kwargs)
            length, new = (self.keys.shape[-2] if self.keys.numel() else 0), key_states.shape[-2]
            if not self._owns(length, key_states) or length + new > self._buffers[0].shape[-2]:
                self._grow(length, new, key_states, value_states)
            keys, values = self._buffers
            keys[..., length : length + new, :] = key_states
            values[..., length : length + new, :] = value_states
            self.keys, self.values = keys[..., : length + new, :], values[..., : length + new, :]
            self._written = length + new
            return self.keys, self.values

        def _owns(self, length: int, key_states: torch.Tensor) -> bool:
            """True when keys/values are still this layer's own buffer views, as long as all it wrote (nothing
            replaced or cropped them: writing past a cropped view would change a longer one handed out before)."""
            if self._buffers is None or length == 0 or length != self._written:
                return False
            keys = self._buffers[0]
            return (
                self.keys.data_ptr() == keys.data_ptr()
                and self.keys.shape[:-2] == key_states.shape[:-2] == keys.shape[:-2]
                and self.values.data_ptr() == self._buffers[1].data_ptr()
            )

        def _grow(self, length: int, new: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            """A fresh buffer holding the current keys/values, with room for `new` more (and DECODE_SPARE more for a
            small append, so that decoding reallocates once per DECODE_SPARE steps; a prefill gets no spare)."""
            room = length + new + (DECODE_SPARE if new <= 4 and length else 0)
            buffers = []
            for old, states in ((self.keys, key_states), (self.values, value_states)):
                buffer = states.new_empty(*states.shape[:-2], room, states.shape[-1])
                if length:
                    buffer[..., :length, :] = old
                buffers.append(buffer)
            self._buffers = (buffers[0], buffers[1])


def make_cache(kv: Kv | None = None) -> DynamicCache:
    """A transformers cache holding the given per-layer keys/values (or an empty one); its layers append in place
    (`GrowingLayer`) where transformers has layer objects."""
    if DynamicLayer is None:
        return DynamicCache(ddp_cache_data=kv) if kv else DynamicCache()
    cache = DynamicCache()
    cache.layer_class_to_replicate = GrowingLayer
    cache.layers = [GrowingLayer(k, v) for k, v in kv] if kv else []
    return cache


class ReadOnlyCache(DynamicCache):
    """Keys/values every layer reads in front of its own and never extends: `update` returns [cached ; new] and
    stores nothing. A pass over text whose cache is thrown away afterwards (training, scoring) gives the same result
    as with a DynamicCache, and re-running a layer (gradient checkpointing's recompute) reads the same keys again
    instead of appending them a second time, so such layers may keep the cache under checkpointing."""

    def __init__(self, kv: Kv):
        super().__init__(ddp_cache_data=kv)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)


def cache_tensors(cache) -> Kv:
    """Per-layer (keys, values) out of a transformers cache."""
    return [(entry[0], entry[1]) for entry in cache]


@dataclass
class PrefillLayout:
    """A batched prefill's inputs: each row's tokens right-padded to a common length, after a front of keys already
    computed (its soft prompt, cached prompt blocks, earlier slices), right-aligned in `width` columns."""

    ids: torch.Tensor  # [B, L] token ids (pads after each row's tokens)
    mask: torch.Tensor  # [B, width + L] 1 = a real key: the row's front, then its tokens
    positions: torch.Tensor  # [B, L] each token's position: its row's front length, + 1 per real token before it
    width: int  # front columns


def prefill_layout(runs: list[list[int]], fronts: list[int], pad: int, device, min_rows: int = 0) -> PrefillLayout:
    """The layout of rows `runs` (token ids) after fronts of `fronts[b]` keys; at least `min_rows` token rows in
    all (row-exact mode: no matrix product with fewer rows)."""
    batch, width = len(runs), max(fronts)
    length = max(max(len(r) for r in runs), -(-min_rows // batch))
    ids = torch.full((batch, length), pad, dtype=torch.long, device=device)
    block_mask = torch.zeros(batch, length, dtype=torch.long, device=device)
    front_mask = torch.zeros(batch, width, dtype=torch.long, device=device)
    for b, run in enumerate(runs):
        ids[b, : len(run)] = torch.tensor(run, device=device)
        block_mask[b, : len(run)] = 1
        front_mask[b, width - fronts[b] :] = 1
    mask = torch.cat([front_mask, block_mask], dim=1)
    positions = positions_from_mask(block_mask, torch.tensor(fronts, device=device))
    return PrefillLayout(ids, mask, positions, width)


def positions_from_mask(mask: torch.Tensor, offset: torch.Tensor | int = 0) -> torch.Tensor:
    """Position of each token = number of real tokens before it (+ offset); pads get a harmless position."""
    pos = mask.long().cumsum(-1) - 1
    if not isinstance(offset, int):
        offset = offset.view(-1, 1)
    return (pos + offset).clamp(min=0)


def run_body(
    model,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache=None,
    use_cache: bool = False,
):
    """Run the decoder stack (no LM head). attention_mask covers cached + new positions."""
    kwargs = {cache_kwarg(model): cache} if cache is not None else {}
    out = model.base_model(
        inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache, **kwargs
    )
    return out.last_hidden_state, (cache if use_cache else None)


FAST_DECODE_MODELS = {"LlamaModel": ("LlamaDecoderLayer", "LlamaAttention")}  # bodies `decode_body` mirrors


def fast_decode(model, exact: bool = True) -> bool:
    """True when `decode_body` can run this model's decode steps: a Llama body (SmolLM2, Llama) exactly as
    transformers defines it, on the CPU, no sliding window, attention through core/attention.py's grouped SDPA
    (row-exact mode runs it row by row) or, with `exact` False, through transformers' sdpa."""
    body = model.base_model
    allowed = (NAME,) if exact else (NAME, "sdpa")
    if model.config._attn_implementation not in allowed or model.device.type != "cpu":  # each time: these can change
        return False
    known = getattr(body, "_softprompt_fast_decode", None)
    if known is None:  # the body's structure does not change: checked once
        layers = FAST_DECODE_MODELS.get(type(body).__name__)
        module = sys.modules[type(body).__module__]
        known = (
            layers is not None
            and getattr(model.config, "sliding_window", None) is None
            and all(callable(getattr(module, name, None)) for name in ("rotate_half", "create_causal_mask"))
            and all(
                type(layer).__name__ == layers[0] and type(layer.self_attn).__name__ == layers[1]
                for layer in body.layers
            )
        )
        body._softprompt_fast_decode = known
    return known


def decode_body(
    model,
    embeds: torch.Tensor,
    key_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache,
    live: int,
    exact: bool = True,
    fused: bool = True,
):
    """One decode step of a `fast_decode` model: embeds [B, 1, H] -> last hidden states [B, 1, H], the new
    keys/values appended to `cache`. The same kernels on the same inputs as the model's own forward (in
    `row_exact(live)` when `exact`, else with the model's attention function and the 4-D mask its forward builds), so
    the logits are the same bits (tests check); what it leaves out is the per-step work around them: per-layer
    module calls and keyword plumbing, the attention dispatch, and in row-exact mode the 4-D mask. Per layer, with
    `fused`, q/k/v is one matrix product and gate/up another (core/fused.py: the same bits as the separate ones).
    Fewer operations per layer, each giving the bits of the one it replaces:
    - the tokens run as [B, hidden] rows (one token per row), the heads viewed as [B, heads, 1, D] without a
      transpose;
    - modules without hooks run their `forward` directly (`_call`: what the module call would run, without its
      machinery), and a SwiGLU MLP runs as down(silu(gate) * up) on its own projections;
    - RoPE rotates the query and key heads together, with rotate_half(x) * sin computed as the halves of x swapped
      (one `roll`) times sin with its first half negated: negation is exact, and rounding is symmetric, so
      (-x2) * s and x2 * (-s) are the same bits;
    - in row-exact mode a row's query is its slice of the step's query heads (a [1, heads, 1, D] slice of a
      contiguous tensor is contiguous, the same tensor an index_select would copy)."""
    body = model.base_model
    module = sys.modules[type(body).__module__]
    cos, sin = body.rotary_emb(embeds, position_ids=position_ids)
    half = cos.shape[-1] // 2
    cos = cos.view(cos.shape[0], 1, 1, -1)  # [B, 1, 1, D]: broadcast over heads, as apply_rotary_pos_emb does
    sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1).view(cos.shape)  # rotate_half's sign folded in
    if exact:
        plan = decode_plan(key_mask, live)
    else:
        mask = module.create_causal_mask(
            config=model.config,
            inputs_embeds=embeds,
            attention_mask=key_mask,
            position_ids=position_ids,
            **{cache_kwarg(model): cache},
        )
        attention = ALL_ATTENTION_FUNCTIONS[model.config._attn_implementation]
    config = model.config
    q_heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    batch = embeds.shape[0]
    hidden = embeds.view(batch, -1)
    for layer in body.layers[: config.num_hidden_layers]:
        attn = layer.self_attn
        qkv = _qkv(layer, _call(layer.input_layernorm, hidden), fused)
        heads = qkv.view(batch, -1, 1, attn.head_dim)  # [B, q + 2 kv heads, 1, D]
        qk = heads[:, : q_heads + kv_heads]
        qk = (qk * cos) + (qk.roll(half, -1) * sin)
        k, v = cache.update(qk[:, q_heads:], heads[:, q_heads + kv_heads :], attn.layer_idx)
        q = qk[:, :q_heads]
        if exact:
            out = decode_attention(plan, q, k, v, attn.scaling)
        else:
            out, _ = attention(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling, position_ids=position_ids)
        hidden = hidden + _call(attn.o_proj, out.reshape(batch, -1))
        hidden = hidden + _mlp(layer, _call(layer.post_attention_layernorm, hidden), fused)
    return _call(body.norm, hidden).view(embeds.shape)


def _call(module, x: torch.Tensor) -> torch.Tensor:
    """module(x) without nn.Module's call machinery where it has no hooks (then the call runs exactly `forward`)."""
    return module(x) if _hooked(module) else module.forward(x)


def _hooked(module) -> bool:
    """True where calling `module` runs forward hooks: its own, or global ones
    (torch.nn.modules.module.register_module_forward_hook)."""
    hooks = torch.nn.modules.module
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or hooks._global_forward_hooks
        or hooks._global_forward_pre_hooks
    )


def _qkv(layer, x: torch.Tensor, fused: bool) -> torch.Tensor:
    """The layer's q, k and v projections of x, concatenated: one fused product where there is one."""
    qkv = fused_product(layer, "qkv", x) if fused else None
    if qkv is None:
        attn = layer.self_attn
        qkv = torch.cat([_call(attn.q_proj, x), _call(attn.k_proj, x), _call(attn.v_proj, x)], dim=-1)
    return qkv


def _mlp(layer, x: torch.Tensor, fused: bool) -> torch.Tensor:
    """The layer's MLP on x; a SwiGLU one as down(silu(gate) * up), its gate/up product fused where there is one."""
    mlp = layer.mlp
    if not is_swiglu(mlp) or _hooked(mlp):  # a hooked MLP runs as its call would
        return _call(mlp, x)
    gate_up = fused_product(layer, "gate_up", x) if fused else None
    if gate_up is None:
        gate, up = _call(mlp.gate_proj, x), _call(mlp.up_proj, x)
    else:
        gate, up = gate_up.split([mlp.gate_proj.out_features, mlp.up_proj.out_features], dim=-1)
    return _call(mlp.down_proj, silu_mul(gate, up))


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """LM head (+ final soft-capping where the model has it), in fp32."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@dataclass(frozen=True)
class Virtual:
    """A soft prompt of any method in its saved form: `tensor` is PEFT's `prompt_embeddings` (see the module
    docstring for the shapes). A plain tensor passed where a Virtual is expected means prompt tuning."""

    tensor: torch.Tensor
    method: str = "prompt"

    @property
    def num_virtual_tokens(self) -> int:
        return self.tensor.shape[0]

    @property
    def shape(self) -> torch.Size:
        return self.tensor.shape

    @property
    def embeds_input(self) -> bool:
        """True when the tensor is input embeddings (prompt, ptuning); False for keys/values (prefix, cartridge)."""
        return self.method not in KV_METHODS


def as_virtual(prompt: "torch.Tensor | Virtual | None") -> "Virtual | None":
    return prompt if prompt is None or isinstance(prompt, Virtual) else Virtual(prompt)


def prefix_layout(model) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a prefix for a model (or its transformers config), as PEFT 0.21 sizes it from
    the config's fields (utils/other.py, _prepare_prompt_learning_config): hidden size / heads under GPT-2's, OPT's
    or NeoX's names; on models with num_key_value_heads, kv_heads x head_dim, where head_dim is the config's own
    (Qwen3, Gemma) and, for models whose layers differ, the largest layer's (global_head_dim, per_layer_config)."""
    config = getattr(model, "config", model)
    fields = _config_fields(model)
    layers = getattr(config, "num_hidden_layers", None) or _first(fields, "num_hidden_layers", "num_layers", "n_layer")
    width = _first(fields, "hidden_size", "n_embd", "d_model")
    heads = _first(fields, "num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
    if "num_key_value_heads" not in fields:
        return layers, heads, width // heads
    kv_heads = fields["num_key_value_heads"]
    if fields.get("global_head_dim") is not None:
        return layers, fields.get("num_global_key_value_heads") or kv_heads, fields["global_head_dim"]
    head_dim = fields.get("head_dim") or width // heads
    for layer in (fields.get("per_layer_config") or {}).values():  # the largest layer's key/value shape
        if layer.get("head_dim", head_dim) > head_dim:
            head_dim, kv_heads = layer["head_dim"], layer.get("num_key_value_heads", fields["num_key_value_heads"])
    return layers, kv_heads, head_dim


def _config_fields(model) -> dict:
    config = getattr(model, "config", model)
    fields = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    return fields.get("text_config") or fields


def check_prefix_fits(model) -> None:
    """Refuse a prefix for a model whose layers' keys/values differ in shape (e.g. Gemma 4's global layers, with
    larger heads than its sliding ones): a prefix gives every layer the one shape PEFT sizes (the largest)."""
    fields = _config_fields(model)
    layers, kv_heads, head_dim = prefix_layout(model)
    if "num_key_value_heads" not in fields:
        return
    base = (fields["num_key_value_heads"], fields.get("head_dim") or head_dim)
    per = {str(k): v for k, v in (fields.get("per_layer_config") or {}).items()}
    shapes = {
        (per.get(str(i), {}).get("num_key_value_heads", base[0]), per.get(str(i), {}).get("head_dim", base[1]))
        for i in range(layers)
    }
    if fields.get("global_head_dim") is not None:
        shapes |= {base, (kv_heads, head_dim)}
    if len(shapes) > 1:
        described = ", ".join(f"{k} x {d}" for k, d in sorted(shapes))
        raise ValueError(
            f"prefix tuning cannot run on {type(model).__name__}: its layers' keys/values differ in "
            f"shape (kv heads x head dim: {described}) and a prefix gives every layer one shape; "
            "use --method prompt or ptuning"
        )


def _first(fields: dict, *names: str):
    """The value of the first of `names` a config dict has (transformers families name the same size differently)."""
    for name in names:
        if fields.get(name) is not None:
            return fields[name]
    raise ValueError(f"the model config has none of the fields {', '.join(names)}")


def prefix_width(model) -> int:
    """Width of one virtual position of a prefix: layers x 2 (key, value) x kv_heads x head_dim."""
    layers, kv_heads, head_dim = prefix_layout(model)
    return layers * 2 * kv_heads * head_dim


def prefix_kv(model, flat: torch.Tensor) -> Kv:
    """Per-layer keys/values [1, kv_heads, N, head_dim] (model dtype) of a prefix [N, layers * 2 * kv_heads * head_dim].
    PEFT's layout (peft_model.get_prompt): per position, layer 0 keys, layer 0 values, layer 1 keys, ..."""
    layers, kv_heads, head_dim = prefix_layout(model)
    check_prefix_fits(model)
    if flat.ndim != 2 or flat.shape[1] != layers * 2 * kv_heads * head_dim:
        raise ValueError(
            f"a prefix for this model needs shape [N, {layers * 2 * kv_heads * head_dim}] "
            f"({layers} layers x 2 x {kv_heads} kv heads x {head_dim}), got {tuple(flat.shape)}"
        )
    weight = model.get_input_embeddings().weight
    per = flat.to(weight.device, weight.dtype).view(flat.shape[0], layers * 2, kv_heads, head_dim).permute(1, 2, 0, 3)
    return [(per[2 * i].unsqueeze(0), per[2 * i + 1].unsqueeze(0)) for i in range(layers)]


def flat_prefix(kv: Kv) -> torch.Tensor:
    """The inverse of prefix_kv: per-layer keys/values [1, kv_heads, N, head_dim] -> [N, layers * 2 * kv_heads *
    head_dim] (fp32). E.g. a prefix initialised with the keys/values some real tokens produce."""
    stacked = torch.stack([t[0] for pair in kv for t in pair])  # [layers * 2, kv_heads, N, head_dim]
    return stacked.permute(2, 0, 1, 3).reshape(stacked.shape[2], -1).float()


def prompt_kv(model, prompt: "torch.Tensor | Virtual", every: bool = False) -> tuple[Kv, torch.Tensor | None]:
    """Keys/values of the virtual tokens at positions 0..N-1 (batch 1), and the last virtual token's hidden state
    (with `every`, all N of them, [N, H]; None for a prefix, which has none).

    They do not depend on what follows, so generation computes them once per adapter; training recomputes them each
    step (they carry the gradient to the prompt).
    """
    prompt = as_virtual(prompt)
    if not prompt.embeds_input:
        return prefix_kv(model, prompt.tensor), None
    hidden, cache = _run_virtual(model, prompt.tensor, make_cache())
    return cache_tensors(cache), hidden[0] if every else hidden[0, -1]


def virtual_hidden(model, tensor: torch.Tensor) -> torch.Tensor:
    """The hidden states [N, H] of input-embedding virtual tokens [N, hidden] at positions 0..N-1, no cache kept
    (CPT's context loss where the prompt is concatenated to the rows: under gradient checkpointing)."""
    return _run_virtual(model, tensor, None)[0][0]


def _run_virtual(model, tensor: torch.Tensor, cache):
    embeds = tensor.to(model.get_input_embeddings().weight.dtype).unsqueeze(0)
    n = embeds.shape[1]
    mask = torch.ones(1, n, dtype=torch.long, device=embeds.device)
    pos = torch.arange(n, device=embeds.device).unsqueeze(0)
    return run_body(model, embeds, mask, pos, cache=cache, use_cache=cache is not None)


class SharedPrefix:
    """What every row of several forward/backward passes has in front of its own tokens, computed once (with
    gradient): the virtual tokens' keys/values and, with `text_ids`, those of text tokens every row starts with (run
    at batch 1 on top of the virtual tokens, positions N..N+s-1). Rows passed with this prefix hold only the tokens
    after it; `length` is the number of positions it covers (virtual + shared text) and `last` the hidden state that
    predicts the first token after it (None for a prefix-tuning prompt without shared text).

    Each pass reads detached copies (`kv`, `last`) whose gradients accumulate; `backward()` then sends the summed
    gradient through the prefix's forward into the prompt, once. The result equals running the whole prefix in every
    pass, minus (passes - 1) forward/backward runs of it (and, with shared text, minus its rows - 1 copies per pass).
    Under torch.no_grad it is a plain cache for scoring.
    """

    def __init__(
        self,
        model,
        prompt: "torch.Tensor | Virtual | None",
        text_ids: torch.Tensor | None = None,
        keep_hidden: bool = False,
    ):
        prompt = as_virtual(prompt)
        has_text = text_ids is not None and text_ids.numel() > 0
        if has_text and prompt is not None and prompt.embeds_input and torch.is_grad_enabled():
            self._joint(model, prompt, text_ids.reshape(1, -1), keep_hidden)
            return
        kv, last = prompt_kv(model, prompt, every=keep_hidden) if prompt is not None else ([], None)
        # keep_hidden: the virtual tokens' hidden states [N, H], with their graph (CPT's context loss reads them)
        self.hidden = last if keep_hidden else None
        last = last[-1] if keep_hidden and last is not None else last
        length = prompt.num_virtual_tokens if prompt is not None else 0
        self._anchor = None
        if has_text:
            # a base sharded with FSDP (--shard-base) gathers a layer's weights for the backward pass when the
            # gradient of the layer's output arrives; the virtual tokens' last layer output then feeds nothing but
            # its keys/values do, so it gets a zero gradient that makes that layer gather first
            self._anchor = last if last is not None and _fsdp_sharded(model) else None
            ids = text_ids.reshape(1, -1)
            s = ids.shape[1]
            mask = torch.ones(1, length + s, dtype=torch.long, device=ids.device)
            pos = torch.arange(length, length + s, device=ids.device).unsqueeze(0)
            hidden, cache = run_body(
                model, model.get_input_embeddings()(ids), mask, pos, cache=make_cache(kv), use_cache=True
            )
            kv, last, length = cache_tensors(cache), hidden[0, -1], length + s
        if not length:
            raise ValueError("a SharedPrefix needs a prompt or shared text")
        self._hold(kv, last, length)

    def _joint(self, model, prompt: "Virtual", ids: torch.Tensor, keep_hidden: bool) -> None:
        """Training with input-embedding virtual tokens and shared text: both in one pass at batch 1 (positions
        0..N+s-1, causal), the same values as the virtual tokens first and the text on their cache, in one set of
        small matrix products per layer instead of two (each costs about as much at 2 rows as at 15)."""
        embeds = model.get_input_embeddings()
        joint = torch.cat([prompt.tensor.to(embeds.weight.dtype).unsqueeze(0), embeds(ids)], dim=1)
        length, n = joint.shape[1], prompt.num_virtual_tokens
        mask = torch.ones(1, length, dtype=torch.long, device=joint.device)
        pos = torch.arange(length, device=joint.device).unsqueeze(0)
        hidden, cache = run_body(model, joint, mask, pos, cache=make_cache(), use_cache=True)
        self.hidden = hidden[0, :n] if keep_hidden else None
        # a sharded base (see above) gathers its last layer once that layer's output gets a gradient; the shared text's
        # first row may have no label, and then only the keys/values do
        self._anchor = hidden[0, -1] if _fsdp_sharded(model) else None
        self._hold(cache_tensors(cache), hidden[0, -1], length)

    def _hold(self, kv: Kv, last: torch.Tensor | None, length: int) -> None:
        """Keep the prefix's tensors (with their graph) and the detached copies the passes read."""
        self.length = length
        self._kv, self._last = kv, last
        self.kv: Kv = [(k.detach().requires_grad_(), v.detach().requires_grad_()) for k, v in self._kv]
        self.last = self._last.detach().requires_grad_() if self._last is not None else None

    def backward(self, extra: torch.Tensor | None = None) -> None:
        """Send the passes' gradients into the prompt, with `extra` (a scalar loss computed from `hidden`) in the
        same backward pass."""
        last = [(self._last, self.last)] if self._last is not None else []
        sources = [t for pair in self._kv for t in pair] + [s for s, _ in last]
        copies = [t for pair in self.kv for t in pair] + [c for _, c in last]
        used = [(s, c.grad) for s, c in zip(sources, copies) if c.grad is not None and s.requires_grad]
        if used and self._anchor is not None and self._anchor.requires_grad:
            used.append((self._anchor, torch.zeros_like(self._anchor)))
        if extra is not None and extra.requires_grad:
            used.append((extra, torch.ones_like(extra)))
        if used:
            torch.autograd.backward([s for s, _ in used], [g for _, g in used])


def _fsdp_sharded(model) -> bool:
    """True when the decoder stack is sharded with torch's FSDP2 (fully_shard)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model.base_model, FSDPModule)


def text_hidden(
    model,
    prompt: "torch.Tensor | Virtual | None",
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mode: str = "kv",
    prefix: SharedPrefix | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states at the text positions [B, L, H] with the soft prompt in front, plus the hidden state that
    predicts the first text token (the last virtual token's; None without a prompt or with a prefix). `prefix` (kv
    mode): the prompt's keys/values already computed, instead of running the virtual tokens here; with shared text in
    it, `input_ids` are each row's tokens after that text, and the hidden state returned with them is the last shared
    token's."""
    embeds = model.get_input_embeddings()(input_ids)
    prompt = as_virtual(prompt)
    if prompt is None and prefix is None:
        hidden, _ = run_body(model, embeds, attention_mask, positions_from_mask(attention_mask))
        return hidden, None
    batch, n = input_ids.shape[0], (prefix.length if prefix is not None else prompt.num_virtual_tokens)
    ones = torch.ones(batch, n, dtype=attention_mask.dtype, device=attention_mask.device)
    full_mask = torch.cat([ones, attention_mask], dim=1)
    if mode == "concat":
        if prefix is not None:
            raise ValueError("a SharedPrefix is for mode 'kv' (mode 'concat' runs the whole sequence)")
        if not prompt.embeds_input:
            raise ValueError(
                "a prefix-tuning prompt has no input embeddings to concatenate (mode 'concat', used with "
                "gradient checkpointing); use mode 'kv'"
            )
        p = prompt.tensor.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        hidden, _ = run_body(model, torch.cat([p, embeds], dim=1), full_mask, positions_from_mask(full_mask))
        return hidden[:, n:], hidden[0, n - 1]
    if mode != "kv":
        raise ValueError(f"unknown prefix mode {mode!r}: use 'kv' or 'concat'")
    kv, last = (prefix.kv, prefix.last) if prefix is not None else prompt_kv(model, prompt)
    expanded = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv]
    # read-only: nothing reads this cache afterwards, and a checkpointed layer's recompute must see the same keys
    cache = ReadOnlyCache(expanded)
    hidden, _ = run_body(model, embeds, full_mask, positions_from_mask(attention_mask, n), cache=cache)
    return hidden, last


def label_nll(
    model,
    prompt: "torch.Tensor | Virtual | None",
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    mode: str = "kv",
    prefix: SharedPrefix | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed negative log-likelihood of the label tokens and per-row label counts.

    labels follow the Hugging Face convention: same shape as input_ids, -100 where there is nothing to learn; the
    token at t is predicted from position t-1 (from the last virtual token for t = 0; for a prefix, or without a
    prompt, the token at t = 0 is not scored, as in PEFT).
    """
    rows, chosen, (targets,) = _labelled(model, prompt, input_ids, attention_mask, labels, mode, prefix)
    return _per_row(head_nll(model, chosen, targets), rows, input_ids.shape[0])


def _labelled(model, prompt, input_ids, attention_mask, labels, mode, prefix, *per_token):
    """The labelled positions of a batch: each one's row, the hidden state that predicts it (position t-1; the last
    virtual token for t = 0, which a prefix or no prompt does not score), and the label and any `per_token` tensors
    ([B, L, ...], aligned with input_ids) at those positions."""
    hidden, last = text_hidden(model, prompt, input_ids, attention_mask, mode, prefix)
    if last is not None:
        previous = torch.cat([last.expand(hidden.shape[0], 1, -1), hidden[:, :-1]], dim=1)
    else:
        previous, labels, per_token = hidden[:, :-1], labels[:, 1:], tuple(t[:, 1:] for t in per_token)
    rows, cols = (labels != -100).nonzero(as_tuple=True)
    return rows, previous[rows, cols], tuple(t[rows, cols] for t in (labels, *per_token))


def _per_row(values: torch.Tensor, rows: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position values summed per row, and each row's count of positions."""
    per_row = torch.zeros(batch, dtype=values.dtype, device=values.device).index_add_(0, rows, values)
    return per_row, torch.bincount(rows, minlength=batch)


def label_kl(
    model,
    prompt: "torch.Tensor | Virtual | None",
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mode: str = "kv",
    prefix: SharedPrefix | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed distillation loss (`topk_kl`) at the label positions, and per-row label counts: label_nll's
    positions (the token at t predicted from t-1, labels -100 where there is nothing to learn), with the teacher's
    top-k token ids and log-probabilities [B, L, k] given for each labelled token t instead of the token itself."""
    rows, chosen, (_, ids, logprobs) = _labelled(
        model, prompt, input_ids, attention_mask, labels, mode, prefix, teacher_ids, teacher_logprobs
    )
    kl = (
        torch.cat(
            [
                topk_kl(lm_logits(model, h), i, p)
                for h, i, p in zip(chosen.split(HEAD_CHUNK), ids.split(HEAD_CHUNK), logprobs.split(HEAD_CHUNK))
            ]
        )
        if rows.numel()
        else chosen.new_zeros(0, dtype=torch.float32)
    )
    return _per_row(kl, rows, input_ids.shape[0])


def topk_kl(logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position [n] over the teacher's top-k tokens: the teacher's probabilities of its
    k most likely tokens renormalised to sum to 1 (q), against the student's log-probabilities of the same tokens
    under its full softmax (logits [n, V]): sum_i q_i (log q_i - log p_i). It is zero only when the student puts
    exactly q on those tokens (and so nothing elsewhere), as the Cartridges paper's top-k distillation."""
    log_q = torch.log_softmax(teacher_logprobs.float(), dim=-1)  # renormalised over the k tokens
    log_p = torch.log_softmax(logits.float(), dim=-1).gather(-1, teacher_ids.long())
    return (log_q.exp() * (log_q - log_p)).sum(-1)


HEAD_CHUNK = 128  # label rows per LM-head chunk: 128 x 49,152 fp32 logits = 25 MB at a time


def head_nll(model, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = HEAD_CHUNK) -> torch.Tensor:
    """Negative log-likelihood of each target token from its hidden state [n, H] -> [n] (fp32).

    Without gradient it is the plain LM head + cross-entropy, chunked. With gradient it is `_FusedHeadNLL`: equal
    values and gradients (tests check), but peak memory holds one chunk of logits instead of all of them three times
    (logits, log-softmax saved for backward, and its gradient).
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    if not (torch.is_grad_enabled() and hidden.requires_grad):
        return torch.cat(
            [
                F.cross_entropy(lm_logits(model, h), t, reduction="none")
                for h, t in zip(hidden.split(chunk), targets.split(chunk))
            ]
        )
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    gradient = packed.head_gradient(head) if hidden.dtype == torch.bfloat16 else None
    return _FusedHeadNLL.apply(hidden, targets, head.weight, head.bias, cap, chunk, gradient)


class _FusedHeadNLL(torch.autograd.Function):
    """LM head + cross-entropy whose backward is precomputed chunk by chunk in the forward pass.

    d nll / d logits = softmax(logits) - onehot(target) (times the soft-capping derivative where the model caps its
    logits), so d nll / d hidden = that @ W; only this [n, H] tensor is saved. The head's weight is frozen. In bf16 on
    the CPU that product uses a prepacked W^T (`packed.head_gradient`: the same bits, probed).
    """

    @staticmethod
    def forward(ctx, hidden, targets, weight, bias, cap, chunk, gradient=None):
        nlls, grads = [], []
        for h, t in zip(hidden.split(chunk), targets.split(chunk)):
            logits = F.linear(h, weight, bias).float()
            if cap:
                capped = torch.tanh(logits / cap)
                logits = capped * cap
            log_probs = torch.log_softmax(logits, dim=-1)
            nlls.append(-log_probs.gather(1, t.unsqueeze(1)).squeeze(1))
            d_logits = log_probs.exp_()
            d_logits[torch.arange(len(t), device=t.device), t] -= 1
            if cap:
                d_logits *= 1 - capped * capped
            d_logits = d_logits.to(weight.dtype)
            grads.append(gradient(d_logits) if gradient is not None else d_logits @ weight)
        ctx.save_for_backward(torch.cat(grads))
        return torch.cat(nlls)

    @staticmethod
    def backward(ctx, grad_nll):
        (d_hidden,) = ctx.saved_tensors
        return grad_nll.unsqueeze(1).to(d_hidden.dtype) * d_hidden, None, None, None, None, None, None
