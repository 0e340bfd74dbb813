"""The Triton layout build's host side: plan, allocate, launch the five kernels, one sync."""

import collections
import functools
import os

import torch
import triton

from ..torch import index_range_error, transpose_key_dtype
from . import config as config_module
from .config import word_args
from .count import indices_to_tiles_count_kernel
from .launch import BoundKernel, new_int
from .transpose import column_pointers_kernel, place_tiles_kernel, rank_tiles_kernel
from .write import indices_to_tiles_write_kernel

POOL_BYTES = 2**28  # pass 2 rescans the rows that do not fit
LAST_BUILD = {}  # rows of the last build, and how many the fast scan gave to the general one


class _Plan:
    """What the builds of one problem shape share (``_plan``): sizes, and the kernels bound to
    their scalar arguments."""


class _Counted:
    """Pass 1 launched: its plan and buffers, what the host sync, pass 2 and the transposition
    need."""


@functools.lru_cache(maxsize=64)
def _plan(device, shape, strides, dtype, q_len, k_len, is_causal, block_m, block_n, pool_bytes,
          config_items, interpret) -> _Plan:
    """The plan of a build, cached: a model builds its layout every step, and working this out
    costs more host time than launching the kernels."""
    p = _Plan()
    n_b, n_h, _, width = shape
    p.n_qt = n_qt = -(-q_len // block_m)
    p.n_kt = n_kt = -(-k_len // block_n)
    p.n_groups = n_b * n_h
    p.n_cols = n_cols = p.n_groups * n_kt
    p.n_rows = n_rows = p.n_groups * n_qt
    p.n_words = n_words = -(-block_n // 32)
    p.key_dtype = transpose_key_dtype(n_rows, n_kt)
    cfg = (dict(config_items) if config_items else
           config_module.get_tiles_config(block_m, block_n, width, dtype.itemsize))
    span, chunk, per_sm = cfg.pop("SPAN"), cfg.pop("CHUNK"), cfg.pop("programs_per_sm")
    fast, window = cfg.pop("FAST", True), cfg.pop("WINDOW", True)
    stages = cfg.pop("STAGES", 3)
    if cfg.get("maxnreg") is None or device.type != "cuda":
        cfg.pop("maxnreg", None)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        p.n_programs = n_programs = min(n_rows, per_sm * sms)
    else:  # the CPU interpreter runs programs one after the other
        p.n_programs = n_programs = min(n_rows, 3)
    part_cap = min(n_rows * (span // n_words), pool_bytes // (4 * block_m * n_words))
    full_cap = min(n_rows * (span // n_words), pool_bytes // 4) if part_cap else 0
    # pairs, out-of-range indices, pool slots full / partial, rows the fast scan left to the
    # general one, full tiles, partial tiles, rows the window scan held (int64); the pointers
    p.zeroed = [16, 2 * (n_rows + 1)]
    # counts, start, pool_at, scratch, pool full / partial / masks, per key tile: full and
    # partial tiles (pass 2's counts), then the place kernel's counters
    p.work = [2 * n_rows, n_rows, 2 * n_rows, n_programs * block_m * span, max(full_cap, 1),
              max(part_cap, 1), max(part_cap, 1) * block_m * n_words, 4 * n_cols]
    shared = dict(n_rows=n_rows, heads=n_h, n_qt=n_qt, q_len=q_len, k_len=k_len, width=width,
                  causal_offset=k_len - q_len, stride_idx_b=strides[0], stride_idx_h=strides[1],
                  stride_idx_q=strides[2], stride_idx_w=strides[3], BLOCK_M=block_m,
                  **word_args(block_n), SPAN=span, CHUNK=chunk, IS_CAUSAL=is_causal,
                  BY_BITS=interpret, **cfg)
    fast = fast and width > 0 and width % chunk == 0
    p.count = BoundKernel(indices_to_tiles_count_kernel, pool_full_cap=full_cap,
                          pool_part_cap=part_cap, n_zero=4 * n_cols, FAST=fast,
                          WINDOW=fast and window, STAGES=stages, **shared)
    p.write = BoundKernel(indices_to_tiles_write_kernel, n_kt=n_kt, **shared)
    p.columns = BoundKernel(column_pointers_kernel, n_cols=n_cols, BLOCK=1024)
    p.place = BoundKernel(place_tiles_kernel, n_rows=n_rows, n_cols=n_cols, n_qt=max(n_qt, 1),
                          BLOCK=1024)
    p.rank = BoundKernel(rank_tiles_kernel, n_rows=n_rows, BLOCK=32)
    return p


def _count_pass(idx, q_len, k_len, is_causal, block_m, block_n, pool_bytes, config):
    """Launch pass 1; no sync (``_read_stats`` is the sync). Two allocations: a zeroed one for
    the statistics and the CSR pointers (which the layout keeps), and one int32 workspace for
    the per-row arrays, the programs' scratch, the pool and the per-key-tile counters."""
    if idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be int32 or int64, got {idx.dtype}")
    if k_len >= 2**31 - 2**15:
        raise ValueError(f"k_len={k_len} is too large for the Triton layout build")
    c = _Counted()
    c.device = idx.device
    c.plan = p = _plan(idx.device, tuple(idx.shape), idx.stride(), idx.dtype, q_len, k_len,
                       bool(is_causal), block_m, block_n, pool_bytes,
                       tuple(config.items()) if config else None,
                       os.environ.get("TRITON_INTERPRET") == "1")
    stats, c.ptrs = torch.zeros(sum(p.zeroed), dtype=torch.int32,
                                device=c.device).split(p.zeroed)
    c.stats = stats.view(torch.int64)
    (c.counts, c.start, c.pool_at, c.scratch, c.pool_full, c.pool_part, c.pool_mask,
     c.columns) = new_int(sum(p.work), torch.int32, c.device).split(p.work)  # freed after
    if p.n_rows:
        p.count((p.n_programs,), idx_ptr=idx, counts_ptr=c.counts, start_ptr=c.start,
                pool_at_ptr=c.pool_at, stats_ptr=c.stats, scratch_ptr=c.scratch,
                pool_full_ptr=c.pool_full, pool_part_ptr=c.pool_part,
                pool_mask_ptr=c.pool_mask, zero_ptr=c.columns)
    else:  # no pass 1 to clear the counters
        c.columns.zero_()
    return c


def _read_stats(c, idx, k_len):
    """The host sync: pass 1's totals (``c.nnz``, ``c.n_full``, ``c.n_part``); raises for
    out-of-range indices and for layouts too large for int32 positions."""
    c.nnz, n_bad, _, _, rescanned, c.n_full, c.n_part, window = c.stats.tolist()
    LAST_BUILD.update(rows=c.plan.n_rows, rescanned_rows=rescanned, window_rows=window)
    if n_bad:
        raise index_range_error(idx, k_len)
    if max(c.n_full, c.n_part) >= 2**31:
        raise ValueError("layout has more than 2**31 tiles; use larger block_m / block_n")


def _write_pass(idx, c, full_col, part_col, masks, keys):
    """Launch pass 2 into the given outputs (their lengths: the capacities)."""
    p = c.plan
    if p.n_rows:
        p.write((p.n_programs,), idx_ptr=idx, counts_ptr=c.counts, ptrs_ptr=c.ptrs,
                start_ptr=c.start, pool_at_ptr=c.pool_at, scratch_ptr=c.scratch,
                pool_full_ptr=c.pool_full, pool_part_ptr=c.pool_part,
                pool_mask_ptr=c.pool_mask, full_col_ptr=full_col, part_col_ptr=part_col,
                masks_ptr=masks, keys_ptr=keys, col_count_ptr=c.columns,
                cap_f=full_col.numel(), cap_p=part_col.numel())


def _transpose(c, keys, cap_f, cap_p, full_ptr_t, part_ptr_t, tmp_full, tmp_part, tmp_mask,
               row_t, part_mask_t):
    """The key-tile lists (``preprocess.torch.transpose_tiles``) from pass 2's keys and per-key-tile
    counts: their pointers, each tile placed in its list, each list sorted."""
    p = c.plan
    p.columns((2,), col_count_ptr=c.columns, full_ptr_t_ptr=full_ptr_t,
              part_ptr_t_ptr=part_ptr_t)
    if not p.n_cols:
        return
    p.place((max(triton.cdiv(cap_f + cap_p, 1024), 1),), keys_ptr=keys, ptrs_ptr=c.ptrs,
            full_ptr_t_ptr=full_ptr_t, part_ptr_t_ptr=part_ptr_t, col_count_ptr=c.columns,
            tmp_full_ptr=tmp_full, tmp_part_ptr=tmp_part, tmp_mask_ptr=tmp_mask, cap_f=cap_f,
            cap_p=cap_p)
    p.rank((p.n_cols, 2), tmp_full_ptr=tmp_full, tmp_part_ptr=tmp_part, tmp_mask_ptr=tmp_mask,
           ptrs_ptr=c.ptrs, full_ptr_t_ptr=full_ptr_t, part_ptr_t_ptr=part_ptr_t,
           row_t_ptr=row_t, mask_t_ptr=part_mask_t, cap_f=cap_f, cap_p=cap_p)


def indices_to_tiles_triton(idx: torch.Tensor, q_len: int, k_len: int, is_causal: bool,
                            block_m: int, block_n: int, *, pool_bytes: int = POOL_BYTES,
                            config: dict | None = None, with_keys: bool = False):
    """``(Bl, Hl, Lq, W)`` int32/int64 indices (any strides) -> ``full_ptr, full_col, part_ptr,
    part_col, masks, nnz`` exactly as ``indices_to_tiles_torch`` gives them (pointers int64,
    columns and masks int32, ``nnz`` an int), on ``idx.device``.

    Raises ``ValueError`` for an index outside ``[-1, k_len)``: the kernels count them, so the
    caller need not scan the indices first. ``config`` overrides
    ``preprocess.triton.config.get_tiles_config``; ``pool_bytes`` caps the pool of single-span rows
    (0: pass 2 rescans every row). ``with_keys``: return ``(arrays, keys)``, ``keys`` the
    tiles' ``preprocess.torch.transpose_keys``, which pass 2 writes next to the tiles.
    """
    c = _count_pass(idx, q_len, k_len, is_causal, block_m, block_n, pool_bytes, config)
    _read_stats(c, idx, k_len)
    full_col = new_int(c.n_full, torch.int32, c.device)
    part_col = new_int(c.n_part, torch.int32, c.device)
    masks = new_int((c.n_part, block_m, c.plan.n_words), torch.int32, c.device)
    keys = new_int(c.n_full + c.n_part, c.plan.key_dtype, c.device)
    _write_pass(idx, c, full_col, part_col, masks, keys)
    ptrs = c.ptrs.long().view(2, -1)
    arrays = ptrs[0], full_col, ptrs[1], part_col, masks, c.nnz
    return (arrays, keys) if with_keys else arrays


# Tile counts to allocate for the next build of the same shape: (device, shape, dtype, q_len,
# k_len, is_causal, block_m, block_n) -> (full, partial), the last build's plus 1/16.
_CAPACITY = collections.OrderedDict()
CAPACITY_ENTRIES = 64


def forget_capacities():
    """Drop the remembered tile counts: the next build of every shape syncs after pass 1."""
    _CAPACITY.clear()


def layout_tensors_triton(idx: torch.Tensor, q_len: int, k_len: int, is_causal: bool,
                          block_m: int, block_n: int, *, pool_bytes: int = POOL_BYTES,
                          config: dict | None = None,
                          reuse_capacity: bool = True) -> tuple[dict, int]:
    """Every tensor of the ``SparseLayout`` of ``idx`` (int32, on its device) and ``nnz``:
    ``indices_to_tiles_triton``'s tiles with the key-tile lists of
    ``preprocess.torch.transpose_tiles`` (``_transpose``: three small kernels, no sort).

    The first build of a shape syncs after pass 1 for the tile counts and allocates exactly.
    Later builds of the same shape (``reuse_capacity``) allocate the last build's counts plus
    1/16 and launch everything without waiting; the one sync comes last (pass 1's totals and
    its index check) and the tensors are views of their first entries. A build that needs
    more room is redone the first way (twice the work, once); one that used less than half is
    copied to tensors of its own size.
    """
    key = (idx.device, tuple(idx.shape), idx.dtype, q_len, k_len, is_causal, block_m, block_n)
    cap = _CAPACITY.get(key) if reuse_capacity else None
    args = (idx, q_len, k_len, is_causal, block_m, block_n, pool_bytes, config)
    built = _build(*args, cap)
    if built is None:  # more tiles than the capacity
        cap = None
        built = _build(*args, cap)
    tensors, nnz, n_full, n_part, cap_n = built
    if 2 * (n_full + n_part) < cap_n:  # mostly unused: give the tensors their own storage
        tensors = {name: t.clone() for name, t in tensors.items()}
    if reuse_capacity:
        if cap is None or 2 * (n_full + n_part) < cap_n:
            _CAPACITY[key] = (n_full + n_full // 16 + 16, n_part + n_part // 16 + 16)
        _CAPACITY.move_to_end(key)
        while len(_CAPACITY) > CAPACITY_ENTRIES:
            _CAPACITY.popitem(last=False)
    return tensors, nnz


def _build(idx, q_len, k_len, is_causal, block_m, block_n, pool_bytes, config, cap):
    """``layout_tensors_triton`` with room for ``cap`` = (full, partial) tiles, or exactly as
    many as pass 1 counts (``None``: a sync after it). Returns ``(tensors, nnz, n_full,
    n_part, capacity)``, or None when the layout does not fit ``cap``. The outputs are views of
    one int32 allocation, in this order."""
    c = _count_pass(idx, q_len, k_len, is_causal, block_m, block_n, pool_bytes, config)
    p = c.plan
    exact = cap is None
    if exact:
        _read_stats(c, idx, k_len)
        cap = c.n_full, c.n_part
    cap_f, cap_p = cap
    cap_n = cap_f + cap_p
    tile_words = block_m * p.n_words
    sizes = [cap_f, cap_p, cap_p * tile_words, cap_n, cap_p, p.n_cols + 1, p.n_cols + 1]
    buffer = new_int(sum(sizes), torch.int32, c.device)
    full_col, part_col, masks, row_t, part_mask_t, full_ptr_t, part_ptr_t = buffer.split(sizes)
    # not in the layout's buffer (freed after): the tiles' keys, the unsorted key-tile lists
    keys = new_int(cap_n, p.key_dtype, c.device)
    tmp_full, tmp_part, tmp_mask = new_int(cap_n + cap_p, torch.int32, c.device).split(
        [cap_f, cap_p, cap_p])
    _write_pass(idx, c, full_col, part_col, masks, keys)
    _transpose(c, keys, cap_f, cap_p, full_ptr_t, part_ptr_t, tmp_full, tmp_part, tmp_mask,
               row_t, part_mask_t)
    if not exact:
        _read_stats(c, idx, k_len)  # the one sync, after every launch
        if c.n_full > cap_f or c.n_part > cap_p:
            return None
    n_full, n_part = c.n_full, c.n_part
    full_ptr, part_ptr = c.ptrs.split(p.n_rows + 1)
    tensors = dict(full_ptr=full_ptr, part_ptr=part_ptr, full_col=full_col[:n_full],
                   part_col=part_col[:n_part],
                   masks=masks[:n_part * tile_words].view(n_part, block_m, p.n_words),
                   full_row_t=row_t[:n_full], part_row_t=row_t[n_full:n_full + n_part],
                   part_mask_t=part_mask_t[:n_part], full_ptr_t=full_ptr_t,
                   part_ptr_t=part_ptr_t)
    return tensors, c.nnz, n_full, n_part, cap_n
