"""Set operations on layouts: :func:`union` and :func:`intersection`."""

from __future__ import annotations

import torch

from ..layout.convert import layout_tile_map
from ..layout.core import SparseLayout, layout_from_tiles, popcount32
from ..preprocess.dense import pack_bits, tiles_from_flags
from ..preprocess.predicate import tile_in_range


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
    full_ptr, full_col, part_ptr, part_rc = tiles_from_flags(full, partial)
    causal = (all if op == "union" else any)(lay.is_causal for lay in layouts)
    layout = layout_from_tiles(ref.q_len, ref.k_len, bm, bn, n_b, n_h, causal, full_ptr, full_col,
                     part_ptr, part_rc[:, 1], masks, nnz)
    return layout.to(device)
