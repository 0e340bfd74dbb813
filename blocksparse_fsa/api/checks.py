"""Argument checks of the public functions: each error names the argument and says what to
pass instead."""

from __future__ import annotations

import math
import numbers
import os

import torch

from ..layout import SparseLayout

MAX_HEAD_DIM = 256
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BACKENDS = ("auto", "triton", "torch")


def check_qkv(query, key, value):
    """``(batch, q_len, num_q_heads, head_dim)`` of valid query, key and value tensors."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, seqlen, heads, head_dim), got "
                             f"{tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.device.type == "meta":
            raise ValueError(f"{name} is on the meta device: sparse_attn_func computes values; "
                             "trace shapes with torch.compile or FakeTensorMode instead")
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError("query, key and value must share a dtype, got "
                        f"{query.dtype}, {key.dtype}, {value.dtype}")
    if not query.device == key.device == value.device:
        raise ValueError("query, key and value must be on one device, got "
                         f"{query.device}, {key.device}, {value.device}")
    if key.shape != value.shape:
        raise ValueError(f"key and value must have the same shape, got {tuple(key.shape)} and "
                         f"{tuple(value.shape)}")
    batch, q_len, num_q_heads, head_dim = query.shape
    if key.shape[0] != batch:
        raise ValueError(f"key has batch {key.shape[0]} but query has batch {batch}")
    if key.shape[3] != head_dim:
        raise ValueError(f"key has head_dim {key.shape[3]} but query has head_dim {head_dim}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} is not supported: it must be in "
                         f"[1, {MAX_HEAD_DIM}]")
    if key.shape[2] == 0 or num_q_heads % key.shape[2]:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of key/value heads "
                         f"({key.shape[2]})")
    return batch, q_len, num_q_heads, head_dim


def flash_causal(is_causal, causal):
    """``is_causal`` from ours or FlashAttention's ``causal`` (None if neither was given)."""
    if causal is None:
        return is_causal
    if is_causal is not None:
        raise ValueError("pass causal (FlashAttention's name) or is_causal, not both")
    return causal


def check_scalars(head_dim, is_causal, softmax_scale, softcap, return_lse, backend):
    """The validated ``softmax_scale`` (its default filled in) and ``softcap`` as floats."""
    if is_causal is not None and not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be True, False or None, got {is_causal!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be True or False, got {return_lse!r}")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    elif not _is_real(softmax_scale):
        raise TypeError(f"softmax_scale must be a float (or None for 1/sqrt(head_dim)), got "
                        f"{type(softmax_scale).__name__} {softmax_scale!r}")
    elif not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be finite and > 0, got {softmax_scale!r}")
    if not _is_real(softcap):
        raise TypeError(f"softcap must be a float >= 0 (0 = off), got {type(softcap).__name__} "
                        f"{softcap!r}")
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be a finite float >= 0 (0 = off), got {softcap!r}")
    return float(softmax_scale), float(softcap)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_backend(backend: str, query: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"``: the path that runs ``backend`` on ``query``'s device."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if backend == "auto":
        return "triton" if query.is_cuda or interpret else "torch"
    if backend == "triton" and not (query.is_cuda or interpret):
        raise RuntimeError(f"backend='triton' needs CUDA tensors, got tensors on {query.device}: "
                           "move them to a GPU, use backend='torch' (the pure-PyTorch path) or "
                           "set TRITON_INTERPRET=1 before importing triton to run the kernels "
                           "on the CPU")
    return backend


def check_pattern(name, pattern, batch, q_len, k_len, heads_ok, broadcast=False):
    """Type and shape checks of attn_indices (``k_len=None``) or attn_mask (``broadcast``: its
    query and key dims may be 1, FSA's rules)."""
    if not isinstance(pattern, torch.Tensor):
        what = "an integer" if name == "attn_indices" else "a bool"
        raise TypeError(f"{name} must be {what} torch.Tensor, got {type(pattern).__name__}; "
                        f"convert it once with torch.as_tensor({name}, device=query.device)")
    if pattern.device.type == "meta":
        raise ValueError(f"{name} is on the meta device: the layout is built from its values; "
                         "pass a real tensor, or build the layout once and pass layout=")
    if name == "attn_mask" and pattern.dtype != torch.bool:
        raise TypeError(f"attn_mask must be a torch.bool tensor (True = attend), got "
                        f"{pattern.dtype}")
    if pattern.dim() != 4:
        raise ValueError(f"{name} must be 4-D (batch, heads, q_len, ...), got "
                         f"{tuple(pattern.shape)}")
    n_b, n_h, n_q, n_k = pattern.shape
    if n_b not in (1, batch):
        raise ValueError(f"{name} has batch {n_b}; expected 1 or {batch}")
    if n_h not in heads_ok:
        raise ValueError(f"{name} has {n_h} heads; expected one of {sorted(set(heads_ok))}")
    if n_q != q_len and not (broadcast and n_q == 1):
        raise ValueError(f"{name} has {n_q} query rows but query has length {q_len}")
    if k_len is not None and n_k != k_len and not (broadcast and n_k == 1):
        raise ValueError(f"{name} has {n_k} key columns but key has length {k_len}")


def check_bias(bias, query, batch, q_len, k_len, heads_ok):
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"attn_bias must be a torch.Tensor, got {type(bias).__name__}")
    if bias.dtype != query.dtype:
        raise TypeError(f"attn_bias must have the query's dtype {query.dtype}, got {bias.dtype}")
    if bias.device != query.device:
        raise ValueError(f"attn_bias is on {bias.device} but query is on {query.device}")
    if bias.dim() != 4 or bias.shape[0] not in (1, batch) or bias.shape[1] not in heads_ok \
            or bias.shape[2] not in (1, q_len) or bias.shape[3] != k_len:
        raise ValueError(f"attn_bias must have shape (B|1, Hq|Hkv|1, Lq|1, Lk) = ({batch}|1, "
                         f"{'|'.join(map(str, sorted(set(heads_ok), reverse=True)))}, "
                         f"{q_len}|1, {k_len}), got {tuple(bias.shape)}")


def check_layout(layout, is_causal, batch, q_len, k_len, heads_ok, device):
    if not isinstance(layout, SparseLayout):
        raise TypeError(f"layout must be a SparseLayout, got {type(layout).__name__}")
    if (layout.q_len, layout.k_len) != (q_len, k_len):
        raise ValueError(f"layout is for q_len={layout.q_len}, k_len={layout.k_len} but the "
                         f"inputs have q_len={q_len}, k_len={k_len}")
    if layout.batch not in (1, batch):
        raise ValueError(f"layout has batch {layout.batch}; expected 1 or {batch}")
    if layout.heads not in heads_ok:
        raise ValueError(f"layout has {layout.heads} heads; expected one of "
                         f"{sorted(set(heads_ok))}")
    if is_causal is not None and is_causal != layout.is_causal:
        raise ValueError(f"is_causal={is_causal} contradicts the layout, built with "
                         f"is_causal={layout.is_causal}")
    if layout.device != device:
        raise ValueError(f"layout is on {layout.device} but query is on {device}; "
                         "move it once with layout.to(device)")
