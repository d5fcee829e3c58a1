"""Attention for grouped-query models on the CPU: PyTorch SDPA reading the grouped key/value heads in place.

transformers' "sdpa" function copies the key/value heads of grouped-query-attention models (`repeat_kv`) whenever it
passes an attention mask, because CUDA's fused kernels cannot take a mask and grouped heads together. PyTorch's CPU
flash kernel can, so on the CPU that copy is pure overhead: one full-head key and value tensor per layer that autograd
keeps for the backward pass (on SmolLM2-135M, 9 heads over 3: 3 KB per token per layer, about a tenth of training's
saved activations). `grouped_sdpa` hands the grouped heads straight to the kernel on the CPU and defers to
transformers' own sdpa function everywhere else (CUDA, no mask, single-token decoding, position biases).

`use_grouped_sdpa(model)` registers it (with sdpa's mask builder) under NAME and switches a loaded model to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "softprompt_sdpa"


def grouped_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                 is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention-function signature: query [B, heads, Lq, D], key/value [B, kv_heads, Lk, D]."""
    groups = getattr(module, "num_key_value_groups", 1)
    if (query.device.type != "cpu" or groups == 1 or attention_mask is None or query.shape[2] == 1
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def use_grouped_sdpa(model) -> bool:
    """Switch a model loaded with attn_implementation="sdpa" to `grouped_sdpa`; False (model unchanged) when the
    model uses another attention or cannot take a registered one."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(NAME, grouped_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, AttributeError, NotImplementedError):
        return False
    return model.config._attn_implementation == NAME
