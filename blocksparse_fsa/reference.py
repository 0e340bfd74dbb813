"""Pure-PyTorch attention over a layout: the CPU path without Triton, and the test reference.

``sparse_attention`` works on the layout's active (query, key) pairs only (memory O(nnz) per
head, never O(Lq * Lk)) and is differentiable through autograd. ``dense_attention`` is the
plain masked softmax that tests compare everything against, in the inputs' precision.
"""

import math

import torch

from .layout.core import SparseLayout, tile_rows


def layout_pairs(layout: SparseLayout):
    """Active pairs of a layout as ``(group, query, key)`` int64 tensors, group = b * heads + h.

    Memory O(nnz) plus one bool per mask byte (as many bytes as the layout's masks hold):
    full tiles are enumerated arithmetically and partial tiles expand only their nonzero mask
    bytes to bits, never a ``[tiles, block_m, block_n]`` array.
    """
    bm, bn, n_qt = layout.block_m, layout.block_n, layout.num_q_tiles
    dev = layout.device
    rows = tile_rows(layout.full_ptr, layout.num_full_tiles)  # [Tf]
    ii = torch.arange(bm, device=dev)[None, :, None]
    jj = torch.arange(bn, device=dev)[None, None, :]
    shape = (rows.numel(), bm, bn)
    full = ((rows // n_qt)[:, None, None].expand(shape),
            ((rows % n_qt) * bm)[:, None, None] + ii.expand(shape),
            (layout.full_col.long() * bn)[:, None, None] + jj.expand(shape))
    # a partial tile's mask as bytes: byte c // 8 of a row holds key column c's bit c % 8
    # (int32 words in little-endian order)
    n_bytes = layout.masks.shape[-1] * 4
    mask_bytes = layout.masks.contiguous().reshape(-1).view(torch.uint8).view(-1, bm, n_bytes)
    t, i, byte = (mask_bytes != 0).nonzero(as_tuple=True)  # one entry per nonzero byte
    shifts = torch.arange(8, dtype=torch.uint8, device=dev)
    bits = (mask_bytes[t, i, byte][:, None] >> shifts) & 1  # [nonzero bytes, 8]
    e, bit = bits.nonzero(as_tuple=True)
    prow = tile_rows(layout.part_ptr, layout.num_partial_tiles)[t[e]]
    part = (prow // n_qt, (prow % n_qt) * bm + i[e],
            layout.part_col[t[e]].long() * bn + byte[e] * 8 + bit)
    return tuple(torch.cat([f.reshape(-1), p]) for f, p in zip(full, part))


def sparse_attention(q, k, v, layout: SparseLayout, softmax_scale: float, softcap: float = 0.0,
                     bias=None):
    """Attention over ``layout`` computed pair by pair. Returns ``(out, lse)`` like the kernels.

    Scores, sums and every gradient (the bias' too) accumulate in float32 (float64 for
    float64 inputs) and are cast back once; rows without keys, or whose every key has a
    ``-inf`` score, give 0 and lse -inf. Memory O(nnz) without autograd (the rows are gathered
    in chunks of ``PAIR_CHUNK`` pairs); autograd keeps the gathered rows, O(nnz * D).
    """
    batch, q_len, num_q_heads, head_dim = q.shape
    group_size = num_q_heads // k.shape[2]
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    if batch * num_q_heads * q_len == 0:
        return (q.new_zeros(q.shape), q.new_full((batch, num_q_heads, q_len), float("-inf"),
                                                 dtype=torch.float32))
    group, qi, kj = layout_pairs(layout.to(q.device))
    # upcast once: gradients then accumulate over pairs in ct, and are cast back once
    qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
    bc = None if bias is None else bias.to(ct)
    outs, lses = [], []
    for b in range(batch):
        for hq in range(num_q_heads):
            g = (b if layout.batch > 1 else 0) * layout.heads + hq // (num_q_heads // layout.heads)
            sel = group == g
            i, j, hk = qi[sel], kj[sel], hq // group_size
            chunks = _chunks(i.numel())
            s = torch.cat([(qc[b, i[c], hq] * kc[b, j[c], hk]).sum(-1) for c in chunks])
            s = apply_softcap(s * softmax_scale, softcap)
            if bc is not None:
                hb = hq // (num_q_heads // bc.shape[1])
                rows = i if bc.shape[2] > 1 else torch.zeros_like(i)
                s = s + bc[b if bc.shape[0] > 1 else 0, hb, rows, j]
            m = torch.full((q_len,), float("-inf"), dtype=ct, device=q.device)
            m = m.scatter_reduce(0, i, s.detach(), "amax")  # only for stability: no gradient
            # a row whose every score is -inf is empty: shift it by 0 so that exp gives 0
            m = torch.where(m == float("-inf"), 0.0, m)
            p = torch.exp(s - m[i])
            denom = torch.zeros(q_len, dtype=ct, device=q.device).index_add(0, i, p)
            o = torch.zeros(q_len, head_dim, dtype=ct, device=q.device)
            for c in chunks:
                o = o.index_add(0, i[c], p[c, None] * vc[b, j[c], hk])
            has_key = denom > 0
            denom = torch.where(has_key, denom, 1.0)
            outs.append((o / denom[:, None]).to(q.dtype))
            lses.append(torch.where(has_key, m + torch.log(denom), float("-inf")).float())
    out = torch.stack(outs).view(batch, num_q_heads, q_len, -1).transpose(1, 2)
    lse = torch.stack(lses).view(batch, num_q_heads, q_len)
    return out, lse


# pairs per gather of query / key / value rows: without autograd the forward's temporaries
# stay at PAIR_CHUNK * D floats however many pairs a head has
PAIR_CHUNK = 1 << 16


def _chunks(n):
    """Slices of ``range(n)`` of at most ``PAIR_CHUNK`` (one slice while torch.compile traces:
    the pair count is data-dependent there)."""
    if torch.compiler.is_compiling() or n <= PAIR_CHUNK:
        return [slice(None)]
    return [slice(start, start + PAIR_CHUNK) for start in range(0, n, PAIR_CHUNK)]


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
