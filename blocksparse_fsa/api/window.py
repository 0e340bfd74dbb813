"""Analytic layouts of FlashAttention-style windows, attention sinks and packed sequences.

Every query row of such a pattern sees at most two contiguous key ranges of its own sequence:
its window (clipped by causality) and the sinks (the sequence's first keys). The tile lists
are closed-form in the sequence offsets (``preprocess.ranges.range_tiles``, on the host, so
no size is ever read back from a device); they reach the device in one copy, and one kernel
launch writes the partial tiles' bits (``preprocess.triton.ranges``; numpy on the CPU).
:func:`ranges_layout` (per-row ranges through the predicate engine) builds the same layouts
the slow way: the tests' oracle, and the path for totals of ``MAX_TOKENS`` or more. Layouts
are cached per (sequence lengths, window, sinks, causal, tile, device): the cache key holds
the ``cu_seqlens`` values, never a tensor's identity.
"""

from __future__ import annotations

import collections
import numbers

import numpy as np
import torch

from ..layout import DEFAULT_BLOCK_M, DEFAULT_BLOCK_N, SparseLayout, layout_from_predicate
from ..layout.core import check_blocks
from ..ops import trust_layout
from ..preprocess.ranges import MAX_TOKENS, range_masks_numpy, range_tiles

CACHE_SIZE = 32
_CACHE: collections.OrderedDict = collections.OrderedDict()
_FAR = 2**62  # an empty range is [_FAR, -_FAR]: it never widens an envelope


def check_window(window_size, sinks) -> tuple[int, int, int] | None:
    """``(left, right, sinks)`` with -1 = unbounded, or None when neither restricts anything."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool)
                       for w in window_size)):
        raise TypeError(f"window_size must be a pair of ints (left, right), -1 = unbounded, got "
                        f"{window_size!r}")
    left, right = (int(w) for w in window_size)
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= 0 or -1 (unbounded), got {window_size}")
    if not isinstance(sinks, numbers.Integral) or isinstance(sinks, bool) or sinks < 0:
        raise ValueError(f"sinks must be an int >= 0, got {sinks!r}")
    if left == right == -1:
        return None  # sinks add nothing to unbounded windows
    return left, right, int(sinks)


def row_ranges(cu_q: torch.Tensor, cu_k: torch.Tensor, q_len: int, left: int, right: int,
               sinks: int, is_causal: bool):
    """Per query row, its window and sink key ranges as global inclusive ``[lo, hi]``.

    ``cu_q`` / ``cu_k``: int64 ``[S + 1]`` offsets on the target device. Query ``a`` of
    sequence ``s`` (local index) has position ``p = a + Lk_s - Lq_s`` (bottom-right aligned);
    it sees local keys ``[p - left, p + right]`` (-1 = unbounded; causal caps at ``p``) and the
    first ``sinks`` keys (causal caps them at ``p`` too). Returns four int64 ``[q_len]``
    tensors; an empty range is ``[_FAR, -_FAR]``.
    """
    rows = torch.arange(q_len, device=cu_q.device)
    seq = torch.searchsorted(cu_q[1:], rows, right=True)
    q0, k0 = cu_q[seq], cu_k[seq]
    n_k = cu_k[seq + 1] - k0
    pos = rows - q0 + n_k - (cu_q[seq + 1] - q0)
    top = n_k - 1
    if is_causal:
        top = torch.minimum(top, pos)
    lo = torch.clamp(pos - left, min=0) if left >= 0 else torch.zeros_like(pos)
    hi = torch.minimum(pos + right, top) if right >= 0 else top
    s_hi = torch.minimum(torch.full_like(top, sinks - 1), top)

    def glob(a, b):  # local [a, b] -> global, empty as [_FAR, -_FAR]
        empty = b < a
        return (torch.where(empty, _FAR, a + k0), torch.where(empty, -_FAR, b + k0))

    return (*glob(lo, hi), *glob(torch.zeros_like(s_hi), s_hi))


def ranges_layout(ranges, q_len: int, k_len: int, is_causal: bool, block_m: int | None,
                  block_n: int | None, device) -> SparseLayout:
    """The layout of the pairs inside each row's two ranges (see :func:`row_ranges`).

    ``is_causal`` is recorded on the layout and lets the engine skip tiles above the global
    diagonal; the ranges must already respect it."""
    lo_w, hi_w, lo_s, hi_s = ranges
    bm = DEFAULT_BLOCK_M if block_m is None else block_m
    bn = DEFAULT_BLOCK_N if block_n is None else block_n
    for name, value in (("block_m", bm), ("block_n", bn)):
        if value not in (16, 32, 64, 128, 256):
            raise ValueError(f"{name} must be one of 16, 32, 64, 128, 256, got {value!r}")
    n_qt, n_kt = -(-q_len // bm), -(-k_len // bn)
    c0 = torch.arange(n_kt, device=device) * bn
    c1 = torch.clamp(c0 + bn, max=k_len) - 1

    def per_tile(lo, hi):  # [q_len] ranges -> may / full [QT, KT] for the tile's rows
        pad = n_qt * bm - q_len
        lo_t = torch.nn.functional.pad(lo, (0, pad), value=_FAR).view(n_qt, bm)
        hi_t = torch.nn.functional.pad(hi, (0, pad), value=-_FAR).view(n_qt, bm)
        may = (c0[None, :] <= hi_t.amax(1)[:, None]) & (c1[None, :] >= lo_t.amin(1)[:, None])
        full = (c0[None, :] >= lo_t.amax(1)[:, None]) & (c1[None, :] <= hi_t.amin(1)[:, None])
        return may, full

    may_w, full_w = per_tile(lo_w, hi_w)
    may_s, full_s = per_tile(lo_s, hi_s)

    def predicate(b, h, q, k):
        return ((k >= lo_w[q]) & (k <= hi_w[q])) | ((k >= lo_s[q]) & (k <= hi_s[q]))

    return layout_from_predicate(q_len, k_len, predicate, may_w | may_s, is_causal=is_causal,
                                 block_m=bm, block_n=bn, device=device,
                                 full_tiles=full_w | full_s, chunk_pairs=2**20)


def _cached(key, build) -> SparseLayout:
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    with torch.inference_mode(False):  # a layout built while serving also serves training
        layout = build()
    trust_layout(layout)  # closed-form tile lists: no first-call check, no sync
    _CACHE[key] = layout
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return layout


def _device(device) -> torch.device:
    """``device`` with its index filled in, so that "cuda" and "cuda:0" share cache entries."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def clear_cache() -> None:
    """Forget the cached window and packed-sequence layouts."""
    _CACHE.clear()


@torch.compiler.disable
def window_layout(q_len: int, k_len: int, window: tuple[int, int, int], is_causal: bool,
                  device, block_m: int | None = None, block_n: int | None = None) -> SparseLayout:
    """The layout of ``window = (left, right, sinks)`` (from :func:`check_window`) for one
    ``q_len x k_len`` sequence, bottom-right aligned, cached."""
    device = _device(device)
    key = ("window", q_len, k_len, window, bool(is_causal), block_m, block_n, str(device))

    def build():
        return analytic_layout([0, q_len], [0, k_len], window, is_causal, bool(is_causal),
                               block_m, block_n, device)

    return _cached(key, build)


@torch.compiler.disable
def packed_layout(cu_q: list[int], cu_k: list[int], window: tuple[int, int, int] | None,
                  is_causal: bool, device, block_m: int | None = None,
                  block_n: int | None = None) -> SparseLayout:
    """The layout of packed sequences (host offsets ``cu_q`` / ``cu_k``, already checked) with
    per-sequence bottom-right causality, window and sinks; batch 1, ``q_len = cu_q[-1]``,
    ``k_len = cu_k[-1]``; cached on the offsets' values."""
    device = _device(device)
    window = (-1, -1, 0) if window is None else window
    key = ("packed", tuple(cu_q), tuple(cu_k), window, bool(is_causal), block_m, block_n,
           str(device))

    def build():
        return analytic_layout(cu_q, cu_k, window, is_causal, False, block_m, block_n, device)

    return _cached(key, build)


def analytic_layout(cu_q, cu_k, window: tuple[int, int, int], is_causal: bool,
                    layout_causal: bool, block_m: int | None, block_n: int | None, device,
                    bit_kernel: bool | None = None) -> SparseLayout:
    """The layout of packed sequences (host offsets ``cu_q`` / ``cu_k``) under ``window =
    (left, right, sinks)`` with per-sequence bottom-right causality if ``is_causal``;
    ``layout_causal`` is the flag the layout records. No device sync: one host-to-device copy
    of every tile list and one launch of the bit kernel for the partial tiles' masks
    (``bit_kernel``: None = on CUDA devices; the host computes them otherwise)."""
    bm, bn = check_blocks(block_m, block_n)
    device = torch.device(device)
    q_len, k_len = int(cu_q[-1]), int(cu_k[-1])
    if not 0 < q_len < MAX_TOKENS or not 0 < k_len < MAX_TOKENS:
        # the predicate engine keeps what the closed form leaves out: no tokens (the engine's
        # error) and totals past int32 positions
        cq = torch.tensor(list(cu_q), dtype=torch.int64, device=device)
        ck = torch.tensor(list(cu_k), dtype=torch.int64, device=device)
        ranges = row_ranges(cq, ck, q_len, *window, is_causal)
        return ranges_layout(ranges, q_len, k_len, layout_causal, bm, bn, device)
    tiles = range_tiles(cu_q, cu_k, *window, is_causal, bm, bn)  # (refuses int32 overflow)
    if bit_kernel is None:
        bit_kernel = device.type == "cuda"
    # every list (and the offsets the bit kernel reads) in one buffer: one copy to the device,
    # asynchronous from pinned memory, and views that start 16-byte aligned as tensors of
    # their own would (the kernels specialise on pointer alignment)
    host = torch.from_numpy(tiles.buffer)
    if device.type == "cuda":
        host = host.pin_memory()
    packed = host.to(device, non_blocking=True)
    views = [packed[a:a + n.size] for a, n in zip(tiles.starts, tiles[:9])]
    if bit_kernel:
        from ..preprocess.triton.ranges import range_masks_triton
        masks = range_masks_triton(packed, tiles.part_qt.size, is_causal, bm, bn)
    else:
        masks = torch.from_numpy(range_masks_numpy(tiles.part_qt, tiles.part_col, cu_q, cu_k,
                                                   *window, is_causal, bm, bn)).to(device)
    return SparseLayout(q_len=q_len, k_len=k_len, block_m=bm, block_n=bn, batch=1, heads=1,
                        is_causal=layout_causal, nnz=tiles.nnz, masks=masks,
                        **dict(zip(tiles._fields[:9], views)))  # the same names
