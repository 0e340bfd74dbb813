"""The public entry point ``sparse_attn_func``: argument checks, pattern -> layout, dispatch."""

from __future__ import annotations

import collections
import functools
import math
import os
import weakref

import torch

from .layout import SparseLayout, build_layout
from .ops import sparse_attn_op
from .reference import sparse_attention
from .layout.reorder import inverse

MAX_HEAD_DIM = 256
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BACKENDS = ("auto", "triton", "torch")


def sparse_attn_func(query, key, value, attn_mask=None, attn_bias=None, is_causal=None,
                     softmax_scale=None, *, attn_indices=None, layout=None, return_lse=False,
                     softcap=0.0, backend="auto"):
    """Exact softmax attention restricted to a sparse pattern.

    Args:
        query: ``(B, Lq, Hq, D)`` float16, bfloat16 or float32; any strides.
        key, value: ``(B, Lk, Hkv, D)``, same dtype and device; ``Hq % Hkv == 0`` (GQA/MQA).
        attn_mask: dense bool ``(B|1, Hq|Hkv|1, Lq|1, Lk|1)``, True = attend; size-1 dims
            broadcast (``(B, 1, 1, Lk)`` is a key-padding mask, never expanded to Lq x Lk).
        attn_bias: additive bias ``(B|1, Hq|Hkv|1, Lq|1, Lk)`` in the query's dtype, added to
            the (soft-capped) scaled scores of every active pair; differentiable, its gradient
            comes back in its own shape, summed over the broadcast dims, zero on inactive pairs.
        is_causal: bottom-right aligned causality (query i sees key j iff j <= i + Lk - Lq),
            applied to the pattern in preprocessing. ``None`` means False, except with
            ``layout=``, where it means "whatever the layout was built with"; an explicit value
            that contradicts the layout is an error.
        softmax_scale: defaults to ``1 / sqrt(D)``.
        attn_indices: integer ``(B|1, Hkv|1, Lq, W)``, entries in ``[-1, Lk)``, -1 = unused.
        layout: a :class:`SparseLayout` from :func:`build_layout` (built once, reused).
        return_lse: also return ``lse`` ``(B, Hq, Lq)`` float32 (natural log; -inf for rows
            with no active key). It is differentiable.
        softcap: if > 0, scores become ``softcap * tanh(score / softcap)`` before the softmax
            (Gemma-2, FSA's CUDA path), forward and backward; 0 = off.
        backend: ``"auto"`` (Triton on CUDA tensors or under ``TRITON_INTERPRET=1``, else the
            pure-PyTorch path), ``"triton"`` or ``"torch"``.

    At most one of ``attn_mask``, ``attn_indices``, ``layout``; with none, dense attention.
    Returns ``out`` ``(B, Lq, Hq, D)`` in the input dtype, and ``lse`` if asked.
    """
    batch, q_len, num_q_heads, head_dim = _check_qkv(query, key, value)
    num_kv_heads, k_len = key.shape[2], key.shape[1]
    given = [name for name, x in (("attn_mask", attn_mask), ("attn_indices", attn_indices),
                                  ("layout", layout)) if x is not None]
    if len(given) > 1:
        raise ValueError(f"pass at most one of attn_mask, attn_indices, layout; got {given}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or softcap < 0:
        raise ValueError(f"softcap must be a float >= 0 (0 = off), got {softcap!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    heads_ok = (1, num_kv_heads, num_q_heads)
    if attn_bias is not None:
        _check_bias(attn_bias, query, batch, q_len, k_len, heads_ok)

    if layout is not None:
        _check_layout(layout, is_causal, batch, q_len, k_len, heads_ok, query.device)
    else:
        if attn_indices is not None:
            _check_pattern("attn_indices", attn_indices, batch, q_len, None, heads_ok)
        elif attn_mask is not None:
            if not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool:
                raise TypeError("attn_mask must be a torch.bool tensor (True = attend), got "
                                f"{getattr(attn_mask, 'dtype', type(attn_mask).__name__)}")
            _check_pattern("attn_mask", attn_mask, batch, q_len, k_len, heads_ok, broadcast=True)
        layout = _layout_of_pattern(attn_indices, attn_mask, bool(is_causal), q_len, k_len,
                                    query.device)

    if backend == "torch" or (backend == "auto" and not _triton_available(query)):
        out, lse = _reference_path(query, key, value, layout, softmax_scale, softcap, attn_bias)
    else:  # the kernels apply a reordered layout's permutation in their loads and stores
        out, lse = sparse_attn_op(query, key, value, layout, softmax_scale, softcap, attn_bias)
    return (out, lse) if return_lse else out


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
        layout = _cached(attn_indices, (k_len, is_causal), lambda: build_layout(
            attn_indices, k_len, is_causal=is_causal))
    elif attn_mask is not None:
        layout = _cached(attn_mask, (q_len, k_len, is_causal), lambda: SparseLayout.from_dense_mask(
            attn_mask, is_causal=is_causal, q_len=q_len, k_len=k_len))
    else:
        layout = _dense_layout(q_len, k_len, is_causal, str(device))
    return layout.to(device)  # a pattern given per call may live elsewhere (an explicit layout=
    # on another device is refused: moving it every call would hide the cost)


# Layouts built from per-call patterns, so that a model passing the same attn_indices (or
# attn_mask) tensor to every layer builds its layout once (the transformers integration keeps
# its mask-and-layout intersections here too). Keyed on the tensor's identity and its version
# counter (bumped by every in-place change), with a weak reference that proves the identity is
# still that tensor's; `args` are compared by value (a SparseLayout by identity, held).
LAYOUT_CACHE_SIZE = 8
_LAYOUT_CACHE: collections.OrderedDict = collections.OrderedDict()


def _cached(pattern: torch.Tensor, args: tuple, build):
    key = (id(pattern), pattern._version, args)
    hit = _LAYOUT_CACHE.get(key)
    if hit is not None and hit[0]() is pattern:
        _LAYOUT_CACHE.move_to_end(key)
        return hit[1]
    layout = build()
    _LAYOUT_CACHE[key] = (weakref.ref(pattern), layout)
    while len(_LAYOUT_CACHE) > LAYOUT_CACHE_SIZE:
        _LAYOUT_CACHE.popitem(last=False)
    return layout


def clear_layout_cache() -> None:
    """Forget the layouts built from per-call ``attn_indices`` / ``attn_mask`` (and the
    transformers integration's intersections of a model's mask with ``sparse_layout``)."""
    _LAYOUT_CACHE.clear()


def _triton_available(t: torch.Tensor) -> bool:
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=16)
def _dense_layout(q_len, k_len, is_causal, device):
    return SparseLayout.dense(q_len, k_len, is_causal=is_causal, device=device)


def _check_qkv(query, key, value):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, seqlen, heads, head_dim), got "
                             f"{tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError("query, key and value must share a dtype, got "
                        f"{query.dtype}, {key.dtype}, {value.dtype}")
    if not query.device == key.device == value.device:
        raise ValueError("query, key and value must be on one device, got "
                         f"{query.device}, {key.device}, {value.device}")
    if key.shape != value.shape:
        raise ValueError(f"key and value must have the same shape, got {tuple(key.shape)} and "
                         f"{tuple(value.shape)}")
    batch, q_len, num_q_heads, head_dim = query.shape
    if key.shape[0] != batch:
        raise ValueError(f"key has batch {key.shape[0]} but query has batch {batch}")
    if key.shape[3] != head_dim:
        raise ValueError(f"key has head_dim {key.shape[3]} but query has head_dim {head_dim}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} is not supported: it must be in "
                         f"[1, {MAX_HEAD_DIM}]")
    if key.shape[2] == 0 or num_q_heads % key.shape[2]:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of key/value heads "
                         f"({key.shape[2]})")
    return batch, q_len, num_q_heads, head_dim


def _check_pattern(name, pattern, batch, q_len, k_len, heads_ok, broadcast=False):
    """Shape checks of attn_indices (``k_len=None``) or attn_mask (``broadcast``: its query and
    key dims may be 1, FSA's rules)."""
    if pattern.dim() != 4:
        raise ValueError(f"{name} must be 4-D (batch, heads, q_len, ...), got "
                         f"{tuple(pattern.shape)}")
    n_b, n_h, n_q, n_k = pattern.shape
    if n_b not in (1, batch):
        raise ValueError(f"{name} has batch {n_b}; expected 1 or {batch}")
    if n_h not in heads_ok:
        raise ValueError(f"{name} has {n_h} heads; expected one of {sorted(set(heads_ok))}")
    if n_q != q_len and not (broadcast and n_q == 1):
        raise ValueError(f"{name} has {n_q} query rows but query has length {q_len}")
    if k_len is not None and n_k != k_len and not (broadcast and n_k == 1):
        raise ValueError(f"{name} has {n_k} key columns but key has length {k_len}")


def _check_bias(bias, query, batch, q_len, k_len, heads_ok):
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"attn_bias must be a torch.Tensor, got {type(bias).__name__}")
    if bias.dtype != query.dtype:
        raise TypeError(f"attn_bias must have the query's dtype {query.dtype}, got {bias.dtype}")
    if bias.device != query.device:
        raise ValueError(f"attn_bias is on {bias.device} but query is on {query.device}")
    if bias.dim() != 4 or bias.shape[0] not in (1, batch) or bias.shape[1] not in heads_ok \
            or bias.shape[2] not in (1, q_len) or bias.shape[3] != k_len:
        raise ValueError(f"attn_bias must have shape (B|1, Hq|Hkv|1, Lq|1, Lk) = ({batch}|1, "
                         f"{'|'.join(map(str, sorted(set(heads_ok), reverse=True)))}, "
                         f"{q_len}|1, {k_len}), got {tuple(bias.shape)}")


def _check_layout(layout, is_causal, batch, q_len, k_len, heads_ok, device):
    if not isinstance(layout, SparseLayout):
        raise TypeError(f"layout must be a SparseLayout, got {type(layout).__name__}")
    if (layout.q_len, layout.k_len) != (q_len, k_len):
        raise ValueError(f"layout is for q_len={layout.q_len}, k_len={layout.k_len} but the "
                         f"inputs have q_len={q_len}, k_len={k_len}")
    if layout.batch not in (1, batch):
        raise ValueError(f"layout has batch {layout.batch}; expected 1 or {batch}")
    if layout.heads not in heads_ok:
        raise ValueError(f"layout has {layout.heads} heads; expected one of "
                         f"{sorted(set(heads_ok))}")
    if is_causal is not None and bool(is_causal) != layout.is_causal:
        raise ValueError(f"is_causal={is_causal} contradicts the layout, built with "
                         f"is_causal={layout.is_causal}")
    if layout.device != device:
        raise ValueError(f"layout is on {layout.device} but query is on {device}; "
                         "move it once with layout.to(device)")
