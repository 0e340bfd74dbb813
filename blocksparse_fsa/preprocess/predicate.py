"""Tile metadata from a vectorised predicate, evaluated on candidate tiles only.

The caller supplies an analytic ``[B, H, QT, KT]`` map of the tiles that may hold active pairs
(O(QT * KT) bools per head, never an Lq x Lk tensor) and, optionally, the tiles on which the
predicate is known to hold everywhere. The predicate runs on the remaining candidates in chunks
of at most ``chunk_pairs`` (query, key) pairs; each tile is classified as empty, full or partial
exactly as :func:`~blocksparse_fsa.preprocess.mask_to_tiles` classifies the tiles of a dense mask,
so both paths give identical layouts. Everything runs in PyTorch on the maps' device.
"""

import torch

from .dense import tiles_from_flags, pack_bits

DEFAULT_CHUNK_PAIRS = 2**22


def tile_bounds(length: int, block: int, device):
    """First and last in-range position of each tile, ``[ceil(length / block)]`` int64 each."""
    first = torch.arange(0, length, block, device=device)
    return first, torch.clamp(first + block, max=length) - 1


def tile_in_range(q_len: int, k_len: int, block_m: int, block_n: int, device) -> torch.Tensor:
    """``[QT, KT]``: the tile lies wholly inside ``[0, Lq) x [0, Lk)`` (a condition to be full)."""
    rows = torch.arange(1, -(-q_len // block_m) + 1, device=device) * block_m <= q_len
    cols = torch.arange(1, -(-k_len // block_n) + 1, device=device) * block_n <= k_len
    return rows[:, None] & cols[None, :]


def band_tiles(q_len: int, k_len: int, block_m: int, block_n: int, lo: int, hi: int, device,
               step: int = 1):
    """Tiles holding a pair whose diagonal distance ``d = i + (Lk - Lq) - j`` is a multiple of
    ``step`` in ``[lo, hi]`` (``lo``, ``hi`` multiples of ``step``), and tiles where every
    in-range pair is such a pair. Returns ``(may, full)``, ``[QT, KT]`` bool each.

    Rows and columns of a tile are contiguous, so its distances are every integer of
    ``[r0 + off - c1, r1 + off - c0]``: the test is exact, in O(QT * KT) time. The int64
    temporaries are bounded by working on ``2**22 / KT`` query tiles at a time.
    """
    off = k_len - q_len
    r0, r1 = tile_bounds(q_len, block_m, device)
    c0, c1 = tile_bounds(k_len, block_n, device)
    may = torch.empty(r0.numel(), c0.numel(), dtype=torch.bool, device=device)
    full = torch.empty_like(may)
    rows = max(1, 2**22 // max(1, c0.numel()))
    for s in range(0, r0.numel(), rows):
        d_min = r0[s:s + rows, None] + off - c1[None, :]
        d_max = r1[s:s + rows, None] + off - c0[None, :]
        a = torch.clamp(d_min, min=lo)
        first = -torch.div(-a, step, rounding_mode="floor") * step  # smallest multiple >= a
        may[s:s + rows] = first <= torch.clamp(d_max, max=hi)
        is_full = (d_min >= lo) & (d_max <= hi)
        if step != 1:  # a tile of several distances skips the non-multiples
            is_full &= d_min == d_max
        full[s:s + rows] = is_full
    return may, full & may


def causal_tiles(q_len: int, k_len: int, block_m: int, block_n: int, device):
    """``(may, full)`` ``[QT, KT]`` maps of bottom-right causality ``j <= i + Lk - Lq``."""
    inf = q_len + k_len + 1
    return band_tiles(q_len, k_len, block_m, block_n, 0, inf, device)


def _bool_result(hit, shape, device) -> torch.Tensor:
    hit = torch.as_tensor(hit, device=device)
    if hit.dtype != torch.bool:
        raise TypeError(f"predicate must return a bool tensor, got {hit.dtype}")
    try:
        return torch.broadcast_to(hit, shape)
    except RuntimeError as err:
        raise ValueError(f"predicate returned shape {tuple(hit.shape)}, which does not "
                         f"broadcast to {tuple(shape)}") from err


def predicate_to_tiles(q_len: int, k_len: int, predicate, candidates: torch.Tensor,
                       known_full: torch.Tensor | None, is_causal: bool, block_m: int,
                       block_n: int, chunk_pairs: int = DEFAULT_CHUNK_PAIRS):
    """Evaluate ``predicate(b, h, q_idx, k_idx)`` on the candidate tiles and build the CSR.

    ``candidates``: bool ``[B, H, QT, KT]`` (broadcast views are fine), the tiles that may hold
    an active pair; ``known_full``: the same shape or None, tiles where the predicate is True on
    every in-range pair (they skip evaluation when they are also in range and causal-full).
    The predicate gets int64 tensors ``b, h`` ``[T, 1, 1]``, ``q_idx`` ``[T, block_m, 1]`` and
    ``k_idx`` ``[T, 1, block_n]``, always inside ``[0, Lq)`` / ``[0, Lk)`` (the padding of edge
    tiles is clamped, then masked off), and returns a bool tensor broadcastable to
    ``[T, block_m, block_n]``. Returns the arrays of ``mask_to_tiles``.
    """
    device = candidates.device
    n_b, n_h, n_qt, n_kt = candidates.shape
    off = k_len - q_len
    cand = candidates
    full_map = torch.zeros(n_b, n_h, n_qt, n_kt, dtype=torch.bool, device=device)
    if known_full is not None:
        full_map |= known_full & cand & tile_in_range(q_len, k_len, block_m, block_n, device)
    if is_causal:
        c_may, c_full = causal_tiles(q_len, k_len, block_m, block_n, device)
        cand = cand & c_may
        full_map &= c_full
    todo = (cand & ~full_map).reshape(-1).nonzero()[:, 0]  # row-major (b, h, qt, kt)
    nnz = int(full_map.sum()) * block_m * block_n
    partial_flat = torch.zeros(full_map.numel(), dtype=torch.bool, device=device)
    full_flat = full_map.view(-1)
    rows_m = torch.arange(block_m, device=device)[None, :, None]
    cols_n = torch.arange(block_n, device=device)[None, None, :]
    per_chunk = max(1, chunk_pairs // (block_m * block_n))
    masks = []
    for start in range(0, todo.numel(), per_chunk):
        lin = todo[start:start + per_chunk]
        kt = lin % n_kt
        qt = (lin // n_kt) % n_qt
        h = (lin // (n_kt * n_qt)) % n_h
        b = lin // (n_kt * n_qt * n_h)
        q = qt[:, None, None] * block_m + rows_m  # [T, block_m, 1]
        k = kt[:, None, None] * block_n + cols_n  # [T, 1, block_n]
        ok = (q < q_len) & (k < k_len)  # [T, block_m, block_n]
        if is_causal:
            ok &= k <= q + off
        hit = predicate(b[:, None, None], h[:, None, None], torch.clamp(q, max=q_len - 1),
                        torch.clamp(k, max=k_len - 1))
        bits = _bool_result(hit, ok.shape, device) & ok  # [T, block_m, block_n]
        flat = bits.flatten(1)
        count = flat.sum(1)
        nnz += int(count.sum())
        is_full = count == block_m * block_n
        is_part = (count > 0) & ~is_full
        full_flat[lin[is_full]] = True
        partial_flat[lin[is_part]] = True
        masks.append(pack_bits(bits[is_part]))
    partial = partial_flat.view(n_b, n_h, n_qt, n_kt)
    full_ptr, full_col, part_ptr, part_rc = tiles_from_flags(full_map, partial)
    n_words = (block_n + 31) // 32
    masks = (torch.cat(masks) if masks else
             torch.zeros(0, block_m, n_words, dtype=torch.int32, device=device))
    return full_ptr, full_col, part_ptr, part_rc[:, 1].to(torch.int32), masks, nnz
