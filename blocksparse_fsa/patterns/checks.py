"""Argument checks shared by the pattern builders; each raises naming the argument."""

from __future__ import annotations

import numpy as np
import torch

from ..layout.build import check_int


def int_pair(name, value) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        return check_int(name, value[0], 1), check_int(name, value[1], 1)
    value = check_int(name, value, 1)
    return value, value


def per_axis(name, value, n_dim, kind):
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * n_dim
    if len(values) != n_dim:
        raise ValueError(f"{name} must be one value or {n_dim}, got {value!r}")
    if kind is bool:
        if not all(isinstance(v, (bool, np.bool_)) for v in values):
            raise ValueError(f"{name} must be a bool or {n_dim} bools, got {value!r}")
        return tuple(bool(v) for v in values)
    return values


def positions_arg(name, value, k_len, device) -> torch.Tensor:
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


def cu_seqlens_arg(value) -> torch.Tensor:
    cu = torch.as_tensor(value)
    if cu.dtype.is_floating_point or cu.dtype == torch.bool or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D integer tensor of >= 2 offsets, got "
                         f"{value!r}")
    cu = cu.to(torch.int64)
    if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {cu.tolist()}")
    return cu


def window_arg(window, length) -> tuple[int, int]:
    if window is None:
        return length, length
    if isinstance(window, (tuple, list)):
        if len(window) != 2:
            raise ValueError(f"window must be an int or (left, right), got {window!r}")
        return check_int("window", window[0]), check_int("window", window[1])
    window = check_int("window", window, 1)
    return window - 1, window - 1


def block_map_arg(block_map) -> torch.Tensor:
    if not isinstance(block_map, torch.Tensor):
        raise TypeError(f"block_map must be a torch.Tensor, got {type(block_map).__name__}")
    if block_map.dtype.is_floating_point or block_map.is_complex():
        raise TypeError(f"block_map must be bool (or 0/1 integer), got {block_map.dtype}")
    if not 2 <= block_map.dim() <= 4 or 0 in block_map.shape:
        raise ValueError("block_map must have shape [nbq, nbk], [heads, nbq, nbk] or [batch, "
                         f"heads, nbq, nbk], got {tuple(block_map.shape)}")
    bmap = block_map if block_map.dtype == torch.bool else block_map != 0
    return bmap.reshape((1,) * (4 - bmap.dim()) + tuple(bmap.shape))
