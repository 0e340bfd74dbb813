"""``sparse_attn_with_kvcache``: decode and chunked prefill against a KV cache, with a window +
sinks or per-query index lists, on contiguous or paged caches (FlashAttention's
``flash_attn_with_kvcache`` conventions)."""

from __future__ import annotations

import torch

from ..kernels import config
from ..kernels.decode import decode_fwd
from .attention import sparse_attn_func
from .checks import FLOAT_DTYPES, MAX_HEAD_DIM, check_backend, check_scalars, flash_causal
from .window import check_window


def sparse_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens,
                             block_table=None, attn_indices=None, window_size=(-1, -1), sinks=0,
                             is_causal=None, softmax_scale=None, softcap=0.0, return_lse=False,
                             backend="auto", check=None, causal=None, return_softmax_lse=None,
                             num_splits=0, rotary_cos=None, rotary_sin=None,
                             rotary_interleaved=True, cache_batch_idx=None, cache_leftpad=None,
                             alibi_slopes=None):
    """Attention of new queries against a KV cache, appending the new keys first.

    Args:
        q: ``(B, Lq_new, Hq, D)`` float16, bfloat16 or float32, ``D <= 256``; ``Lq_new`` from 1
            (decode) to a few thousand (chunked prefill).
        k_cache, v_cache: ``(B, L_max, Hkv, D)``, or with ``block_table`` paged
            ``(num_blocks, block_size, Hkv, D)``; same dtype and device as q, ``Hq % Hkv == 0``.
        k, v: optional new keys/values ``(B, L_new, Hkv, D)``, written in place into the caches
            at positions ``cache_seqlens[b] ..`` before attending (the caller then advances
            ``cache_seqlens`` by ``L_new``, as with FlashAttention).
        cache_seqlens: ``(B,)`` int32 (or an int): each row's cache length before the append.
            Row ``b`` attends to keys ``[0, cache_seqlens[b] + L_new)``; anything stored beyond
            is never read.
        block_table: ``(B, max_blocks)`` int32: page ``block_table[b, j // block_size]`` holds
            row ``b``'s position ``j``.
        attn_indices: ``(B|1, Hkv|1, Lq_new, W)`` integer cache positions per query (a top-k
            selector's output); -1 = unused, duplicates count once, any order.
        window_size: ``(left, right)``, FlashAttention's sliding window (-1 = unbounded): query
            at position ``p`` sees keys ``p - left .. p + right``. Not with ``attn_indices``.
        sinks: the first ``sinks`` positions are visible to every query (attention sinks).
        is_causal: bottom-right aligned: the query ``i`` sits at position
            ``cache_seqlens[b] + L_new - Lq_new + i`` and sees no later key. ``None``
            (default) is True: unlike FlashAttention's ``causal=False`` default (a decode step
            of one query sees the whole row either way; a chunk of new queries should not see
            its own future).
        softmax_scale: defaults to ``1 / sqrt(D)``; softcap: ``softcap * tanh(s / softcap)``.
        return_lse: also return ``lse`` ``(B, Hq, Lq_new)`` float32 (natural log).
        backend: ``"auto"`` (the split-KV Triton kernel on CUDA or under ``TRITON_INTERPRET=1``,
            else PyTorch), ``"triton"`` or ``"torch"``.
        check: validate the data (cache overflow, pages, index ranges), which reads values back
            to the host; ``None`` (default) does so except while a CUDA graph is being captured.
        causal, return_softmax_lse, num_splits, rotary_cos, rotary_sin, rotary_interleaved,
            cache_batch_idx, cache_leftpad, alibi_slopes: FlashAttention's
            ``flash_attn_with_kvcache`` keywords, so that its calls run unchanged: ``causal``
            is ``is_causal``, ``return_softmax_lse`` is ``return_lse``; ``num_splits`` > 0
            fixes the split-KV kernel's key splits (0: from shapes); the rotary embedding,
            ``cache_batch_idx``, ``cache_leftpad`` and ``alibi_slopes`` are not supported and
            must stay ``None`` (apply rotary embeddings to q and k before the call).

    Rows without any visible key give 0 and lse = -inf. Inference only: there is no backward.
    A chunk of at least ``kernels.config.PREFILL_TILES_MIN_QUERIES`` new queries per row with
    a window, sinks or no pattern, on a contiguous cache whose rows share one length the
    host knows (an int ``cache_seqlens``, or the data check's read-back), runs the tile walker
    (:func:`sparse_attn_func` on the cache's first keys); everything else the split kernel.
    Returns ``out`` ``(B, Lq_new, Hq, D)`` (and ``lse``).

    CUDA graphs: the Triton path allocates by shape only and never reads values back, so a
    decode step captures (advance ``cache_seqlens`` in place between replays). The data checks
    cannot run inside a capture: ``check=None`` skips them there (``check=True`` fails with
    torch's capture error). Unchecked, index entries below 0 or at/after a row's length are
    ignored by the kernel, but an append past the cache's capacity or a ``block_table`` entry
    outside the page pool writes or reads out of bounds: check the first step eagerly, or size
    the cache for the longest generation. The PyTorch path reads lengths on the host and does
    not capture.
    """
    is_causal, return_lse, num_splits = _flash_attention_keywords(
        is_causal, causal, return_lse, return_softmax_lse, num_splits, rotary_interleaved,
        rotary_cos=rotary_cos, rotary_sin=rotary_sin, cache_batch_idx=cache_batch_idx,
        cache_leftpad=cache_leftpad, alibi_slopes=alibi_slopes)
    batch, q_len, num_q_heads, head_dim = _check_tensors(q, k_cache, v_cache, k, v, block_table)
    num_kv_heads = k_cache.shape[2]
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    num_new = 0 if k is None else k.shape[1]
    # every row's length after the append, where the host knows it without reading it back
    host_len = cache_seqlens + num_new if type(cache_seqlens) is int else None
    cache_seqlens = _seqlens(cache_seqlens, batch, q.device)
    window = check_window(window_size, sinks)
    if attn_indices is not None:
        if window is not None or sinks:
            raise ValueError("pass either attn_indices or window_size/sinks, not both: got "
                             f"attn_indices with window_size={window_size}, sinks={sinks}")
        _check_indices(attn_indices, batch, num_kv_heads, q_len, q.device)
    left, right, sinks = window or (-1, -1, 0)
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be True or False, got {is_causal!r}")
    softmax_scale, softcap = check_scalars(head_dim, is_causal, softmax_scale, softcap,
                                           return_lse, backend)
    if check not in (None, True, False):
        raise TypeError(f"check must be None, True or False, got {check!r}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (q, k_cache, v_cache, k, v)):
        raise ValueError("sparse_attn_with_kvcache is inference-only (no backward): call it "
                         "under torch.no_grad() or torch.inference_mode(), or train with "
                         "sparse_attn_func")
    if check or (check is None and not _capturing(q)):
        lengths = _check_data(cache_seqlens, num_new, capacity, block_table, k_cache.shape[0],
                              attn_indices)
        if lengths is not None and lengths[0] == lengths[1]:
            host_len = lengths[0]

    path = check_backend(backend, q)
    if k is not None and k.numel():
        _append(k_cache, v_cache, k, v, cache_seqlens, block_table)
    if q.numel() == 0:  # FlashAttention's empty result: nothing to attend with
        out = torch.empty_like(q)
        lse = torch.full((batch, num_q_heads, q_len), float("-inf"), device=q.device)
    elif path == "torch":
        out, lse = _torch_decode(q, k_cache, v_cache, cache_seqlens, block_table, attn_indices,
                                 num_new, (left, right), sinks, is_causal, softmax_scale, softcap)
    elif (attn_indices is None and block_table is None and host_len is not None
          and 0 < host_len <= capacity and q_len >= config.PREFILL_TILES_MIN_QUERIES):
        # a prefill chunk over rows of one known length: the tile walker on the analytic
        # window layout (cached per chunk and length) reads each K/V tile once per 64 queries
        out, lse = sparse_attn_func(q, k_cache[:, :host_len], v_cache[:, :host_len],
                                    is_causal=is_causal, softmax_scale=softmax_scale,
                                    softcap=softcap, window_size=(left, right), sinks=sinks,
                                    return_lse=True, backend=path)
    else:
        out, lse = decode_fwd(q, k_cache, v_cache, cache_seqlens, block_table=block_table,
                              attn_indices=attn_indices, num_new=num_new,
                              window_size=(left, right), sinks=sinks, is_causal=is_causal,
                              softmax_scale=softmax_scale, softcap=softcap,
                              num_splits=num_splits or None)
    return (out, lse) if return_lse else out


def _flash_attention_keywords(is_causal, causal, return_lse, return_softmax_lse, num_splits,
                              rotary_interleaved, **unsupported):
    """``(is_causal, return_lse, num_splits)`` from ours and FlashAttention's names."""
    is_causal = flash_causal(is_causal, causal)
    if return_softmax_lse is not None:
        if return_lse:
            raise ValueError("pass return_softmax_lse (FlashAttention's name) or return_lse, "
                             "not both")
        return_lse = return_softmax_lse
    if not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0: from shapes), got {num_splits!r}")
    if not isinstance(rotary_interleaved, bool):
        raise TypeError(f"rotary_interleaved must be a bool, got {rotary_interleaved!r}")
    for name, value in unsupported.items():
        if value is not None:
            raise ValueError(f"{name} is not supported: leave it None"
                             + (" and apply the rotary embedding to q and k before the call"
                                if name.startswith("rotary") else ""))
    return True if is_causal is None else is_causal, return_lse, num_splits


def _append(k_cache, v_cache, k, v, cache_seqlens, block_table):
    """Write ``k``/``v`` at each row's ``cache_seqlens``: index writes, no host round trip."""
    batch, num_new = k.shape[:2]
    pos = cache_seqlens.long()[:, None] + torch.arange(num_new, device=k.device)  # (B, L_new)
    if block_table is None:
        rows = torch.arange(batch, device=k.device)[:, None].expand(batch, num_new)
        k_cache[rows, pos] = k
        v_cache[rows, pos] = v
    else:
        page_size = k_cache.shape[1]
        pages = block_table.long().gather(1, pos // page_size)
        k_cache[pages, pos % page_size] = k
        v_cache[pages, pos % page_size] = v


def _torch_decode(q, k_cache, v_cache, cache_seqlens, block_table, attn_indices, num_new,
                  window, sinks, is_causal, softmax_scale, softcap):
    """The pure-PyTorch path: per batch row, the (kv head, query, key) pairs the pattern
    allows, gathering only those keys; scores and sums in float32 (float64 for float64)."""
    batch, q_len, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    out = torch.zeros(batch, q_len, num_q_heads, head_dim, dtype=q.dtype, device=dev)
    lse = torch.full((batch, num_q_heads, q_len), float("-inf"), dtype=torch.float32, device=dev)
    for b, length in enumerate((cache_seqlens.long() + num_new).tolist()):
        pos_q = length - q_len + torch.arange(q_len, device=dev)
        if attn_indices is None:
            i, j = _window_pairs(pos_q, length, window, sinks, is_causal)
            h = torch.arange(num_kv_heads, device=dev).repeat_interleave(i.numel())
            i, j = i.repeat(num_kv_heads), j.repeat(num_kv_heads)
        else:
            h, i, j = _index_pairs(attn_indices[b if attn_indices.shape[0] > 1 else 0]
                                   .expand(num_kv_heads, q_len, -1), pos_q, length, is_causal)
        if j.numel() == 0:
            continue
        keys, inverse = torch.unique(j, return_inverse=True)  # each cache row read once
        if block_table is None:
            kc, vc = k_cache[b, keys], v_cache[b, keys]
        else:
            page_size = k_cache.shape[1]
            pages = block_table[b].long()[keys // page_size]
            kc, vc = k_cache[pages, keys % page_size], v_cache[pages, keys % page_size]
        heads = h[:, None] * group + torch.arange(group, device=dev)  # (P, group)
        qs = q[b][i[:, None], heads].to(ct)  # (P, group, D)
        s = torch.einsum("pgd,pd->pg", qs, kc[inverse, h].to(ct)) * softmax_scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        seg = (h * q_len + i)[:, None].expand_as(s)  # one softmax per (kv head, query, head)
        m = torch.full((num_kv_heads * q_len, group), float("-inf"), dtype=ct, device=dev)
        m = m.scatter_reduce(0, seg, s, "amax")
        p = torch.exp(s - m.gather(0, seg))
        denom = torch.zeros_like(m).index_add(0, seg[:, 0], p)
        o = torch.zeros(num_kv_heads * q_len, group, head_dim, dtype=ct, device=dev)
        o = o.index_add(0, seg[:, 0], p[..., None] * vc[inverse, h].to(ct)[:, None])
        has_key = denom > 0
        denom = torch.where(has_key, denom, 1.0)
        o = (o / denom[..., None]).view(num_kv_heads, q_len, group, head_dim)
        out[b] = o.permute(1, 0, 2, 3).reshape(q_len, num_q_heads, head_dim).to(q.dtype)
        row_lse = torch.where(has_key, m + torch.log(denom), float("-inf"))
        lse[b] = row_lse.view(num_kv_heads, q_len, group).permute(0, 2, 1).reshape(
            num_q_heads, q_len).float()
    return out, lse


def _window_pairs(pos_q, length, window, sinks, is_causal):
    """``(query, key)`` pairs of a window + sinks, from the keys the rows' windows span."""
    left, right = window
    dev = pos_q.device
    lo = (pos_q - left).clamp(min=0) if left >= 0 else torch.zeros_like(pos_q)
    if is_causal:
        hi = pos_q.clamp(max=length - 1)
    else:
        hi = (pos_q + right).clamp(max=length - 1) if right >= 0 else torch.full_like(
            pos_q, length - 1)
    lo_all, hi_all = int(lo.min()), max(int(hi.max()), min(sinks, length) - 1)
    cand = torch.cat([torch.arange(min(sinks, lo_all, length), device=dev),
                      torch.arange(lo_all, hi_all + 1, device=dev)])
    hit = (cand >= lo[:, None]) & (cand <= hi[:, None])
    sink = cand < sinks
    if is_causal:
        sink = sink & (cand <= pos_q[:, None])
    i, c = (hit | sink).nonzero(as_tuple=True)
    return i, cand[c]


def _index_pairs(indices, pos_q, length, is_causal):
    """``(kv head, query, key)`` triples of index lists ``(Hkv, Lq, W)``: -1 and duplicates
    dropped, keys past the row's length ignored."""
    idx = torch.sort(indices.long(), dim=-1).values
    keep = (idx >= 0) & (idx < length)
    keep[..., 1:] &= idx[..., 1:] != idx[..., :-1]
    if is_causal:
        keep &= idx <= pos_q[None, :, None]
    h, i, w = keep.nonzero(as_tuple=True)
    return h, i, idx[h, i, w]


def _check_tensors(q, k_cache, v_cache, k, v, block_table):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.dtype != q.dtype or t.device != q.device:
            raise TypeError(f"{name} is {t.dtype} on {t.device} but q is {q.dtype} on {q.device}")
    batch, _, num_q_heads, head_dim = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have one shape, got {tuple(k_cache.shape)} "
                         f"and {tuple(v_cache.shape)}")
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim or not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q and k_cache must share a head_dim in [1, {MAX_HEAD_DIM}], got "
                         f"{head_dim} and {k_cache.shape[3]}")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"q's heads ({num_q_heads}) must be a multiple of the cache's "
                         f"({num_kv_heads})")
    if (k is None) != (v is None):
        raise ValueError("pass both k and v (the new tokens) or neither")
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != q.dtype or t.device != q.device:
                raise TypeError(f"{name} is {t.dtype} on {t.device} but q is {q.dtype} on "
                                f"{q.device}")
            if t.shape != (batch, t.shape[1], num_kv_heads, head_dim) or t.dim() != 4:
                raise ValueError(f"{name} must have shape (B, L_new, Hkv, D) = ({batch}, L_new, "
                                 f"{num_kv_heads}, {head_dim}), got {tuple(t.shape)}")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and "
                             f"{tuple(v.shape)}")
    if block_table is None:
        if k_cache.shape[0] != batch:
            raise ValueError(f"k_cache has batch {k_cache.shape[0]} but q has {batch} (a paged "
                             "cache needs block_table)")
    else:
        if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32:
            raise TypeError("block_table must be an int32 tensor, got "
                            f"{getattr(block_table, 'dtype', type(block_table).__name__)}")
        if block_table.dim() != 2 or block_table.shape[0] != batch:
            raise ValueError(f"block_table must have shape (B, max_blocks) with B = {batch}, "
                             f"got {tuple(block_table.shape)}")
        if block_table.device != q.device:
            raise ValueError(f"block_table is on {block_table.device} but q on {q.device}")
    return batch, q.shape[1], num_q_heads, head_dim


def _seqlens(cache_seqlens, batch, device):
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        return torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32:
        raise TypeError("cache_seqlens must be an int32 tensor (or an int), got "
                        f"{getattr(cache_seqlens, 'dtype', type(cache_seqlens).__name__)}")
    if cache_seqlens.shape != (batch,):
        raise ValueError(f"cache_seqlens must have shape ({batch},), got "
                         f"{tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != device:
        raise ValueError(f"cache_seqlens is on {cache_seqlens.device} but q on {device}")
    return cache_seqlens


def _check_indices(attn_indices, batch, num_kv_heads, q_len, device):
    if not isinstance(attn_indices, torch.Tensor) or attn_indices.dtype not in (torch.int32,
                                                                                torch.int64):
        raise TypeError("attn_indices must be an int32 or int64 tensor, got "
                        f"{getattr(attn_indices, 'dtype', type(attn_indices).__name__)}")
    if attn_indices.dim() != 4 or attn_indices.shape[0] not in (1, batch) \
            or attn_indices.shape[1] not in (1, num_kv_heads) or attn_indices.shape[2] != q_len:
        raise ValueError(f"attn_indices must have shape (B|1, Hkv|1, Lq_new, W) = ({batch}|1, "
                         f"{num_kv_heads}|1, {q_len}, W), got {tuple(attn_indices.shape)}")
    if attn_indices.device != device:
        raise ValueError(f"attn_indices is on {attn_indices.device} but q on {device}")


def _check_data(cache_seqlens, num_new, capacity, block_table, num_blocks, attn_indices):
    """The value checks, with one read back to the host. Returns the shortest and the longest
    row's length after the append (None for an empty batch)."""
    if cache_seqlens.numel() == 0:
        return None
    lengths = cache_seqlens.long() + num_new
    facts = [cache_seqlens.min(), lengths.max()]
    if block_table is not None:  # the pages each row uses
        page_size = capacity // block_table.shape[1]
        used = (torch.arange(block_table.shape[1], device=lengths.device) * page_size
                < lengths[:, None])
        bad = used & ((block_table < 0) | (block_table >= num_blocks))
        facts.append(bad.any())
    if attn_indices is not None and attn_indices.numel():
        row_len = lengths.view(-1, 1, 1, 1) if attn_indices.shape[0] > 1 else lengths.min()
        facts += [attn_indices.min(), (attn_indices >= row_len).any()]
    facts = torch.stack([f.long() for f in facts]).tolist()
    if facts[0] < 0:
        raise ValueError(f"cache_seqlens must be >= 0, got a minimum of {facts[0]}")
    if facts[1] > capacity:
        raise ValueError(f"cache overflow: a row reaches length {facts[1]} (cache_seqlens + "
                         f"{num_new} new tokens) but the cache holds {capacity} positions")
    if block_table is not None and facts[2]:
        raise ValueError(f"block_table holds a page outside [0, {num_blocks}) among the pages "
                         "that cache_seqlens uses")
    if attn_indices is not None and attn_indices.numel():
        if facts[-2] < -1:
            raise ValueError(f"attn_indices must be >= -1 (-1 = unused), got {facts[-2]}")
        if facts[-1]:
            raise ValueError("attn_indices holds a position at or beyond its row's length "
                             "(cache_seqlens + new tokens)")
    return facts[0] + num_new, facts[1]


def _capturing(t) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()

