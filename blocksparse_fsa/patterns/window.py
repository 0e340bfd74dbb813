"""1-D windows: :func:`sliding_window`, :func:`dilated_window` and :func:`document`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..layout.build import check_int, layout_from_predicate
from ..layout.core import SparseLayout, check_blocks
from ..preprocess.predicate import band_tiles, tile_bounds
from .checks import cu_seqlens_arg, positions_arg, window_arg


def sliding_window(q_len: int, k_len: int | None = None, *, left: int, right: int = 0,
                   global_tokens: int | Sequence[int] | torch.Tensor = 0, sinks: int = 0,
                   is_causal: bool = False, block_m: int | None = None,
                   block_n: int | None = None, device="cpu") -> SparseLayout:
    """Sliding window with optional Longformer global tokens and attention sinks.

    With ``p(i) = i + (k_len - q_len)`` (``k_len`` defaults to ``q_len``), query ``i`` sees key
    ``j`` iff any of:

    - ``p(i) - left <= j <= p(i) + right`` (the window; ``left, right >= 0``);
    - ``j < sinks`` (the first ``sinks`` keys are visible to every query);
    - ``j`` is in ``G`` or ``p(i)`` is in ``G``, where ``G`` = ``global_tokens``: an int ``n``
      means positions ``0 .. n-1``, a sequence or 1-D tensor lists positions in ``[0, k_len)``.
      Global tokens see every key and are seen by every query (both directions).

    ``is_causal`` then ANDs ``j <= p(i)``: ``left=W-1, is_causal=True`` is the usual causal
    window of ``W`` keys.
    """
    k_len = q_len if k_len is None else k_len
    q_len, k_len = check_int("q_len", q_len, 1), check_int("k_len", k_len, 1)
    left, right = check_int("left", left), check_int("right", right)
    sinks = check_int("sinks", sinks)
    if sinks > k_len:
        raise ValueError(f"sinks must be <= k_len={k_len}, got {sinks}")
    block_m, block_n = check_blocks(block_m, block_n)
    device = torch.device(device)
    off = k_len - q_len
    glob = positions_arg("global_tokens", global_tokens, k_len, device)
    may, full = band_tiles(q_len, k_len, block_m, block_n, -right, left, device)
    c0, c1 = tile_bounds(k_len, block_n, device)
    if sinks:
        may |= (c0 < sinks)[None, :]
        full |= (c1 < sinks)[None, :]
    is_global_key = torch.zeros(k_len, dtype=torch.bool, device=device)
    is_global_query = torch.zeros(q_len, dtype=torch.bool, device=device)
    if glob.numel():
        rows = glob - off
        rows = rows[(rows >= 0) & (rows < q_len)]
        is_global_key[glob] = True
        is_global_query[rows] = True
        key_tiles = torch.zeros(may.shape[1], dtype=torch.bool, device=device)
        query_tiles = torch.zeros(may.shape[0], dtype=torch.bool, device=device)
        key_tiles[glob // block_n] = True
        query_tiles[rows // block_m] = True
        may |= key_tiles[None, :] | query_tiles[:, None]

    def predicate(b, h, q, k):
        dist = q + off - k
        hit = (dist >= -right) & (dist <= left)
        if sinks:
            hit = hit | (k < sinks)
        if glob.numel():
            hit = hit | is_global_key[k] | is_global_query[q]
        return hit

    return layout_from_predicate(q_len, k_len, predicate, may, is_causal=is_causal,
                                 block_m=block_m, block_n=block_n, device=device,
                                 full_tiles=full)


def dilated_window(q_len: int, k_len: int | None = None, *, size: int, dilation: int,
                   is_causal: bool = False, block_m: int | None = None,
                   block_n: int | None = None, device="cpu") -> SparseLayout:
    """``size`` keys spaced ``dilation`` apart around each query's position ``p = i + Lk - Lq``.

    - ``is_causal=True``: keys ``p, p - d, ..., p - d * (size - 1)``.
    - ``is_causal=False`` (centred): keys ``p + d * t`` for ``t`` in ``[-(size // 2),
      (size - 1) // 2]``, i.e. ``size // 2`` keys before ``p``, ``p`` itself and
      ``(size - 1) // 2`` after (for an even ``size`` the extra key is on the left).

    Keys outside ``[0, k_len)`` are dropped: the window is not shifted at the sequence ends
    (unlike :func:`neighborhood_1d`). ``dilation=1`` is a sliding window.
    """
    k_len = q_len if k_len is None else k_len
    q_len, k_len = check_int("q_len", q_len, 1), check_int("k_len", k_len, 1)
    size, dilation = check_int("size", size, 1), check_int("dilation", dilation, 1)
    block_m, block_n = check_blocks(block_m, block_n)
    device = torch.device(device)
    off = k_len - q_len
    if is_causal:
        lo, hi = 0, dilation * (size - 1)
    else:
        lo, hi = -dilation * ((size - 1) // 2), dilation * (size // 2)
    may, full = band_tiles(q_len, k_len, block_m, block_n, lo, hi, device, step=dilation)

    def predicate(b, h, q, k):
        dist = q + off - k  # > 0: the key is before the query
        return (dist >= lo) & (dist <= hi) & (dist % dilation == 0)

    return layout_from_predicate(q_len, k_len, predicate, may, is_causal=is_causal,
                                 block_m=block_m, block_n=block_n, device=device,
                                 full_tiles=full)


def document(cu_seqlens, *, is_causal: bool = False, window: int | tuple[int, int] | None = None,
             block_m: int | None = None, block_n: int | None = None,
             device="cpu") -> SparseLayout:
    """Packed sequences: query ``i`` sees key ``j`` iff both lie in the same document.

    ``cu_seqlens``: 1-D integer offsets ``[0, e_1, ..., L]`` (non-decreasing; an empty document
    is allowed); document ``d`` is tokens ``[cu[d], cu[d+1])`` and ``Lq = Lk = L``. Optionally
    also a window: ``window=W`` keeps ``|i - j| <= W - 1`` (with ``is_causal`` that is the causal
    window ``i - W + 1 <= j <= i``), ``window=(left, right)`` keeps ``i - left <= j <= i +
    right``. ``is_causal`` ANDs ``j <= i``.
    """
    cu = cu_seqlens_arg(cu_seqlens)
    length = int(cu[-1])
    if length < 1:
        raise ValueError("cu_seqlens must end at a total length >= 1")
    left, right = window_arg(window, length)
    block_m, block_n = check_blocks(block_m, block_n)
    device = torch.device(device)
    cu = cu.to(device)
    doc = torch.searchsorted(cu[1:], torch.arange(length, device=device), right=True)
    r0, r1 = tile_bounds(length, block_m, device)
    c0, c1 = tile_bounds(length, block_n, device)
    q_lo, q_hi, k_lo, k_hi = doc[r0][:, None], doc[r1][:, None], doc[c0][None, :], doc[c1][None, :]
    may = (q_lo <= k_hi) & (k_lo <= q_hi)  # a document of the rows is one of the columns
    full = (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)
    w_may, w_full = band_tiles(length, length, block_m, block_n, -right, left, device)
    may, full = may & w_may, full & w_full

    def predicate(b, h, q, k):
        dist = q - k
        return (doc[q] == doc[k]) & (dist <= left) & (dist >= -right)

    return layout_from_predicate(length, length, predicate, may, is_causal=is_causal,
                                 block_m=block_m, block_n=block_n, device=device,
                                 full_tiles=full)
