"""Neighborhood attention (NATTEN's pattern) in 1, 2 and 3 dimensions."""

from __future__ import annotations

import itertools
import math

import torch

from ..layout.build import check_int, layout_from_predicate
from ..layout.core import SparseLayout, check_blocks
from .checks import per_axis


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
        check_int(name, size, 1)
    kernel = per_axis("kernel_size", kernel_size, n_dim, int)
    dil = per_axis("dilation", dilation, n_dim, int)
    causal = per_axis("is_causal", is_causal, n_dim, bool)
    for a in range(n_dim):
        check_int("kernel_size", kernel[a], 1)
        check_int("dilation", dil[a], 1)
        if kernel[a] * dil[a] > shape[a]:
            raise ValueError(f"kernel_size * dilation must be <= the grid size on every axis; "
                             f"axis {a}: {kernel[a]} * {dil[a]} > {shape[a]}")
    block_m, block_n = check_blocks(block_m, block_n)
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
