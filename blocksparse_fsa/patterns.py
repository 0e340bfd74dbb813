"""Pattern builders that return a :class:`~blocksparse_fsa.SparseLayout` directly.

No builder materialises per-query index tensors or anything of size Lq x Lk. Each one computes
analytically which (query tile, key tile) pairs may hold an active pair (O(QT * KT) bools per
head: 4M at L = 131072 with 64-token tiles) and which are certainly full, then evaluates the
exact pattern, a FlexAttention-style ``mask_mod``, on the remaining tiles in bounded chunks
(:mod:`blocksparse_fsa.preprocess.predicate`). The result is tensor for tensor the layout that
``SparseLayout.from_dense_mask`` builds from the same pattern's dense mask.

Conventions shared by every builder:

- Query ``i`` and key ``j`` are token indices; when ``Lq != Lk`` the query's *position* is
  ``p(i) = i + (Lk - Lq)`` (bottom-right alignment, as for ``is_causal``).
- ``is_causal=True`` ANDs ``j <= i + (Lk - Lq)`` into the pattern and is recorded on the layout
  (``sparse_attn_func`` checks it against its own ``is_causal``).
- ``block_m`` / ``block_n`` pick the layout's tile (default 64 x 64); ``device`` is where the
  work runs and where the layout is returned.

Builders: :func:`layout_from_predicate` (the generic engine), :func:`sliding_window`,
:func:`dilated_window`, :func:`block_sparse`, :func:`bigbird`, :func:`fixed`, :func:`document`,
:func:`neighborhood_1d`, :func:`neighborhood_2d`, :func:`neighborhood_3d`, :func:`union`,
:func:`intersection`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .interop import layout_tile_map
from .layout import SparseLayout, _check_blocks, _finish, popcount32
from .preprocess.dense import _tiles_from_flags, pack_bits
from .preprocess.predicate import (DEFAULT_CHUNK_PAIRS, band_tiles, predicate_to_tiles,
                                   tile_bounds, tile_in_range)

__all__ = ["bigbird", "block_sparse", "dilated_window", "document", "fixed", "intersection",
           "layout_from_predicate", "neighborhood_1d", "neighborhood_2d", "neighborhood_3d",
           "sliding_window", "union"]

Predicate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
TileMap = torch.Tensor | Callable[[int, int], torch.Tensor] | None


# ---- the generic engine ----------------------------------------------------------------------
def layout_from_predicate(q_len: int, k_len: int, predicate: Predicate,
                          tile_candidates: TileMap = None, *, batch: int = 1, heads: int = 1,
                          is_causal: bool = False, block_m: int | None = None,
                          block_n: int | None = None, device="cpu", full_tiles: TileMap = None,
                          chunk_pairs: int = DEFAULT_CHUNK_PAIRS) -> SparseLayout:
    """Layout of the pairs where ``predicate(b, h, q_idx, k_idx)`` is True.

    Args:
        predicate: a vectorised ``mask_mod`` as in FlexAttention. It receives int64 tensors
            ``b``, ``h`` ``[T, 1, 1]``, ``q_idx`` ``[T, block_m, 1]``, ``k_idx`` ``[T, 1,
            block_n]`` (always inside ``[0, q_len)`` / ``[0, k_len)``: edge tiles' padding is
            clamped, then masked off) and returns a bool tensor broadcastable to ``[T, block_m,
            block_n]``. ``b`` / ``h`` are the layout's batch and head indices.
        tile_candidates: bool ``[QT, KT]``, ``[H|1, QT, KT]`` or ``[B|1, H|1, QT, KT]`` (``QT =
            ceil(q_len / block_m)``, ``KT = ceil(k_len / block_n)``): the tiles that MAY hold
            an active pair, computed analytically; the predicate runs on these tiles only, so a
            tile left out is empty whatever the predicate says. A callable ``(block_m,
            block_n) -> map`` is accepted too; None means every tile (O(Lq * Lk) work).
        batch, heads: the layout's batch and head counts (1 = broadcast).
        is_causal: AND ``k_idx <= q_idx + k_len - q_len`` and record it on the layout.
        full_tiles: optional map like ``tile_candidates`` of tiles on which the predicate is
            True for every in-range pair; those that are in range (and causal-full) are taken
            as full without evaluating the predicate. Tiles outside ``tile_candidates`` are
            ignored. A wrong hint gives a wrong layout: it is a promise, not a test.
        chunk_pairs: at most this many (query, key) pairs go to one predicate call.

    Tiles are classified exactly as ``SparseLayout.from_dense_mask`` does: empty, full (every
    pair active and the tile wholly inside ``[0, Lq) x [0, Lk)``) or partial (bit-packed).
    """
    block_m, block_n = _check_blocks(block_m, block_n)
    q_len, k_len = _check_int("q_len", q_len, 1), _check_int("k_len", k_len, 1)
    batch, heads = _check_int("batch", batch, 1), _check_int("heads", heads, 1)
    chunk_pairs = _check_int("chunk_pairs", chunk_pairs, 1)
    if not callable(predicate):
        raise TypeError(f"predicate must be callable, got {type(predicate).__name__}")
    device = torch.device(device)
    shape = (batch, heads, -(-q_len // block_m), -(-k_len // block_n))
    candidates = _tile_map("tile_candidates", tile_candidates, shape, block_m, block_n, device)
    full = (None if full_tiles is None else
            _tile_map("full_tiles", full_tiles, shape, block_m, block_n, device))
    arrays = predicate_to_tiles(q_len, k_len, predicate, candidates, full, bool(is_causal),
                                block_m, block_n, chunk_pairs)
    layout = _finish(q_len, k_len, block_m, block_n, batch, heads, bool(is_causal), *arrays)
    return layout.to(device)


# ---- 1-D windows -----------------------------------------------------------------------------
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
    q_len, k_len = _check_int("q_len", q_len, 1), _check_int("k_len", k_len, 1)
    left, right = _check_int("left", left), _check_int("right", right)
    sinks = _check_int("sinks", sinks)
    if sinks > k_len:
        raise ValueError(f"sinks must be <= k_len={k_len}, got {sinks}")
    block_m, block_n = _check_blocks(block_m, block_n)
    device = torch.device(device)
    off = k_len - q_len
    glob = _positions("global_tokens", global_tokens, k_len, device)
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
    q_len, k_len = _check_int("q_len", q_len, 1), _check_int("k_len", k_len, 1)
    size, dilation = _check_int("size", size, 1), _check_int("dilation", dilation, 1)
    block_m, block_n = _check_blocks(block_m, block_n)
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
    cu = _cu_seqlens(cu_seqlens)
    length = int(cu[-1])
    if length < 1:
        raise ValueError("cu_seqlens must end at a total length >= 1")
    left, right = _window_arg(window, length)
    block_m, block_n = _check_blocks(block_m, block_n)
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


# ---- block patterns --------------------------------------------------------------------------
def block_sparse(block_map: torch.Tensor, block_size: int | tuple[int, int],
                 q_len: int | None = None, k_len: int | None = None, *, is_causal: bool = False,
                 block_m: int | None = None, block_n: int | None = None,
                 device="cpu") -> SparseLayout:
    """Token pattern of a block-level pattern: ``(i, j)`` is active iff
    ``block_map[b, h, i // bq, j // bk]`` (then ANDed with ``is_causal``).

    ``block_map``: bool (or 0/1 integer) ``[nbq, nbk]``, ``[heads, nbq, nbk]`` or ``[batch,
    heads, nbq, nbk]``; the layout gets its batch and heads. ``block_size``: ``b`` or ``(bq,
    bk)``, any positive size (it need not match the layout's tile). ``q_len`` / ``k_len``
    default to ``nbq * bq`` / ``nbk * bk`` and may cut the last block short: ``nbq`` must equal
    ``ceil(q_len / bq)``. Blocks use absolute token indices (no bottom-right shift).
    """
    bmap = _block_map(block_map)
    bq, bk = _pair("block_size", block_size)
    n_bq, n_bk = bmap.shape[-2:]
    q_len = n_bq * bq if q_len is None else _check_int("q_len", q_len, 1)
    k_len = n_bk * bk if k_len is None else _check_int("k_len", k_len, 1)
    for name, length, size, count in (("q_len", q_len, bq, n_bq), ("k_len", k_len, bk, n_bk)):
        if -(-length // size) != count:
            raise ValueError(f"{name}={length} needs {-(-length // size)} blocks of {size}, but "
                             f"block_map has {count}")
    block_m, block_n = _check_blocks(block_m, block_n)
    device = torch.device(device)
    bmap = bmap.to(device)
    n_b, n_h = bmap.shape[:2]
    r0, r1 = tile_bounds(q_len, block_m, device)
    c0, c1 = tile_bounds(k_len, block_n, device)
    rb0, rb1, cb0, cb1 = r0 // bq, r1 // bq + 1, c0 // bk, c1 // bk + 1  # block ranges [lo, hi)
    area = (rb1 - rb0)[:, None] * (cb1 - cb0)[None, :]
    may = torch.empty(n_b, n_h, r0.numel(), c0.numel(), dtype=torch.bool, device=device)
    full = torch.empty_like(may)
    for b, h in itertools.product(range(n_b), range(n_h)):  # one prefix-sum table at a time
        table = torch.zeros(n_bq + 1, n_bk + 1, dtype=torch.int32, device=device)
        table[1:, 1:] = bmap[b, h].to(torch.int32).cumsum(0).cumsum(1)

        def rect(rows, cols, table=table):
            return table[rows][:, cols]

        count = rect(rb1, cb1) - rect(rb0, cb1) - rect(rb1, cb0) + rect(rb0, cb0)
        may[b, h] = count > 0
        full[b, h] = count == area

    def predicate(b, h, q, k):
        return bmap[b, h, q // bq, k // bk]

    return layout_from_predicate(q_len, k_len, predicate, may, batch=n_b, heads=n_h,
                                 is_causal=is_causal, block_m=block_m, block_n=block_n,
                                 device=device, full_tiles=full)


def bigbird(q_len: int, *, block_size: int = 64, num_local: int = 3, num_global: int = 2,
            num_random: int = 3, heads: int = 1, seed: int = 0, is_causal: bool = False,
            block_m: int | None = None, block_n: int | None = None,
            device="cpu") -> SparseLayout:
    """BigBird (ITC) block pattern over ``nb = ceil(q_len / block_size)`` blocks, ``Lq = Lk``.

    Query block ``r`` attends key block ``c`` iff any of:

    - local: ``r - (num_local - 1) // 2 <= c <= r + num_local // 2`` (the ``num_local`` blocks
      centred on ``r``, clipped at the ends); with ``is_causal``, ``r - num_local < c <= r``;
    - global: ``c < num_global`` or ``r < num_global`` (both directions);
    - random: per (head, query block), ``min(num_random, available)`` distinct blocks drawn
      uniformly from the blocks not already local or global (with ``is_causal``, only ``c <=
      r``), using ``torch.Generator().manual_seed(seed)`` on the CPU (the same on every device):
      for each head in turn, ``torch.rand(nb, nb)`` scores, the smallest allowed ones win.

    ``is_causal`` then ANDs token-level causality (global rows see only the past). The layout
    has ``heads`` heads (1 = one pattern for every head).
    """
    q_len = _check_int("q_len", q_len, 1)
    block_size = _check_int("block_size", block_size, 1)
    num_local, num_global = _check_int("num_local", num_local), _check_int("num_global",
                                                                          num_global)
    num_random, heads = _check_int("num_random", num_random), _check_int("heads", heads, 1)
    seed = _check_int("seed", seed)
    n = -(-q_len // block_size)
    r = torch.arange(n)[:, None]
    c = torch.arange(n)[None, :]
    if is_causal:
        local = (c <= r) & (c > r - num_local)
    else:
        local = (c >= r - (num_local - 1) // 2) & (c <= r + num_local // 2)
    chosen = local | (c < num_global) | (r < num_global)  # [nb, nb]
    allowed = ~chosen & (c <= r) if is_causal else ~chosen
    gen = torch.Generator().manual_seed(seed)
    draws = min(num_random, n)
    blocks = torch.empty(heads, n, n, dtype=torch.bool)
    for h in range(heads):
        scores = torch.rand(n, n, generator=gen).masked_fill_(~allowed, 2.0)
        drawn = torch.zeros(n, n, dtype=torch.bool)
        if draws:
            value, pick = scores.topk(draws, dim=1, largest=False)  # distinct blocks per row
            drawn.scatter_(1, pick, value < 1.5)  # value 2.0: not allowed, fewer remained
        blocks[h] = chosen | drawn
    return block_sparse(blocks, block_size, q_len, q_len, is_causal=is_causal, block_m=block_m,
                        block_n=block_n, device=device)


def fixed(q_len: int, *, block_size: int, num_local_blocks: int, num_global_blocks: int = 1,
          is_causal: bool = False, horizontal_global: bool = False,
          num_different_global_patterns: int = 1, heads: int = 1, block_m: int | None = None,
          block_n: int | None = None, device="cpu") -> SparseLayout:
    """DeepSpeed's ``FixedSparsityConfig`` ("fixed" pattern of Sparse Transformers), ``Lq = Lk``.

    Over ``nb = ceil(q_len / block_size)`` blocks, windows of ``L = num_local_blocks`` blocks
    (``[0, L)``, ``[L, 2L)``, ...; the last may be short), ``G = num_global_blocks`` (``L % G ==
    0``), and for head ``h`` the offset ``f = L - (1 + h % num_different_global_patterns) * G``:

    - local: block ``(r, c)`` with ``r // L == c // L`` (and ``c <= r`` when causal);
    - global columns: for each full window starting at ``s``, blocks ``s + f .. s + f + G - 1``
      are seen by every query block (causal: by rows ``>= s + f``); if the last window is short
      (``nb % L != 0``, ``e = nb - nb % L``), the global group is ``start = min(e + f, nb - G)``
      .. ``start + G - 1`` (seen by every row, or rows ``>= start`` when causal);
    - ``horizontal_global`` (bidirectional only): global blocks' rows also see every block.

    This is DeepSpeed's ``set_local_layout`` / ``set_global_layout`` with ``attention =
    "unidirectional" if is_causal else "bidirectional"``; ``is_causal`` also ANDs token-level
    causality (DeepSpeed leaves that to the attention mask). Unlike DeepSpeed, ``q_len`` need
    not be a multiple of ``block_size`` (the last block is cut short). The layout has ``heads``
    heads; head ``h`` uses global pattern ``h % num_different_global_patterns``.
    """
    q_len = _check_int("q_len", q_len, 1)
    block_size = _check_int("block_size", block_size, 1)
    local = _check_int("num_local_blocks", num_local_blocks, 1)
    glob = _check_int("num_global_blocks", num_global_blocks, 1)
    patterns = _check_int("num_different_global_patterns", num_different_global_patterns, 1)
    heads = _check_int("heads", heads, 1)
    if local % glob:
        raise ValueError(f"num_local_blocks={local} must be a multiple of "
                         f"num_global_blocks={glob}")
    if patterns > local // glob:
        raise ValueError(f"num_different_global_patterns={patterns} must be <= "
                         f"num_local_blocks // num_global_blocks = {local // glob}")
    if horizontal_global and is_causal:
        raise ValueError("horizontal_global=True needs is_causal=False (bidirectional)")
    n = -(-q_len // block_size)
    if n < glob:
        raise ValueError(f"num_global_blocks={glob} is more than the {n} blocks of q_len")
    r = torch.arange(n)[:, None]
    c = torch.arange(n)[None, :]
    local_map = (r // local) == (c // local)
    if is_causal:
        local_map &= c <= r
    end = n - n % local
    blocks = torch.empty(heads, n, n, dtype=torch.bool)
    for h in range(heads):
        first = local - (1 + h % patterns) * glob
        starts = list(range(first, end, local))
        if end < n:
            starts.append(min(end + first, n - glob))
        first_row = torch.full((n,), n)  # per key block: the first row that sees it (n: none)
        global_row = torch.zeros(n, dtype=torch.bool)
        for s in starts:  # the last group may overlap the one before: keep the lower row
            first_row[s:s + glob] = torch.clamp(first_row[s:s + glob], max=s if is_causal else 0)
            global_row[s:s + glob] = horizontal_global
        blocks[h] = local_map | (r >= first_row[None, :]) | global_row[:, None]
    return block_sparse(blocks, block_size, q_len, q_len, is_causal=is_causal, block_m=block_m,
                        block_n=block_n, device=device)


# ---- neighborhood attention ------------------------------------------------------------------
def neighborhood_1d(length: int, *, kernel_size: int | tuple[int], dilation=1, is_causal=False,
                    block_m: int | None = None, block_n: int | None = None,
                    device="cpu") -> SparseLayout:
    """NATTEN 1-D neighborhood attention (see :func:`neighborhood_2d` for the definition)."""
    return _neighborhood("length", (length,), kernel_size, dilation, is_causal, block_m, block_n,
                         device)


def neighborhood_2d(height: int, width: int, *, kernel_size, dilation=1,
                    is_causal=(False, False), block_m: int | None = None,
                    block_n: int | None = None, device="cpu") -> SparseLayout:
    """NATTEN neighborhood attention over a ``height x width`` grid of row-major tokens.

    ``kernel_size``, ``dilation`` and ``is_causal`` are one value or one per axis. On each axis
    of length ``n`` (with ``kernel_size * dilation <= n``, as NATTEN requires), a query at
    coordinate ``x`` sees the coordinates ``y`` with ``y % d == x % d`` whose index ``y // d`` in
    that dilation group (of length ``n_r = ceil((n - x % d) / d)``) lies in

    - non-causal: ``[s, s + K - 1]`` with ``s = clamp(x // d - K // 2, 0, n_r - K)``: the
      window centred on the query, shifted to stay inside the grid at the borders (NATTEN's
      clamp, its ``get_window_start``; for an even ``K`` the window has ``K // 2`` positions
      before the centre and ``K // 2 - 1`` after, as in NATTEN >= 0.20);
    - causal: ``[max(x // d - K + 1, 0), x // d]``: the last ``K`` positions up to the query's,
      not shifted (fewer keys near the start).

    A key is active iff it is in the window on every axis. The layout records ``is_causal=True``
    iff every axis is causal (then the pattern is causal on the flattened tokens).
    """
    return _neighborhood("height, width", (height, width), kernel_size, dilation, is_causal,
                         block_m, block_n, device)


def neighborhood_3d(depth: int, height: int, width: int, *, kernel_size, dilation=1,
                    is_causal=(False, False, False), block_m: int | None = None,
                    block_n: int | None = None, device="cpu") -> SparseLayout:
    """NATTEN neighborhood attention over a ``depth x height x width`` grid of row-major tokens;
    per-axis semantics as in :func:`neighborhood_2d`."""
    return _neighborhood("depth, height, width", (depth, height, width), kernel_size, dilation,
                         is_causal, block_m, block_n, device)


def _neighborhood(names, shape, kernel_size, dilation, is_causal, block_m, block_n, device):
    n_dim = len(shape)
    for name, size in zip(names.split(", "), shape):
        _check_int(name, size, 1)
    kernel = _per_axis("kernel_size", kernel_size, n_dim, int)
    dil = _per_axis("dilation", dilation, n_dim, int)
    causal = _per_axis("is_causal", is_causal, n_dim, bool)
    for a in range(n_dim):
        _check_int("kernel_size", kernel[a], 1)
        _check_int("dilation", dil[a], 1)
        if kernel[a] * dil[a] > shape[a]:
            raise ValueError(f"kernel_size * dilation must be <= the grid size on every axis; "
                             f"axis {a}: {kernel[a]} * {dil[a]} > {shape[a]}")
    block_m, block_n = _check_blocks(block_m, block_n)
    device = torch.device(device)
    length = math.prod(shape)
    strides = [math.prod(shape[a + 1:]) for a in range(n_dim)]
    # per axis and coordinate x: residue, first and last window index in the dilation group
    tables = []
    for n, k, d, cz in zip(shape, kernel, dil, causal):
        x = torch.arange(n, device=device)
        res, s = x % d, x // d
        if cz:  # the last k positions up to the query's
            lo, hi = torch.clamp(s - k + 1, min=0), s
        else:  # k positions around the query's, shifted inside the group (length n_r)
            group_len = (n - res + d - 1) // d
            lo = torch.minimum(torch.clamp(s - k // 2, min=0), group_len - k)
            hi = lo + k - 1
        tables.append((res, lo, hi))

    # candidate tiles: a query's window is prod(K[:-1]) runs along the last axis; mark the key
    # tiles between each run's first and last token, for the query's tile
    tokens = torch.arange(length, device=device)
    coords = [(tokens // strides[a]) % shape[a] for a in range(n_dim)]
    first = [tables[a][1][coords[a]] * dil[a] + tables[a][0][coords[a]] for a in range(n_dim)]
    last = [tables[a][2][coords[a]] * dil[a] + tables[a][0][coords[a]] for a in range(n_dim)]
    n_qt, n_kt = -(-length // block_m), -(-length // block_n)
    may = torch.zeros(n_qt * n_kt, dtype=torch.bool, device=device)
    row_base = (tokens // block_m) * n_kt
    for offsets in itertools.product(*(range(k) for k in kernel[:-1])):
        base = sum(((first[a] + t * dil[a]) * strides[a] for a, t in enumerate(offsets)),
                   torch.zeros_like(tokens))
        valid = torch.ones_like(tokens, dtype=torch.bool)
        for a, t in enumerate(offsets):  # causal axes may have fewer than K positions
            valid &= first[a] + t * dil[a] <= last[a]
        lo_t, hi_t = (base + first[-1]) // block_n, (base + last[-1]) // block_n
        for step in range(int((hi_t - lo_t).max()) + 1):
            ok = valid & (lo_t + step <= hi_t)
            may[(row_base + lo_t + step)[ok]] = True

    def predicate(b, h, q, k):
        hit = None
        for a in range(n_dim):
            res, lo, hi = tables[a]
            xq = (q // strides[a]) % shape[a]
            xk = (k // strides[a]) % shape[a]
            g = xk // dil[a]
            axis = (xk % dil[a] == res[xq]) & (g >= lo[xq]) & (g <= hi[xq])
            hit = axis if hit is None else hit & axis
        return hit

    return layout_from_predicate(length, length, predicate, may.view(n_qt, n_kt),
                                 is_causal=all(causal), block_m=block_m, block_n=block_n,
                                 device=device)


# ---- set operations on layouts ---------------------------------------------------------------
def union(*layouts: SparseLayout) -> SparseLayout:
    """Pairs active in any of ``layouts`` (same ``q_len``, ``k_len``, ``block_m``, ``block_n``;
    batch and heads broadcast from 1). Works tile by tile on the packed bits, never densely.

    The result has ``is_causal=True`` only if every input is causal: the flag promises that the
    pattern is causal, which a union keeps only when all its parts are. It lives on the first
    layout's device.
    """
    return _combine("union", layouts)


def intersection(*layouts: SparseLayout) -> SparseLayout:
    """Pairs active in all of ``layouts`` (same requirements as :func:`union`).

    The result has ``is_causal=True`` if any input is causal: intersecting with a causal pattern
    gives a causal one.
    """
    return _combine("intersection", layouts)


def _combine(op, layouts):
    if not layouts:
        raise ValueError("layouts: pass at least one SparseLayout")
    for lay in layouts:
        if not isinstance(lay, SparseLayout):
            raise TypeError(f"layouts must be SparseLayout objects, got {type(lay).__name__}")
    ref = layouts[0]
    device = ref.device
    for lay in layouts[1:]:
        for attr in ("q_len", "k_len", "block_m", "block_n"):
            if getattr(lay, attr) != getattr(ref, attr):
                raise ValueError(f"layouts differ in {attr}: {getattr(ref, attr)} vs "
                                 f"{getattr(lay, attr)}")
    if any(lay.is_reordered for lay in layouts):
        raise ValueError("layouts: combine layouts before reordering their tokens")
    n_b = max(lay.batch for lay in layouts)
    n_h = max(lay.heads for lay in layouts)
    for lay in layouts:
        if lay.batch not in (1, n_b) or lay.heads not in (1, n_h):
            raise ValueError(f"layouts: batch/heads must be 1 or shared, got {lay.batch}/"
                             f"{lay.heads} next to {n_b}/{n_h}")
    layouts = [lay.to(device) for lay in layouts]
    bm, bn, n_qt, n_kt = ref.block_m, ref.block_n, ref.num_q_tiles, ref.num_k_tiles
    # per tile: -1 none, -2 full, p >= 0 partial tile p
    states = [layout_tile_map(lay).view(lay.batch, lay.heads, n_qt, n_kt)
              .expand(n_b, n_h, n_qt, n_kt) for lay in layouts]
    full, active = states[0] == -2, states[0] != -1
    for state in states[1:]:
        if op == "union":
            full, active = full | (state == -2), active | (state != -1)
        else:
            full, active = full & (state == -2), active & (state != -1)
    lin = (active & ~full).reshape(-1).nonzero()[:, 0]  # row-major (b, h, qt, kt)
    where = (lin // (n_h * n_qt * n_kt), (lin // (n_qt * n_kt)) % n_h, (lin // n_kt) % n_qt,
             lin % n_kt)
    ones = pack_bits(torch.ones(1, bm, bn, dtype=torch.bool, device=device))  # [1, bm, words]
    words = (torch.zeros(lin.numel(), *ones.shape[1:], dtype=torch.int32, device=device)
             if op == "union" else ones.expand(lin.numel(), -1, -1).clone())
    for state, lay in zip(states, layouts):
        part = state[where]  # partial-tile index in this layout, or -1 / -2
        sel = part >= 0
        if op == "union":
            words[sel] |= lay.masks[part[sel].long()]
        else:
            words[sel] &= lay.masks[part[sel].long()]
    in_range = tile_in_range(ref.q_len, ref.k_len, bm, bn, device).expand(n_b, n_h, -1, -1)
    is_full = (words == ones).flatten(1).all(1) & in_range.reshape(-1)[lin]
    is_part = (words != 0).flatten(1).any(1) & ~is_full
    full = full.clone()
    full.view(-1)[lin[is_full]] = True
    partial = torch.zeros_like(full)
    partial.view(-1)[lin[is_part]] = True
    masks = words[is_part]
    nnz = int(full.sum()) * bm * bn + int(popcount32(masks).sum())
    full_ptr, full_col, part_ptr, part_rc = _tiles_from_flags(full, partial)
    causal = (all if op == "union" else any)(lay.is_causal for lay in layouts)
    layout = _finish(ref.q_len, ref.k_len, bm, bn, n_b, n_h, causal, full_ptr, full_col,
                     part_ptr, part_rc[:, 1], masks, nnz)
    return layout.to(device)


# ---- argument checks -------------------------------------------------------------------------
def _check_int(name, value, minimum=0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _pair(name, value) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        return _check_int(name, value[0], 1), _check_int(name, value[1], 1)
    value = _check_int(name, value, 1)
    return value, value


def _per_axis(name, value, n_dim, kind):
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * n_dim
    if len(values) != n_dim:
        raise ValueError(f"{name} must be one value or {n_dim}, got {value!r}")
    if kind is bool:
        if not all(isinstance(v, (bool, np.bool_)) for v in values):
            raise ValueError(f"{name} must be a bool or {n_dim} bools, got {value!r}")
        return tuple(bool(v) for v in values)
    return values


def _tile_map(name, value, shape, block_m, block_n, device) -> torch.Tensor:
    """A user's tile map as a bool ``[batch, heads, QT, KT]`` view on ``device``."""
    if value is None:
        return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device).expand(shape)
    if callable(value):
        value = value(block_m, block_n)
    if not isinstance(value, torch.Tensor) or value.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got "
                        f"{getattr(value, 'dtype', type(value).__name__)}")
    if not 2 <= value.dim() <= 4:
        raise ValueError(f"{name} must have shape [QT, KT], [H, QT, KT] or [B, H, QT, KT], got "
                         f"{tuple(value.shape)}")
    value = value.reshape((1,) * (4 - value.dim()) + tuple(value.shape))
    n_b, n_h, n_qt, n_kt = shape
    if (tuple(value.shape[2:]) != (n_qt, n_kt) or value.shape[0] not in (1, n_b)
            or value.shape[1] not in (1, n_h)):
        raise ValueError(f"{name} has shape {tuple(value.shape)}; expected [1|{n_b}, 1|{n_h}, "
                         f"{n_qt}, {n_kt}] for block_m={block_m}, block_n={block_n}")
    return value.to(device).expand(shape)


def _positions(name, value, k_len, device) -> torch.Tensor:
    """Global token positions: an int n (positions 0..n-1) or a list / 1-D tensor of them."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if not 0 <= value <= k_len:
            raise ValueError(f"{name} must be in [0, k_len={k_len}] as a count, got {value}")
        return torch.arange(int(value), device=device)
    pos = torch.as_tensor(value)
    if pos.dtype.is_floating_point or pos.dtype == torch.bool or pos.dim() != 1:
        raise ValueError(f"{name} must be an int or a 1-D sequence of int positions, got "
                         f"{value!r}")
    pos = pos.to(device=device, dtype=torch.int64)
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= k_len):
        raise ValueError(f"{name} positions must lie in [0, k_len={k_len}), got "
                         f"{int(pos.min())}..{int(pos.max())}")
    return pos


def _cu_seqlens(value) -> torch.Tensor:
    cu = torch.as_tensor(value)
    if cu.dtype.is_floating_point or cu.dtype == torch.bool or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D integer tensor of >= 2 offsets, got "
                         f"{value!r}")
    cu = cu.to(torch.int64)
    if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {cu.tolist()}")
    return cu


def _window_arg(window, length) -> tuple[int, int]:
    if window is None:
        return length, length
    if isinstance(window, (tuple, list)):
        if len(window) != 2:
            raise ValueError(f"window must be an int or (left, right), got {window!r}")
        return _check_int("window", window[0]), _check_int("window", window[1])
    window = _check_int("window", window, 1)
    return window - 1, window - 1


def _block_map(block_map) -> torch.Tensor:
    if not isinstance(block_map, torch.Tensor):
        raise TypeError(f"block_map must be a torch.Tensor, got {type(block_map).__name__}")
    if block_map.dtype.is_floating_point or block_map.is_complex():
        raise TypeError(f"block_map must be bool (or 0/1 integer), got {block_map.dtype}")
    if not 2 <= block_map.dim() <= 4 or 0 in block_map.shape:
        raise ValueError("block_map must have shape [nbq, nbk], [heads, nbq, nbk] or [batch, "
                         f"heads, nbq, nbk], got {tuple(block_map.shape)}")
    bmap = block_map if block_map.dtype == torch.bool else block_map != 0
    return bmap.reshape((1,) * (4 - bmap.dim()) + tuple(bmap.shape))
