"""The public entry point ``sparse_attn_func``: argument checks, pattern -> layout, dispatch."""

from __future__ import annotations

import functools

import torch

from ..layout import SparseLayout, build_layout
from ..layout.reorder import inverse
from ..ops import check_layout_tensors, sparse_attn_op
from ..reference import sparse_attention
from .cache import cached_layout
from .checks import (check_backend, check_bias, check_layout, check_pattern, check_qkv,
                     check_scalars)
from .window import check_window, window_layout


def sparse_attn_func(query, key, value, attn_mask=None, attn_bias=None, is_causal=None,
                     softmax_scale=None, *, attn_indices=None, layout=None, return_lse=False,
                     softcap=0.0, backend="auto", window_size=(-1, -1), sinks=0):
    """Exact softmax attention restricted to a sparse pattern.

    Args:
        query: ``(B, Lq, Hq, D)`` float16, bfloat16 or float32; any strides.
        key, value: ``(B, Lk, Hkv, D)``, same dtype and device; ``Hq % Hkv == 0`` (GQA/MQA).
        attn_mask: dense bool ``(B|1, Hq|Hkv|1, Lq|1, Lk|1)``, True = attend; size-1 dims
            broadcast (``(B, 1, 1, Lk)`` is a key-padding mask, never expanded to Lq x Lk).
        attn_bias: additive bias ``(B|1, Hq|Hkv|1, Lq|1, Lk)`` in the query's dtype, added to
            the (soft-capped) scaled scores of every active pair; differentiable, its gradient
            comes back in its own shape, summed over the broadcast dims, zero on inactive pairs.
            A row whose every active key has a ``-inf`` bias is an empty row.
        is_causal: ``True``, ``False`` or ``None``: bottom-right aligned causality (query i sees
            key j iff j <= i + Lk - Lq), applied to the pattern in preprocessing. ``None``
            means False, except with ``layout=``, where it means "whatever the layout was built
            with"; an explicit value that contradicts the layout is an error.
        softmax_scale: a finite float > 0; defaults to ``1 / sqrt(D)``.
        attn_indices: integer tensor ``(B|1, Hkv|1, Lq, W)``, entries in ``[-1, Lk)``, -1 =
            unused. Its layout is cached by content (see ``api.cache``); ``layout=`` skips the
            cache's comparison.
        layout: a :class:`SparseLayout` from :func:`build_layout` (built once, reused).
        return_lse: also return ``lse`` ``(B, Hq, Lq)`` float32 (natural log; -inf for rows
            with no active key). It is differentiable.
        softcap: a finite float; if > 0, scores become ``softcap * tanh(score / softcap)``
            before the softmax (Gemma-2, FSA's CUDA path), forward and backward; 0 = off.
        backend: ``"auto"`` (Triton on CUDA tensors or under ``TRITON_INTERPRET=1``, else the
            pure-PyTorch path), ``"triton"`` or ``"torch"``.
        window_size: ``(left, right)`` as in FlashAttention: query ``i`` sees keys ``[p - left,
            p + right]``, ``p = i + Lk - Lq``, -1 = unbounded; combinable with ``is_causal``.
            The layout is computed on the query's device and cached, never from indices.
        sinks: the first ``sinks`` keys are visible to every query (with ``is_causal``, to
            queries at or after them); only together with a bounded ``window_size``.

    At most one of ``attn_mask``, ``attn_indices``, ``layout``, ``window_size``; with none,
    dense attention.
    Returns ``out`` ``(B, Lq, Hq, D)`` in the input dtype, and ``lse`` if asked. Zero-size
    batches or lengths give empty results; ``Lk = 0`` makes every row empty (zeros, lse -inf).
    """
    batch, q_len, num_q_heads, head_dim = check_qkv(query, key, value)
    num_kv_heads, k_len = key.shape[2], key.shape[1]
    given = [name for name, x in (("attn_mask", attn_mask), ("attn_indices", attn_indices),
                                  ("layout", layout)) if x is not None]
    if len(given) > 1:
        raise ValueError(f"pass at most one of attn_mask, attn_indices, layout; got {given}")
    window = check_window(window_size, sinks)
    if window is not None and given:
        raise ValueError(f"window_size/sinks and {given[0]} cannot be combined: build the "
                         "window into the pattern instead (patterns.sliding_window)")
    softmax_scale, softcap = check_scalars(head_dim, is_causal, softmax_scale, softcap,
                                           return_lse, backend)
    path = check_backend(backend, query)
    heads_ok = (1, num_kv_heads, num_q_heads)
    if attn_bias is not None:
        check_bias(attn_bias, query, batch, q_len, k_len, heads_ok)
    if window is not None and min(batch, q_len, k_len) > 0:
        layout = window_layout(q_len, k_len, window, bool(is_causal), query.device)
    if layout is not None:
        check_layout(layout, is_causal, batch, q_len, k_len, heads_ok, query.device)
    elif attn_indices is not None:
        check_pattern("attn_indices", attn_indices, batch, q_len, None, heads_ok)
    elif attn_mask is not None:
        check_pattern("attn_mask", attn_mask, batch, q_len, k_len, heads_ok, broadcast=True)

    if batch == 0 or q_len == 0 or k_len == 0:
        if attn_indices is not None and k_len == 0 and bool((attn_indices != -1).any()):
            raise ValueError("attn_indices must be -1 everywhere when key has length 0")
        out, lse = _no_keys(query, key, value, attn_bias)
        return (out, lse) if return_lse else out
    if layout is None:
        layout = _layout_of_pattern(attn_indices, attn_mask, bool(is_causal), q_len, k_len,
                                    query.device)
    if path == "torch":
        check_layout_tensors(layout)
        out, lse = _reference_path(query, key, value, layout, softmax_scale, softcap, attn_bias)
    else:  # the kernels apply a reordered layout's permutation in their loads and stores
        out, lse = sparse_attn_op(query, key, value, layout, softmax_scale, softcap, attn_bias)
    return (out, lse) if return_lse else out


def _no_keys(query, key, value, bias):
    """The result of a call without any (batch, query, key) triple: zeros and lse -inf, in the
    autograd graph of every input so that a backward gives zero gradients (never NaN: ``where``
    passes no gradient through the branch it drops)."""
    batch, q_len, num_q_heads, _ = query.shape
    tie = query.sum() + key.sum() + value.sum() + (bias.sum() if bias is not None else 0)
    keep = torch.zeros((), dtype=torch.bool, device=query.device)
    out = torch.where(keep, tie.to(query.dtype), query.new_zeros(query.shape))
    lse = torch.where(keep, tie.float(), query.new_full((batch, num_q_heads, q_len),
                                                        float("-inf"), dtype=torch.float32))
    return out, lse


def _reference_path(query, key, value, layout, softmax_scale, softcap, bias):
    """The pure-PyTorch path; a reordered layout gathers the inputs into its token order and
    scatters the results back."""
    if not layout.is_reordered:
        return sparse_attention(query, key, value, layout, softmax_scale, softcap, bias)
    query = query.index_select(1, layout.q_perm)
    key = key.index_select(1, layout.k_perm)
    value = value.index_select(1, layout.k_perm)
    if bias is not None:
        if bias.shape[2] > 1:
            bias = bias.index_select(2, layout.q_perm)
        bias = bias.index_select(3, layout.k_perm)
    out, lse = sparse_attention(query, key, value, layout, softmax_scale, softcap, bias)
    q_inv = inverse(layout.q_perm)
    return out.index_select(1, q_inv), lse.index_select(2, q_inv)


@torch.compiler.disable
def _layout_of_pattern(attn_indices, attn_mask, is_causal, q_len, k_len, device):
    """The layout of a per-call ``attn_indices`` / ``attn_mask`` (or of dense attention), on
    ``device``. Its size depends on the pattern's values, so ``torch.compile`` cannot trace it:
    the call is a graph break (an error under ``fullgraph=True``); compiled models build the
    layout outside and pass ``layout=``."""
    if attn_indices is not None:
        layout = cached_layout(attn_indices, (k_len, is_causal), lambda: build_layout(
            attn_indices, k_len, is_causal=is_causal))
    elif attn_mask is not None:
        layout = cached_layout(attn_mask, (q_len, k_len, is_causal),
                               lambda: SparseLayout.from_dense_mask(
                                   attn_mask, is_causal=is_causal, q_len=q_len, k_len=k_len))
    else:
        with torch.inference_mode(False):
            layout = _dense_layout(q_len, k_len, is_causal, str(device))
    return layout.to(device)  # a pattern given per call may live elsewhere (an explicit layout=
    # on another device is refused: moving it every call would hide the cost)


@functools.lru_cache(maxsize=16)
def _dense_layout(q_len, k_len, is_causal, device):
    return SparseLayout.dense(q_len, k_len, is_causal=is_causal, device=device)
