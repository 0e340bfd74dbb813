"""Pure-PyTorch attention over a layout: the CPU path without Triton, and the test reference.

``sparse_attention`` works on the layout's active (query, key) pairs only (memory O(nnz) per
head, never O(Lq * Lk)) and is differentiable through autograd. ``dense_attention`` is the
plain masked softmax that tests compare everything against, in the inputs' precision.
"""

import math

import torch

from .layout.core import SparseLayout, tile_rows, unpack_bits


def layout_pairs(layout: SparseLayout):
    """Active pairs of a layout as ``(group, query, key)`` int64 tensors, group = b * heads + h."""
    bm, bn, n_qt = layout.block_m, layout.block_n, layout.num_q_tiles
    dev = layout.device
    groups, queries, keys = [], [], []
    for ptr, col, bits in ((layout.full_ptr, layout.full_col, None),
                           (layout.part_ptr, layout.part_col, unpack_bits(layout.masks, bn))):
        rows = tile_rows(ptr)
        if bits is None:
            bits = torch.ones(rows.numel(), bm, bn, dtype=torch.bool, device=dev)
        t, i, j = bits.nonzero(as_tuple=True)
        groups.append(rows[t] // n_qt)
        queries.append((rows[t] % n_qt) * bm + i)
        keys.append(col[t].long() * bn + j)
    return torch.cat(groups), torch.cat(queries), torch.cat(keys)


def sparse_attention(q, k, v, layout: SparseLayout, softmax_scale: float, softcap: float = 0.0,
                     bias=None):
    """Attention over ``layout`` computed pair by pair. Returns ``(out, lse)`` like the kernels.

    Scores and sums are float32 (float64 for float64 inputs); rows without keys give 0, -inf.
    """
    batch, q_len, num_q_heads, _ = q.shape
    group_size = num_q_heads // k.shape[2]
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    group, qi, kj = layout_pairs(layout.to(q.device))
    # upcast once: gradients then accumulate over pairs in ct, and are cast back once
    qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
    outs, lses = [], []
    for b in range(batch):
        for hq in range(num_q_heads):
            g = (b if layout.batch > 1 else 0) * layout.heads + hq // (num_q_heads // layout.heads)
            sel = group == g
            i, j, hk = qi[sel], kj[sel], hq // group_size
            s = apply_softcap((qc[b, i, hq] * kc[b, j, hk]).sum(-1) * softmax_scale, softcap)
            if bias is not None:
                hb = hq // (num_q_heads // bias.shape[1])
                rows = i if bias.shape[2] > 1 else torch.zeros_like(i)
                s = s + bias[b if bias.shape[0] > 1 else 0, hb, rows, j].to(ct)
            m = torch.full((q_len,), float("-inf"), dtype=ct, device=q.device)
            m = m.scatter_reduce(0, i, s.detach(), "amax")  # only for stability: no gradient
            p = torch.exp(s - m[i])
            denom = torch.zeros(q_len, dtype=ct, device=q.device).index_add(0, i, p)
            o = torch.zeros(q_len, q.shape[-1], dtype=ct, device=q.device)
            o = o.index_add(0, i, p[:, None] * vc[b, j, hk])
            has_key = denom > 0
            denom = torch.where(has_key, denom, 1.0)
            outs.append((o / denom[:, None]).to(q.dtype))
            lses.append(torch.where(has_key, m + torch.log(denom), float("-inf")).float())
    out = torch.stack(outs).view(batch, num_q_heads, q_len, -1).transpose(1, 2)
    lse = torch.stack(lses).view(batch, num_q_heads, q_len)
    return out, lse


def apply_softcap(scores, softcap):
    """``softcap * tanh(scores / softcap)``, or the scores themselves for ``softcap == 0``."""
    return softcap * torch.tanh(scores / softcap) if softcap else scores


def dense_attention(q, k, v, mask, softmax_scale=None, softcap=0.0, bias=None):
    """Masked softmax attention in the inputs' dtype (upcast them for a high-precision reference).

    ``q`` (B, Lq, Hq, D), ``k``/``v`` (B, Lk, Hkv, D), ``mask`` bool broadcastable to
    (B, Hq, Lq, Lk) or None; ``softcap`` and ``bias`` as in ``sparse_attn_func``. Rows with no
    active key give 0 and lse = -inf.
    Returns ``(out, lse)``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    group = q.shape[2] // k.shape[2]
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    kh = k.repeat_interleave(group, dim=2).transpose(1, 2)
    vh = v.repeat_interleave(group, dim=2).transpose(1, 2)
    s = apply_softcap(torch.matmul(q.transpose(1, 2), kh.transpose(-1, -2)).to(ct) * scale,
                      softcap)
    if bias is not None:  # (B|1, Hq|Hkv|1, Lq|1, Lk)
        if bias.shape[1] not in (1, q.shape[2]):
            bias = bias.repeat_interleave(q.shape[2] // bias.shape[1], dim=1)
        s = s + bias.to(ct)
    if mask is None:
        mask = torch.ones(1, 1, 1, k.shape[1], dtype=torch.bool, device=q.device)
    elif mask.shape[1] not in (1, q.shape[2]):
        mask = mask.repeat_interleave(q.shape[2] // mask.shape[1], dim=1)
    empty = ~mask.any(-1, keepdim=True)  # rows with no key: 0 out, -inf lse, zero gradients
    s = s.masked_fill(~mask, float("-inf")).masked_fill(empty, 0.0)
    p = torch.softmax(s, dim=-1).masked_fill(empty, 0.0)
    lse = torch.logsumexp(s, dim=-1).masked_fill(empty[..., 0], float("-inf"))
    out = torch.matmul(p.to(v.dtype), vh).transpose(1, 2)
    return out, lse.float()
