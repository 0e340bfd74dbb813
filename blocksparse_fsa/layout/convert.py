"""A ``SparseLayout`` to and from other descriptions of a sparse pattern.

- ``layout_csr`` / ``layout_to_indices``: the exact pattern back as one CSR over query rows, or
  as padded per-query key indices (the input of ``build_layout``);
- ``layout_from_csr``: the inverse of ``layout_csr``;
- ``layout_from_scipy`` / ``layout_to_scipy``: SciPy sparse matrices, one per (batch, head);
- ``layout_to_flex_block_mask``: a FlexAttention ``BlockMask`` with a ``mask_mod`` that decides
  the exact pairs of partial tiles from the layout's bitmasks.

Everything here is plain PyTorch on the layout's device (CPU or CUDA) and never builds an
Lq x Lk array: memory is O(nnz + tiles * block_m) (tiles are walked a chunk at a time), plus
O(batch * heads * Lq * W) for the padded indices and O(batch * Hq * QT * KT) for the BlockMask,
which stores a dense tile map itself.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from .core import SparseLayout, check_blocks, inverse, layout_from_tiles, popcount32, tile_rows

# pairs of full tiles / bytes plus set bits of partial tiles decoded at a time: bounds the
# temporaries of layout_csr
_CHUNK_PAIRS = 1 << 22
# tile-map codes of the FlexAttention mask_mod (>= 0: index of a partial tile into ``masks``)
_NO_TILE, _FULL_TILE = -1, -2


# ---- the exact pattern as CSR / padded indices -----------------------------------------------
def popcount_rows(masks: torch.Tensor) -> torch.Tensor:
    """``[T, block_m, n_words]`` int32 words -> ``[T, block_m]`` int64 active keys per row."""
    return popcount32(masks).sum(-1, dtype=torch.long)


def _mask_bytes(masks: torch.Tensor) -> torch.Tensor:
    """``[T, block_m, n_words]`` int32 words -> ``[T, block_m, 4 * n_words]`` uint8, their
    bytes (a view; little-endian, as on every device PyTorch runs on): byte ``k`` of a row
    holds key columns ``8k`` to ``8k + 7``, bit ``c % 8`` = column ``c``."""
    n_tiles, bm, n_words = masks.shape
    return masks.reshape(-1).view(torch.uint8).view(n_tiles, bm, 4 * n_words)


def _popcount8(b: torch.Tensor) -> torch.Tensor:
    """Set bits of each uint8 element, uint8."""
    b = b - ((b >> 1) & 0x55)
    b = (b & 0x33) + ((b >> 2) & 0x33)
    return (b + (b >> 4)) & 0x0F


def _key_of_bit(n_bytes: int, device) -> torch.Tensor:
    """``[n_bytes * 256 * 8]`` int64 look-up table: entry ``(256 * k + v) * 8 + j`` = the key
    column of the ``j``-th lowest set bit of value ``v`` in byte ``k`` of a row (key columns
    ``8k`` to ``8k + 7``); entries past ``v``'s set bits are never read."""
    is_set = (torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1
    bit = torch.argsort(1 - is_set, dim=1, stable=True)  # [256, 8] set positions first
    return (8 * torch.arange(n_bytes, device=device)[:, None, None] + bit).flatten()


def _entry_slots(layout: SparseLayout, row: torch.Tensor, kt: torch.Tensor,
                 counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR slots of the entries (tile, row of the tile) of ``layout``'s tiles.

    ``row`` / ``kt`` ``[T]``: each tile's tile row and key tile, the full tiles then the
    partial ones; ``counts`` ``[T, block_m]``: active keys per entry (none past ``q_len``).
    The CSR holds query row ``i`` of tile row ``r`` tile by tile in key order, so the entries
    are laid out in that order -- entry (``r``'s ``m``-th tile by key tile, ``i``) at
    ``r``'s first tile * ``block_m`` + ``i`` * (``r``'s tiles) + ``m`` -- and one 1-D prefix
    sum of their counts gives all slots. Returns the first slot of each entry ``[T,
    block_m]`` and ``indptr`` ``[batch * heads * q_len + 1]``, both int64.
    """
    bm, dev = layout.block_m, layout.device
    start = layout.full_ptr.long() + layout.part_ptr.long()  # merged row pointers [rows + 1]
    n_tiles = start.diff()
    place = torch.empty_like(row)  # rank among the tiles sorted by (row, key tile)
    place[torch.argsort(row * layout.num_k_tiles + kt)] = torch.arange(row.numel(), device=dev)
    first, i = start[row], torch.arange(bm, device=dev)
    order = (first * bm + place - first)[:, None] + n_tiles[row][:, None] * i  # [T, bm]
    in_order = torch.empty_like(counts).view(-1).scatter_(0, order.view(-1), counts.view(-1))
    ends = torch.zeros(row.numel() * bm + 1, dtype=torch.long, device=dev)
    torch.cumsum(in_order, 0, dtype=torch.long, out=ends[1:])  # ends[e]: keys of entries < e
    row_start = (start[:-1] * bm)[:, None] + n_tiles[:, None] * i  # [rows, bm] query rows
    q_rows = ends[row_start].view(layout.batch * layout.heads, -1)[:, :layout.q_len]
    return ends[order], torch.cat([q_rows.flatten(), ends[-1:]])


def layout_csr(layout: SparseLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact pattern as one CSR over the flat query rows ``(b * heads + h) * q_len + i``.

    Returns ``indptr`` int64 ``[batch * heads * q_len + 1]`` and ``indices`` int64 ``[nnz]``,
    the active keys of each row in ascending order, on the layout's device. No sort of the
    pairs and no loop over bits: every (tile, row of the tile) gets its first slot from one
    1-D prefix sum of popcounts (``_entry_slots``); a full tile writes ``block_n`` keys per
    row; the set bits of partial tiles are enumerated a chunk at a time with
    ``repeat_interleave`` over the popcounts of their bytes, and a bit's rank among them gives
    both its slot and, through a byte table, its key. O(tiles * block_m * n_words + nnz) work
    and memory (chunks of about ``_CHUNK_PAIRS`` bytes and set bits), two host syncs.
    """
    bm, bn, dev = layout.block_m, layout.block_n, layout.device
    n_full, n_part = layout.num_full_tiles, layout.num_partial_tiles
    row = torch.cat([tile_rows(layout.full_ptr, n_full), tile_rows(layout.part_ptr, n_part)])
    kt = torch.cat([layout.full_col, layout.part_col]).long()
    mask_bytes = _mask_bytes(layout.masks)  # [Tp, bm, n_bytes] uint8
    byte_keys = _popcount8(mask_bytes)
    n_bytes = mask_bytes.shape[2]
    counts = torch.full((n_full + n_part, bm), bn, dtype=torch.int16, device=dev)  # bn <= 256
    counts[n_full:] = byte_keys.sum(-1, dtype=torch.int16)  # edge tiles: no bits past q_len
    slot, indptr = _entry_slots(layout, row, kt, counts)
    # chunks of partial tiles: a tile costs its bytes and its set bits (temporaries of both)
    cost = torch.zeros(n_part + 1, dtype=torch.long, device=dev)
    torch.cumsum(counts[n_full:].sum(1) + bm * n_bytes, 0, out=cost[1:])
    total = int(cost[-1])  # host sync 1
    edges = torch.searchsorted(cost[:-1], torch.arange(0, total, _CHUNK_PAIRS, device=dev))
    bounds = torch.stack([edges, cost[edges]]).T.tolist() + [[n_part, total]]  # host sync 2
    nnz = n_full * bm * bn + total - n_part * bm * n_bytes  # = indptr[-1]

    indices = torch.empty(nnz, dtype=torch.long, device=dev)
    cols = torch.arange(bn, device=dev)
    step = max(1, _CHUNK_PAIRS // (bm * bn))
    for s in range(0, n_full, step):  # every key of every row, in order
        t = slice(s, min(s + step, n_full))
        indices[slot[t, :, None] + cols] = (kt[t] * bn)[:, None, None] + cols  # [C, bm, bn]
    key_of_bit = _key_of_bit(n_bytes, dev)
    table_of_byte = 256 * torch.arange(n_bytes, device=dev)  # byte k's block of key_of_bit
    for (p0, c0), (p1, c1) in itertools.pairwise(bounds):  # partial tiles [p0, p1)
        if p1 == p0:
            continue
        t = slice(n_full + p0, n_full + p1)
        in_byte = byte_keys[p0:p1].flatten()  # [C * bm * n_bytes] uint8, rows in key order
        before = torch.cumsum(in_byte, 0) - in_byte  # the chunk's set bits before each byte
        # The chunk's set bit m, the j-th of its byte (m = before + j), goes to its row's slot
        # + (m - before[the row's first byte]); in the row's k-th byte, of value v, it is key
        # key_of_bit[(256 k + v) * 8 + j] of the row's key tile.
        row_dest = slot[t].flatten() - before[::n_bytes]  # [C * bm]
        row_key = (kt[t] * bn)[:, None].expand(-1, bm).flatten()  # the row's key tile start
        lut = 8 * (mask_bytes[p0:p1].long() + table_of_byte).flatten() - before  # [C*bm*n_bytes]
        n_keys = c1 - c0 - (p1 - p0) * bm * n_bytes
        src = torch.repeat_interleave(in_byte.long(), output_size=n_keys)  # byte of each bit
        m = torch.arange(n_keys, device=dev)
        r = src // n_bytes
        indices[row_dest[r] + m] = row_key[r] + key_of_bit[lut[src] + m]
    return indptr, indices


def layout_to_indices(layout: SparseLayout) -> torch.Tensor:
    """``(batch, heads, q_len, W)`` int64 active keys per query, ascending, padded with -1, in
    the callers' token order (a reordered layout's permutation undone).

    ``W`` is the largest number of keys of a query row (at least 1). The inverse of
    ``build_layout``: ``build_layout(layout.to_indices(), layout.k_len, block_m=...,
    block_n=...)`` rebuilds the same tiles (causality is already applied to them).
    """
    if not layout.is_reordered:
        return _kernel_order_indices(layout)
    idx = _kernel_order_indices(layout.unordered())
    idx = torch.where(idx >= 0, layout.k_perm[idx.clamp(min=0)], -1)  # original keys
    idx = idx[:, :, inverse(layout.q_perm)]  # original queries
    big = torch.iinfo(idx.dtype).max  # keys ascending, the -1 padding last
    idx = torch.sort(torch.where(idx < 0, big, idx), dim=-1).values
    return idx.masked_fill_(idx == big, -1)


def _kernel_order_indices(layout: SparseLayout) -> torch.Tensor:
    indptr, keys = layout_csr(layout)
    counts = indptr[1:] - indptr[:-1]
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    rows = torch.repeat_interleave(torch.arange(counts.numel(), device=keys.device), counts)
    out = torch.full((counts.numel(), width), -1, dtype=torch.long, device=keys.device)
    out[rows, torch.arange(keys.numel(), device=keys.device) - indptr[rows]] = keys
    return out.view(layout.batch, layout.heads, layout.q_len, width)


# ---- SciPy ------------------------------------------------------------------------------------
def layout_to_scipy(layout: SparseLayout) -> list[list]:
    """``[batch][heads]`` nested list of ``scipy.sparse.csr_array`` ``(q_len, k_len)``, bool.

    ``True`` at every active pair, column indices sorted, no duplicates (canonical CSR), in the
    callers' token order; built without a dense array. The layout's ``batch`` and ``heads`` (1
    when it broadcasts) set the nesting.
    """
    if layout.is_reordered:
        q_inv, k_inv = (inverse(p).cpu().numpy() for p in (layout.q_perm, layout.k_perm))
        return [[m[q_inv][:, k_inv].tocsr() for m in row]
                for row in layout_to_scipy(layout.unordered())]
    import scipy.sparse as sp

    indptr, keys = (t.cpu().numpy() for t in layout_csr(layout))
    if max(layout.k_len, int(indptr[-1])) < 2**31:  # SciPy's usual index type when it fits
        indptr, keys = indptr.astype(np.int32), keys.astype(np.int32)
    q_len = layout.q_len
    out = []
    for b in range(layout.batch):
        out.append([])
        for h in range(layout.heads):
            lo = (b * layout.heads + h) * q_len
            start, stop = indptr[lo], indptr[lo + q_len]
            out[-1].append(sp.csr_array(
                (np.ones(stop - start, dtype=bool), keys[start:stop], indptr[lo:lo + q_len + 1]
                 - start), shape=(q_len, layout.k_len)))
    return out


def _scipy_grid(matrices) -> list[list]:
    import scipy.sparse as sp

    if sp.issparse(matrices):
        return [[matrices]]
    bad = TypeError("matrices must be a scipy.sparse matrix/array (q_len, k_len) or a nested "
                    "[batch][heads] sequence of them")
    if isinstance(matrices, (str, bytes)) or not isinstance(matrices, Sequence) or not matrices:
        raise bad
    grid = []
    for row in matrices:
        if sp.issparse(row):
            raise TypeError("a flat sequence of matrices is ambiguous: nest it as [batch][heads] "
                            "(e.g. [[m0, m1]] for one batch of two heads)")
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence) or not row:
            raise bad
        if not all(sp.issparse(m) for m in row):
            raise bad
        grid.append(list(row))
    if len({len(row) for row in grid}) != 1:
        raise ValueError("every batch entry must hold the same number of heads, got "
                         f"{[len(row) for row in grid]}")
    shapes = {m.shape for row in grid for m in row}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"all matrices must share one 2-D shape (q_len, k_len), got {shapes}")
    return grid


def tiles_from_csr(indptr, indices, n_groups, q_len, k_len, is_causal, block_m, block_n):
    """A pattern in ``layout_csr``'s form -> the arrays ``_finish`` takes.

    ``indptr`` int64 ``[n_groups * q_len + 1]`` over the flat query rows ``g * q_len + i``,
    ``indices`` int64 keys; no key may repeat within a row. PyTorch on the tensors' device,
    O(nnz + tiles * block_m) memory: one ``unique`` over tile ids gives the tiles in CSR order
    (row, then key tile); a tile is full when it lies inside the lengths and holds
    ``block_m * block_n`` pairs; partial tiles get their bits by summing distinct powers of two
    (an OR, since pairs are unique).
    """
    dev = indices.device
    flat = torch.repeat_interleave(torch.arange(indptr.numel() - 1, device=dev),
                                   indptr[1:] - indptr[:-1])
    query, key = flat % q_len, indices
    if is_causal:
        keep = key <= query + (k_len - q_len)
        flat, query, key = flat[keep], query[keep], key[keep]
    n_qt, n_kt = -(-q_len // block_m), -(-k_len // block_n)
    n_rows, n_words = n_groups * n_qt, (block_n + 31) // 32
    tile_of_pair = ((flat // q_len) * n_qt + query // block_m) * n_kt + key // block_n
    tiles, inverse, pairs_per_tile = torch.unique(tile_of_pair, return_inverse=True,
                                                  return_counts=True)
    row, kt = tiles // n_kt, tiles % n_kt
    qt = row % n_qt
    full = (((qt + 1) * block_m <= q_len) & ((kt + 1) * block_n <= k_len)
            & (pairs_per_tile == block_m * block_n))

    def csr(sel):
        ptr = torch.zeros(n_rows + 1, dtype=torch.long, device=dev)
        torch.cumsum(torch.bincount(row[sel], minlength=n_rows), 0, out=ptr[1:])
        return ptr, kt[sel].to(torch.int32)

    full_ptr, full_col = csr(full)
    part_ptr, part_col = csr(~full)
    part_id = torch.cumsum(~full, 0) - 1  # index of each partial tile among partial tiles
    in_part = ~full[inverse]
    p = part_id[inverse[in_part]]
    r, c = query[in_part] % block_m, key[in_part] % block_n
    words = torch.zeros(part_col.numel() * block_m * n_words, dtype=torch.long, device=dev)
    words.index_add_(0, (p * block_m + r) * n_words + c // 32, torch.ones_like(c) << (c % 32))
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement
    masks = words.view(part_col.numel(), block_m, n_words)
    return full_ptr, full_col, part_ptr, part_col, masks, key.numel()


def layout_from_csr(indptr, indices, batch, heads, q_len, k_len, *, is_causal=False,
                    block_m=None, block_n=None) -> SparseLayout:
    """Layout of a pattern in ``layout_csr``'s form (its inverse); on ``indices``' device.

    ``indptr`` ``[batch * heads * q_len + 1]``, ``indices`` the keys of each flat query row
    ``(b * heads + h) * q_len + i``, each in ``[0, k_len)`` and at most once per row (any order).
    """
    block_m, block_n = check_blocks(block_m, block_n)
    indptr, indices = torch.as_tensor(indptr).long(), torch.as_tensor(indices).long()
    if indptr.shape != (batch * heads * q_len + 1,) or int(indptr[-1]) != indices.numel():
        raise ValueError(f"indptr must have batch * heads * q_len + 1 = "
                         f"{batch * heads * q_len + 1} entries ending at len(indices) = "
                         f"{indices.numel()}, got shape {tuple(indptr.shape)}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= k_len):
        raise ValueError(f"indices must lie in [0, k_len={k_len})")
    arrays = tiles_from_csr(indptr.to(indices.device), indices, batch * heads, q_len, k_len,
                            bool(is_causal), block_m, block_n)
    layout = layout_from_tiles(q_len, k_len, block_m, block_n, batch, heads, bool(is_causal),
                               *arrays)
    return layout.to(indices.device)


def layout_from_scipy(matrices, *, is_causal=False, block_m=None, block_n=None,
                      device="cpu") -> SparseLayout:
    """Layout of SciPy sparse matrices: one ``(Lq, Lk)``, or a nested ``[batch][heads]``.

    Any sparse format (``csr_array``, ``coo_matrix``, ...). A pair is active iff its value
    in ``matrix.toarray()`` is nonzero: duplicates are summed, explicit zeros dropped (NaN
    counts as nonzero). Built from the nonzeros in O(nnz) memory, never a dense array; the
    caller's matrices are not modified.
    """
    import scipy.sparse as sp

    grid = _scipy_grid(matrices)
    q_len, k_len = grid[0][0].shape
    indptrs, keys, offset = [np.zeros(1, dtype=np.int64)], [], 0
    for m in (m for row in grid for m in row):
        m = sp.csr_array(m, copy=True)  # never mutate the caller's matrix
        m.sum_duplicates()  # duplicates add up, as in toarray()
        m.eliminate_zeros()  # a pair is active iff its value is nonzero (NaN counts)
        indptrs.append(m.indptr[1:].astype(np.int64) + offset)
        keys.append(m.indices)
        offset += m.indices.size
    indptr = torch.from_numpy(np.concatenate(indptrs))
    indices = torch.from_numpy(np.concatenate(keys).astype(np.int64, copy=False))
    layout = layout_from_csr(indptr, indices, len(grid), len(grid[0]), q_len, k_len,
                             is_causal=is_causal, block_m=block_m, block_n=block_n)
    return layout.to(device)


# ---- FlexAttention ----------------------------------------------------------------------------
def layout_tile_map(layout: SparseLayout) -> torch.Tensor:
    """``[batch * heads, QT, KT]`` int32: partial-tile index into ``masks``, -2 full, -1 none."""
    n_qt, n_kt = layout.num_q_tiles, layout.num_k_tiles
    dev = layout.device
    tile_map = torch.full((layout.batch * layout.heads * n_qt * n_kt,), _NO_TILE,
                          dtype=torch.int32, device=dev)
    full = tile_rows(layout.full_ptr) * n_kt + layout.full_col.long()
    part = tile_rows(layout.part_ptr) * n_kt + layout.part_col.long()
    tile_map[full] = _FULL_TILE
    tile_map[part] = torch.arange(part.numel(), dtype=torch.int32, device=dev)
    return tile_map.view(layout.batch * layout.heads, n_qt, n_kt)


def _ordered(dense: torch.Tensor):
    """``[..., KT]`` bool -> (blocks per row, their indices first) as FlexAttention stores."""
    num = dense.sum(-1, dtype=torch.int32)
    idx = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True)
    return num.contiguous(), idx.to(torch.int32).contiguous()


def layout_to_flex_block_mask(layout: SparseLayout, num_q_heads: int | None = None):
    """A FlexAttention ``BlockMask`` (with its ``mask_mod``) of exactly this pattern.

    ``flex_attention(q, k, v, block_mask=layout.to_flex_block_mask(Hq), enable_gqa=True)``
    with q ``(B, Hq, Lq, D)`` equals this layout's attention. Partial tiles become
    ``kv_indices``, full tiles ``full_kv_indices``, ``BLOCK_SIZE = (block_m, block_n)``.
    ``num_q_heads`` (default: ``heads``) must be a multiple of ``heads``; a per-KV-head
    layout is expanded to one BlockMask head per query head; a batch of 1 broadcasts. The
    ``mask_mod`` is exact on every pair (eager flex ignores the block lists and evaluates it
    everywhere); the BlockMask holds ``[B, H, QT, KT]`` tables. A compiled flex needs its kernel
    tile to divide ours: pass ``kernel_options={"BLOCK_M": block_m, "BLOCK_N": block_n}``
    (or smaller) when its default is larger.
    """
    from torch.nn.attention.flex_attention import BlockMask

    if layout.is_reordered:
        raise ValueError("to_flex_block_mask needs a layout without a token permutation: "
                         "export the layout you built before reordering")
    heads = layout.heads
    num_q_heads = heads if num_q_heads is None else int(num_q_heads)
    if num_q_heads < 1 or num_q_heads % heads:
        raise ValueError(f"num_q_heads must be a positive multiple of the layout's heads "
                         f"({heads}), got {num_q_heads}")
    group = num_q_heads // heads
    bm, bn, n_qt, n_kt = layout.block_m, layout.block_n, layout.num_q_tiles, layout.num_k_tiles
    tile_map = layout_tile_map(layout)  # [batch * heads, QT, KT]
    # Flex reads the BlockMask at (batch % B, query head % H): give it one row per query head
    # (H = Hq) unless the layout has a single head, which broadcasts as H = 1.
    per_head = tile_map.view(layout.batch, heads, n_qt, n_kt)
    if heads > 1:
        head_of = torch.arange(num_q_heads, device=layout.device) // group
        per_head = per_head[:, head_of]
    kv_num, kv_idx = _ordered(per_head >= 0)
    full_num, full_idx = _ordered(per_head == _FULL_TILE)
    masks = layout.masks
    if masks.shape[0] == 0:  # keep the gather in mask_mod in bounds
        masks = torch.zeros(1, bm, masks.shape[2], dtype=torch.int32, device=layout.device)
    n_b = layout.batch

    def mask_mod(b, h, q_idx, kv_idx):
        g = (b % n_b) * heads + (h // group) % heads
        tid = tile_map[g, q_idx // bm, kv_idx // bn]
        col = kv_idx % bn  # key column in the tile (bit col % 32 of word col // 32)
        word = masks[torch.clamp(tid, min=0), q_idx % bm, col // 32]
        bit = (word >> (col % 32)) & 1
        return (tid == _FULL_TILE) | ((tid >= 0) & (bit == 1))

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(bm, bn),
                                    mask_mod=mask_mod, seq_lengths=(layout.q_len, layout.k_len))
