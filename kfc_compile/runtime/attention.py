"""Self-attention with tapped projections: the ``kfc`` backend's stand-in for ``F.multi_head_attention_forward``.

Dynamo keeps ``F.multi_head_attention_forward`` as one opaque call in its graph, so the packed input projection
(``in_proj_weight``) and the output projection are invisible to a pass that looks for ``F.linear``. For the common
case — self-attention (query, key and value are the same tensor) with the packed projection, no ``bias_k``/
``bias_v``, no ``add_zero_attn``, no static keys/values, no ``is_causal`` hint, a batched sequence-first input —
this module computes the same function with explicit ``F.linear`` calls followed by capture taps. Masks
(``attn_mask`` 2-D/3-D, ``key_padding_mask``, bool or float), dropout, ``need_weights`` and
``average_attn_weights`` are supported. ``supported`` says whether a call qualifies; other variants are left
untouched (their parameters go to the fallback optimizer, with the reason).

Both projections see sequence-first tensors (L, N, ·); their taps are registered ``seq_first`` so that the
statistics get them batch-first (what ``approx="reduce"`` and statistics subsampling need).
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F

from kfc_compile.runtime.record import tap

MHA_TARGET = F.multi_head_attention_forward
MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)

_REQUIRED_DEFAULTS = {  # argument: value that our decomposition requires
    "bias_k": None, "bias_v": None, "add_zero_attn": False, "use_separate_proj_weight": False,
    "static_k": None, "static_v": None, "is_causal": False,
}


def bind(args: tuple, kwargs: dict) -> dict:
    """The call's arguments by name, defaults filled in."""
    bound = MHA_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def unsupported_reason(a: dict, query_dim: int | None) -> str:
    """Empty if ``_self_attention`` computes this call exactly, else why not."""
    if not (a["query"] is a["key"] and a["key"] is a["value"]):
        return "attention with distinct query/key/value tensors (the packed projection is applied in pieces)"
    for name, want in _REQUIRED_DEFAULTS.items():
        if a[name] is not want and a[name] != want:
            return f"attention with {name}={a[name]!r}"
    if query_dim != 3:
        return "unbatched attention input"
    if a["in_proj_weight"] is None:
        return "attention without a packed input projection"
    return ""


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def self_attention(query, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias, dropout_p,
                   out_proj_weight, out_proj_bias, training, key_padding_mask, need_weights, attn_mask,
                   average_attn_weights, slot, in_key, out_key):
    """``F.multi_head_attention_forward(query, query, query, ...)`` for the supported case, projections tapped.

    A capture tap follows each projection whose key is >= 0.
    """
    tgt_len, bsz, embed_dim = query.shape
    heads = num_heads
    head_dim = embed_dim // heads
    if embed_dim != embed_dim_to_check or head_dim * heads != embed_dim:
        raise AssertionError(f"attention: embedding dimension {embed_dim} does not match {embed_dim_to_check} "
                             f"/ {heads} heads")
    qkv = F.linear(query, in_proj_weight, in_proj_bias)
    if in_key >= 0:
        qkv = tap(qkv, query, slot, in_key)
    q, k, v = qkv.unflatten(-1, (3, embed_dim)).unbind(-2)
    q = q.reshape(tgt_len, bsz * heads, head_dim).transpose(0, 1)
    k = k.reshape(tgt_len, bsz * heads, head_dim).transpose(0, 1)
    v = v.reshape(tgt_len, bsz * heads, head_dim).transpose(0, 1)

    mask = _float_mask(attn_mask, query.dtype)
    if mask is not None and mask.dim() == 2:
        mask = mask.unsqueeze(0)
    padding = _float_mask(key_padding_mask, query.dtype)
    if padding is not None:
        padding = padding.view(bsz, 1, 1, tgt_len).expand(-1, heads, -1, -1).reshape(bsz * heads, 1, tgt_len)
        mask = padding if mask is None else mask + padding
    if not training:
        dropout_p = 0.0

    if need_weights:
        scores_q = q * math.sqrt(1.0 / float(head_dim))
        if mask is not None:
            weights = torch.baddbmm(mask, scores_q, k.transpose(-2, -1))
        else:
            weights = torch.bmm(scores_q, k.transpose(-2, -1))
        weights = torch.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.bmm(weights, v).transpose(0, 1).contiguous().view(tgt_len, bsz, embed_dim)
    else:
        if mask is not None:
            mask = mask.unsqueeze(0) if mask.size(0) == 1 else mask.view(bsz, heads, -1, tgt_len)
        q4 = q.view(bsz, heads, tgt_len, head_dim)
        k4 = k.view(bsz, heads, tgt_len, head_dim)
        v4 = v.view(bsz, heads, tgt_len, head_dim)
        out = F.scaled_dot_product_attention(q4, k4, v4, mask, dropout_p, False)
        out = out.permute(2, 0, 1, 3).contiguous().view(tgt_len, bsz, embed_dim)
        weights = None
    projected = F.linear(out, out_proj_weight, out_proj_bias)  # (L, N, E): the same GEMM as on (L·N, E)
    if out_key >= 0:
        projected = tap(projected, out, slot, out_key)
    if weights is not None:
        weights = weights.view(bsz, heads, tgt_len, tgt_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
    return projected, weights
