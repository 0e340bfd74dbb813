"""Tile metadata from a dense boolean mask, and for dense (optionally causal) attention.

Both run in PyTorch on the mask's device. A dense mask already costs O(Lq * Lk) memory, so
reducing it per tile adds no new order of memory; dense attention never builds a mask at all
(tiles are classified analytically and only the partial tiles' bits are evaluated).
"""

import torch


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """``[T, block_m, block_n]`` bool -> ``[T, block_m, ceil(block_n / 32)]`` int32 words.

    Bit ``c % 32`` of word ``c // 32`` is key column ``c`` of the tile (little-endian in a word).
    """
    t, bm, bn = bits.shape
    n_words = (bn + 31) // 32
    if bn % 32:
        bits = torch.nn.functional.pad(bits, (0, n_words * 32 - bn))
    weights = torch.ones(32, dtype=torch.int64, device=bits.device) << torch.arange(
        32, device=bits.device)
    words = (bits.view(t, bm, n_words, 32).to(torch.int64) * weights).sum(-1)
    # reinterpret as signed 32-bit (two's complement)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def tiles_from_flags(full: torch.Tensor, partial: torch.Tensor):
    """Row-major CSR of the key tiles flagged in ``[Bl, Hl, QT, KT]`` bool maps."""
    n_kt = full.shape[-1]
    rows_full = full.reshape(-1, n_kt)
    rows_part = partial.reshape(-1, n_kt)
    full_ptr = torch.zeros(rows_full.shape[0] + 1, dtype=torch.int64, device=full.device)
    part_ptr = torch.zeros_like(full_ptr)
    torch.cumsum(rows_full.sum(1), 0, out=full_ptr[1:])
    torch.cumsum(rows_part.sum(1), 0, out=part_ptr[1:])
    full_col = rows_full.nonzero()[:, 1].to(torch.int32)
    part_rc = rows_part.nonzero()
    return full_ptr, full_col, part_ptr, part_rc


def mask_to_tiles(mask: torch.Tensor, is_causal: bool, block_m: int, block_n: int):
    """Dense bool mask ``(Bl, Hl, Lq, Lk)`` -> the same arrays as ``indices_to_tiles``."""
    n_b, n_h, q_len, k_len = mask.shape
    n_qt = -(-q_len // block_m)
    n_kt = -(-k_len // block_n)
    if is_causal:
        mask = mask & causal_mask(q_len, k_len, mask.device)
    padded = torch.nn.functional.pad(mask, (0, n_kt * block_n - k_len, 0, n_qt * block_m - q_len))
    tiles = padded.view(n_b, n_h, n_qt, block_m, n_kt, block_n)
    active = tiles.any(dim=5).any(dim=3)  # [Bl, Hl, QT, KT]
    full = tiles.all(dim=5).all(dim=3)
    full_ptr, full_col, part_ptr, part_rc = tiles_from_flags(full, active & ~full)
    r, kt = part_rc[:, 0], part_rc[:, 1]
    b, h, qt = r // (n_h * n_qt), (r // n_qt) % n_h, r % n_qt
    bits = tiles[b, h, qt, :, kt, :]  # [Tp, block_m, block_n]
    nnz = int(mask.sum())
    return full_ptr, full_col, part_ptr, kt.to(torch.int32), pack_bits(bits), nnz


def causal_mask(q_len: int, k_len: int, device) -> torch.Tensor:
    """Bottom-right aligned causal mask: query i sees key j iff j <= i + k_len - q_len."""
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    return j <= i + (k_len - q_len)


def dense_to_tiles(q_len: int, k_len: int, is_causal: bool, block_m: int, block_n: int, device):
    """Tiles of dense attention (every pair, or every causal pair) without an Lq x Lk mask."""
    n_qt = -(-q_len // block_m)
    n_kt = -(-k_len // block_n)
    off = k_len - q_len
    qt = torch.arange(n_qt, device=device)[:, None]
    kt = torch.arange(n_kt, device=device)[None, :]
    r0, r1 = qt * block_m, torch.clamp((qt + 1) * block_m, max=q_len) - 1
    c0, c1 = kt * block_n, (kt + 1) * block_n - 1
    in_range = ((qt + 1) * block_m <= q_len) & ((kt + 1) * block_n <= k_len)
    if is_causal:
        active = (c0 <= r1 + off) & (r1 + off >= 0)
        full = (c1 <= r0 + off) & in_range
    else:
        active = torch.ones(n_qt, n_kt, dtype=torch.bool, device=device)
        full = in_range
    full_ptr, full_col, part_ptr, part_rc = tiles_from_flags(full[None, None],
                                                              (active & ~full)[None, None])
    pq, pk = part_rc[:, 0], part_rc[:, 1]
    rows = pq[:, None, None] * block_m + torch.arange(block_m, device=device)[None, :, None]
    cols = pk[:, None, None] * block_n + torch.arange(block_n, device=device)[None, None, :]
    bits = (rows < q_len) & (cols < k_len)
    if is_causal:
        bits &= cols <= rows + off
    if is_causal:
        nnz = int(torch.clamp(torch.arange(q_len, device=device) + off + 1, 0, k_len).sum())
    else:
        nnz = q_len * k_len
    return full_ptr, full_col, part_ptr, pk.to(torch.int32), pack_bits(bits), nnz
