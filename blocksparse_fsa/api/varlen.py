"""``sparse_attn_varlen_func``: FlashAttention's varlen interface over one packed layout.

The packed batch runs as one sequence of ``total_q`` queries and ``total_k`` keys whose layout
never pairs a query with another sequence's key, so every sequence, window and causal diagonal
goes through one kernel launch, with no per-sequence Python loop.
"""

from __future__ import annotations

import numbers
import weakref

import torch

from ..layout import SparseLayout, build_layout
from .attention import sparse_attn_func
from .cache import cached_layout
from .checks import flash_causal
from .window import check_window, packed_layout

_INDEX_DTYPES = (torch.int32, torch.int64)


def sparse_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            dropout_p=0.0, *, attn_indices=None, layout=None,
                            window_size=(-1, -1), sinks=0, is_causal=None, softmax_scale=None,
                            softcap=0.0, return_lse=False, backend="auto", causal=None,
                            deterministic=True, alibi_slopes=None, return_attn_probs=False):
    """Attention over packed variable-length sequences, FlashAttention's varlen conventions.

    Args:
        q: ``(total_q, Hq, D)``; k, v: ``(total_k, Hkv, D)``, ``Hq % Hkv == 0``.
        cu_seqlens_q, cu_seqlens_k: int32 (or int64) ``[batch + 1]`` offsets, starting at 0,
            non-decreasing, ending at ``total_q`` / ``total_k``; sequence ``s`` is queries
            ``[cu_q[s], cu_q[s+1])`` against keys ``[cu_k[s], cu_k[s+1])``. Empty sequences and
            ``Lq != Lk`` per sequence are allowed.
        max_seqlen_q, max_seqlen_k: ints >= the longest sequence (checked, not needed).
        attn_indices: optional integer ``(Hkv|1, total_q, W)``: key positions **local to the
            query's sequence**, ``[0, Lk_s)``, -1 = unused, duplicates count once.
        layout: optional :class:`SparseLayout` of the packed batch (batch 1, ``q_len =
            total_q``, ``k_len = total_k``), e.g. from :func:`build_varlen_layout`. With a
            layout, device-side ``cu_seqlens`` and ``max_seqlen`` are not read (no host sync;
            the layout holds the sequences); on the CPU they are still checked.
        window_size: ``(left, right)``, -1 = unbounded: query ``a`` of a sequence sees its
            local keys ``[p - left, p + right]``, ``p = a + Lk_s - Lq_s``.
        sinks: the first ``sinks`` keys of each sequence are visible to all its queries.
        is_causal: bottom-right aligned causality per sequence (key ``b`` <= ``p``); ``None``
            (default) is ``False``, or with ``layout`` whatever the layout holds. A layout
            built here (``build_varlen_layout`` or an earlier call) remembers its offsets and
            causality: host ``cu_seqlens`` or an explicit ``is_causal`` that contradict them
            are an error.
        softmax_scale, softcap, backend: as for :func:`sparse_attn_func`.
        return_lse: also return ``lse`` ``(Hq, total_q)`` float32 (-inf for rows without keys).
        dropout_p, causal, deterministic, alibi_slopes, return_attn_probs: FlashAttention's
            ``flash_attn_varlen_func`` arguments, so that its calls run unchanged: ``causal``
            is ``is_causal``; ``dropout_p`` must be 0 and ``alibi_slopes`` None (not
            supported); the backward is always deterministic; ``return_attn_probs=True``
            returns ``(out, lse, None)`` (no probabilities are formed).

    At most one of ``attn_indices``, ``layout``, ``window_size``/``sinks``.
    Returns ``out`` ``(total_q, Hq, D)`` in the input dtype, and ``lse`` if asked.
    """
    is_causal = flash_causal(is_causal, causal)
    if dropout_p != 0:
        raise ValueError(f"dropout_p must be 0: there is no attention dropout, got {dropout_p!r}")
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes is not supported: pass the ALiBi bias through "
                         "sparse_attn_func's attn_bias")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {deterministic!r}")
    if return_attn_probs:
        out, lse = sparse_attn_varlen_func(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            attn_indices=attn_indices, layout=layout, window_size=window_size, sinks=sinks,
            is_causal=is_causal, softmax_scale=softmax_scale, softcap=softcap, return_lse=True,
            backend=backend)
        return out, lse, None
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape (total, heads, head_dim), got "
                             f"{tuple(t.shape)}")
    if is_causal is not None and not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {is_causal!r}")
    on_host = all(isinstance(c, torch.Tensor) and c.device.type == "cpu"
                  for c in (cu_seqlens_q, cu_seqlens_k))
    if layout is not None and not on_host:
        # the layout holds the sequences: reading device offsets to check them would sync
        _offsets("cu_seqlens_q", cu_seqlens_q, None, "q", read=False)
        _offsets("cu_seqlens_k", cu_seqlens_k, None, "k", read=False)
        _check_max("max_seqlen_q", max_seqlen_q, None)
        _check_max("max_seqlen_k", max_seqlen_k, None)
    else:
        cu_q = _offsets("cu_seqlens_q", cu_seqlens_q, q.shape[0], "q")
        if cu_seqlens_k is cu_seqlens_q and k.shape[0] == q.shape[0]:  # self-attention
            cu_k = cu_q
        else:
            cu_k = _offsets("cu_seqlens_k", cu_seqlens_k, k.shape[0], "k")
        if len(cu_q) != len(cu_k):
            raise ValueError(f"cu_seqlens_q has {len(cu_q)} entries but cu_seqlens_k has "
                             f"{len(cu_k)}: both are [batch + 1]")
        _check_max("max_seqlen_q", max_seqlen_q, cu_q)
        _check_max("max_seqlen_k", max_seqlen_k, cu_k)
    window = check_window(window_size, sinks)
    given = [name for name, x in (("attn_indices", attn_indices), ("layout", layout),
                                  ("window_size/sinks", window)) if x is not None]
    if len(given) > 1:
        raise ValueError(f"pass at most one of attn_indices, layout, window_size/sinks; got "
                         f"{' and '.join(given)}")
    if layout is not None:
        if not isinstance(layout, SparseLayout):
            raise TypeError(f"layout must be a SparseLayout, got {type(layout).__name__}")
        if layout.batch != 1:
            raise ValueError(f"layout must have batch 1 (the packed batch), got {layout.batch}")
        _check_built_for(layout, cu_q if on_host else None, cu_k if on_host else None,
                         is_causal)
    causal_rows = bool(is_causal)
    if q.shape[0] == 0 or k.shape[0] == 0:  # no pairs: sparse_attn_func's zeros and -inf
        if attn_indices is not None:
            _local_indices(attn_indices, cu_q, cu_k)  # still checked
        layout = None
    elif layout is None:
        if attn_indices is not None:
            layout = _indices_layout(attn_indices, cu_q, cu_k, causal_rows, q)
        else:
            layout = _remember(packed_layout(cu_q, cu_k, window, causal_rows, q.device),
                               cu_q, cu_k, causal_rows)
    out, lse = sparse_attn_func(q[None], k[None], v[None], softmax_scale=softmax_scale,
                                layout=layout, return_lse=True, softcap=softcap,
                                backend=backend)
    return (out[0], lse[0]) if return_lse else out[0]


def build_varlen_layout(cu_seqlens_q, cu_seqlens_k, *, attn_indices=None, window_size=(-1, -1),
                        sinks=0, is_causal=False, block_m=None, block_n=None,
                        device=None) -> SparseLayout:
    """The layout ``sparse_attn_varlen_func`` builds for these arguments, to build once and
    pass as ``layout=`` (e.g. to every layer). ``device`` defaults to ``cu_seqlens_q``'s (or
    ``attn_indices``')."""
    cu_q = _offsets("cu_seqlens_q", cu_seqlens_q, None, "q")
    cu_k = _offsets("cu_seqlens_k", cu_seqlens_k, None, "k")
    if len(cu_q) != len(cu_k):
        raise ValueError(f"cu_seqlens_q has {len(cu_q)} entries but cu_seqlens_k has "
                         f"{len(cu_k)}: both are [batch + 1]")
    window = check_window(window_size, sinks)
    if attn_indices is not None:
        if window is not None:
            raise ValueError("pass at most one of attn_indices, window_size/sinks")
        return _remember(_build_indices_layout(attn_indices, cu_q, cu_k, is_causal, block_m,
                                               block_n), cu_q, cu_k, is_causal)
    device = cu_seqlens_q.device if device is None else device
    return _remember(packed_layout(cu_q, cu_k, window, is_causal, device, block_m, block_n),
                     cu_q, cu_k, is_causal)


def _offsets(name, cu, total, tensor_name, read=True) -> list[int] | None:
    """Host copy of checked ``cu_seqlens`` (one small device read; with ``read=False`` only
    the type and shape are checked and nothing is read)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 (or int64), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D [batch + 1] with batch >= 1, got shape "
                         f"{tuple(cu.shape)}")
    if not read:
        return None
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    steps = [b - a for a, b in zip(values, values[1:])]
    if min(steps) < 0:
        bad = steps.index(min(steps))
        raise ValueError(f"{name} must be non-decreasing, got {values[bad]} then "
                         f"{values[bad + 1]} at entries {bad}, {bad + 1}")
    if total is not None and values[-1] != total:
        raise ValueError(f"{name} ends at {values[-1]} but {tensor_name} has {total} tokens "
                         f"(dim 0): they must agree")
    return values


def _check_max(name, value, cu):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if cu is None:
        return
    longest = max(b - a for a, b in zip(cu, cu[1:]))
    if value < longest:
        raise ValueError(f"{name}={value} is smaller than the longest sequence ({longest})")


def _indices_layout(attn_indices, cu_q, cu_k, is_causal, q):
    if not isinstance(attn_indices, torch.Tensor):
        raise TypeError(f"attn_indices must be a torch.Tensor, got "
                        f"{type(attn_indices).__name__}")
    if attn_indices.dim() != 3 or attn_indices.shape[1] != q.shape[0]:
        raise ValueError(f"attn_indices must have shape (Hkv|1, total_q={q.shape[0]}, W), got "
                         f"{tuple(attn_indices.shape)}")
    return cached_layout(attn_indices, ("varlen", tuple(cu_q), tuple(cu_k), is_causal,
                                        str(q.device)), lambda: _remember(_build_indices_layout(
        attn_indices.to(q.device), cu_q, cu_k, is_causal, None, None), cu_q, cu_k, is_causal))


def _build_indices_layout(attn_indices, cu_q, cu_k, is_causal, block_m, block_n):
    """Local per-sequence indices -> global key indices (checked, causal applied) -> layout."""
    idx, cq, ck, rows, seq, n_k = _local_indices(attn_indices, cu_q, cu_k)
    keep = idx >= 0
    if is_causal:
        pos = (rows - cq[seq] + n_k[0, :, 0] - (cq[seq + 1] - cq[seq]))[None, :, None]
        keep &= idx <= pos
    glob = torch.where(keep, idx + ck[seq][None, :, None], -1)
    return build_layout(glob[None], cu_k[-1], block_m=block_m, block_n=block_n)


def _local_indices(attn_indices, cu_q, cu_k):
    """Checked local indices: ``(idx, cq, ck, rows, seq, n_k)`` (int64 indices, the offsets on
    their device, each query's row and sequence, and its sequence's key count)."""
    if not isinstance(attn_indices, torch.Tensor) or attn_indices.dtype not in (
            torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        raise TypeError("attn_indices must be an integer torch.Tensor, got "
                        f"{getattr(attn_indices, 'dtype', type(attn_indices).__name__)}")
    if attn_indices.dim() != 3 or attn_indices.shape[1] != cu_q[-1]:
        raise ValueError(f"attn_indices must have shape (Hkv|1, total_q={cu_q[-1]}, W), got "
                         f"{tuple(attn_indices.shape)}")
    dev = attn_indices.device
    idx = attn_indices.detach().long()
    cq = torch.tensor(cu_q, device=dev)
    ck = torch.tensor(cu_k, device=dev)
    rows = torch.arange(cu_q[-1], device=dev)
    seq = torch.searchsorted(cq[1:], rows, right=True)
    n_k = (ck[seq + 1] - ck[seq])[None, :, None]  # [1, total_q, 1]
    if idx.numel():
        bad = (idx < -1) | (idx >= n_k)
        if bool(bad.any()):
            h, row, w = bad.nonzero()[0].tolist()
            s = int(seq[row])
            raise ValueError(
                f"attn_indices[{h}, {row}, {w}] = {int(idx[h, row, w])} is outside its "
                f"sequence: query {row} is in sequence {s}, which has {int(n_k[0, row, 0])} "
                "keys; entries are local key positions in [0, Lk_s), or -1")
    return idx, cq, ck, rows, seq, n_k


# what a layout built here was built for: id(layout) -> (cu_q, cu_k, is_causal)
_BUILT_FOR: dict[int, tuple] = {}


def _remember(layout: SparseLayout, cu_q, cu_k, is_causal) -> SparseLayout:
    if id(layout) not in _BUILT_FOR:
        _BUILT_FOR[id(layout)] = (tuple(cu_q), tuple(cu_k), bool(is_causal))
        weakref.finalize(layout, _BUILT_FOR.pop, id(layout), None)
    return layout


def _check_built_for(layout, cu_q, cu_k, is_causal) -> None:
    """A layout built here must match the call's host offsets (``None``: on the device, not
    read) and an explicit ``is_causal``; other layouts are taken as they are."""
    built = _BUILT_FOR.get(id(layout))
    if built is None:
        return
    for name, cu, want in (("cu_seqlens_q", cu_q, built[0]), ("cu_seqlens_k", cu_k, built[1])):
        if cu is not None and tuple(cu) != want:
            raise ValueError(f"layout was built for {name} = {list(want)}, got {list(cu)}")
    if is_causal is not None and is_causal != built[2]:
        raise ValueError(f"layout was built with is_causal={built[2]}, got is_causal="
                         f"{is_causal}")
