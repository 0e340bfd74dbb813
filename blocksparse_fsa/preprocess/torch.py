"""Per-query key indices -> tile metadata in PyTorch, on the indices' device.

The same layout as the numba path (``numba.py``), tensor for tensor, without a host round
trip: for indices a router or top-k selector just produced on the GPU. Works through the query
tiles in chunks; each chunk scatters its (query, key) pairs into a boolean tile buffer, so
memory is bounded by ``chunk_pairs`` indices and the chunk's touched tiles, never Lq x Lk.
"""

import torch

from .dense import pack_bits

DEFAULT_CHUNK_PAIRS = 2**22


def indices_to_tiles_torch(idx: torch.Tensor, q_len: int, k_len: int, is_causal: bool,
                           block_m: int, block_n: int, chunk_pairs: int = DEFAULT_CHUNK_PAIRS):
    """``(Bl, Hl, Lq, W)`` int indices -> ``full_ptr, full_col, part_ptr, part_col, masks,
    nnz`` like ``indices_to_tiles``, as tensors on ``idx.device`` (``nnz`` an int)."""
    device = idx.device
    n_b, n_h, _, window = idx.shape
    n_qt, n_kt = -(-q_len // block_m), -(-k_len // block_n)
    n_rows = n_b * n_h * n_qt
    flat = idx.reshape(n_b * n_h, q_len, window)
    rows_per_chunk = max(1, chunk_pairs // max(1, block_m * window))
    full_rows, full_cols, part_rows, part_cols, masks = [], [], [], [], []
    nnz = 0
    for first in range(0, n_rows, rows_per_chunk):
        rows = torch.arange(first, min(first + rows_per_chunk, n_rows), device=device)
        g, qt = rows // n_qt, rows % n_qt
        i = qt[:, None] * block_m + torch.arange(block_m, device=device)  # [R, block_m]
        in_len = i < q_len
        j = flat[g[:, None], i.clamp(max=max(q_len - 1, 0))].long()  # [R, block_m, W]
        ok = (j >= 0) & in_len[..., None]
        if is_causal:
            ok &= j <= i[..., None] + (k_len - q_len)
        r_sel, m_sel, w_sel = ok.nonzero(as_tuple=True)
        j = j[r_sel, m_sel, w_sel]
        key = (first + r_sel) * n_kt + torch.div(j, block_n, rounding_mode="floor")
        tiles, slot = torch.unique(key, return_inverse=True)  # sorted: row-major (row, kt)
        bits = torch.zeros(tiles.numel(), block_m, block_n, dtype=torch.bool, device=device)
        bits[slot, m_sel, j % block_n] = True
        count = bits.flatten(1).sum(1)
        nnz += int(count.sum())
        t_row, t_kt = tiles // n_kt, tiles % n_kt
        in_range = ((t_row % n_qt + 1) * block_m <= q_len) & ((t_kt + 1) * block_n <= k_len)
        full = (count == block_m * block_n) & in_range
        full_rows.append(t_row[full])
        full_cols.append(t_kt[full])
        part_rows.append(t_row[~full])
        part_cols.append(t_kt[~full])
        masks.append(pack_bits(bits[~full]))
    n_words = -(-block_n // 32)
    empty = torch.zeros(0, dtype=torch.long, device=device)

    def csr(row_list, col_list):
        row = torch.cat(row_list) if row_list else empty
        ptr = torch.zeros(n_rows + 1, dtype=torch.long, device=device)
        torch.cumsum(torch.bincount(row, minlength=n_rows), 0, out=ptr[1:])
        return ptr, (torch.cat(col_list) if col_list else empty).to(torch.int32)

    full_ptr, full_col = csr(full_rows, full_cols)
    part_ptr, part_col = csr(part_rows, part_cols)
    masks = (torch.cat(masks) if masks else
             torch.zeros(0, block_m, n_words, dtype=torch.int32, device=device))
    return full_ptr, full_col, part_ptr, part_col, masks, nnz


def index_range_error(idx: torch.Tensor, k_len: int) -> ValueError:
    """The error for indices outside ``[-1, k_len)``, naming the first offending position."""
    bad = ((idx < -1) | (idx >= k_len)).nonzero()[0].tolist()
    value = int(idx[tuple(bad)])
    return ValueError(f"attn_indices must lie in [-1, k_len={k_len}); found {value} at "
                      f"position {tuple(bad)}")


def transpose_csr_torch(ptr: torch.Tensor, col: torch.Tensor, n_groups: int,
                        n_rows_per_group: int, n_cols_per_group: int):
    """Query-tile CSR -> key-tile CSR, per (batch, head) group, rows ascending per column.

    ``ptr`` has ``n_groups * n_rows_per_group + 1`` entries. Returns ``(ptr_t, row_t, perm)``
    where ``perm[t]`` is the position in ``col`` of the t-th transposed entry.
    """
    device = ptr.device
    n = col.numel()  # no device sync: sizes come from ``col``, counts from scatter_add
    row = torch.repeat_interleave(torch.arange(ptr.numel() - 1, device=device),
                                  (ptr[1:] - ptr[:-1]).long(), output_size=n)
    group, q_tile = row // n_rows_per_group, row % n_rows_per_group
    key = group * n_cols_per_group + col.long()
    perm = torch.sort(key, stable=True).indices  # entries come sorted by row already
    n_rows_t = n_groups * n_cols_per_group
    counts = torch.zeros(n_rows_t, dtype=torch.long, device=device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    ptr_t = torch.zeros(n_rows_t + 1, dtype=torch.long, device=device)
    torch.cumsum(counts, 0, out=ptr_t[1:])
    return ptr_t, q_tile[perm].to(torch.int32), perm.to(torch.int32)


def transpose_key_dtype(n_rows: int, n_kt: int) -> torch.dtype:
    """int32 when every ``transpose_keys`` value fits, else int64."""
    return torch.int32 if 2 * n_rows * n_kt < 2**31 else torch.int64


def transpose_keys(full_ptr, full_col, part_ptr, part_col, n_qt: int, n_kt: int):
    """One sort key per tile, full tiles first, each list in its CSR order: ``kind * n_rows *
    n_kt + (group * n_kt + kt) * n_qt + q_tile`` (kind 0 full, 1 partial; row = group * n_qt +
    q_tile). Keys are distinct and sort as the transposed lists do: by kind, group, key tile,
    then query tile. The Triton build writes the same keys in its second pass."""
    n_rows = full_ptr.numel() - 1
    device = full_col.device
    rows = torch.arange(n_rows, device=device).repeat(2)
    counts = torch.cat([full_ptr.diff(), part_ptr.diff()])
    n_full, n = full_col.numel(), full_col.numel() + part_col.numel()
    rows = torch.repeat_interleave(rows, counts, output_size=n)
    kt = torch.cat([full_col, part_col]).long()
    keys = (rows // n_qt * n_kt + kt) * n_qt + rows % n_qt
    keys[n_full:] += n_rows * n_kt
    return keys.to(transpose_key_dtype(n_rows, n_kt))


def transpose_tiles(keys: torch.Tensor, n_full: int, n_groups: int, n_qt: int, n_kt: int):
    """Key-tile CSR of a layout from its ``transpose_keys``: one sort of all tiles.

    Returns ``full_ptr_t, full_row_t, part_ptr_t, part_row_t, part_mask_t``: pointers over
    ``n_groups * n_kt`` key tiles (int64), the query tile of each entry, and for partial tiles
    the entry's position in the query-tile lists (its mask), int32.
    """
    values, order = torch.sort(keys)
    n_cols = n_groups * n_kt
    bounds = torch.arange(2 * n_cols + 1, device=keys.device, dtype=keys.dtype) * n_qt
    ptr_t = torch.searchsorted(values, bounds)  # entries below each (kind, group, kt)
    row_t = (values % n_qt).to(torch.int32)
    return (ptr_t[:n_cols + 1], row_t[:n_full], ptr_t[n_cols:] - n_full, row_t[n_full:],
            (order[n_full:] - n_full).to(torch.int32))
