"""Context parallelism: sparse attention with the sequence sharded across ranks.

Each rank holds a shard of q, k and v (``(B, L / world, H, D)``, in rank order or PyTorch's
head-tail order) and the pattern in global positions. From the pattern's tile layout it works
out which key tiles its query tiles touch, fetches only those from their owners with one
``all_to_all_single`` (a halo for windows, the touched tiles for block patterns; an all-gather
when most tiles are touched), and runs the ordinary kernels (or the pure-PyTorch path) on the
rank's queries against the fetched buffer, through the layout restricted to them
(:func:`restrict_layout`). The backward sends the gradients of fetched keys back to their owners,
which sum them in rank order, so gradients are deterministic.

Why one local call on a restricted layout rather than partial ``(out, lse)`` per source merged
by lse: the kernels and the single-device path stay exactly as they are, the forward visits
every query row's tiles in the same order as the single-device call, and nothing is rounded
twice (a merge would round each partial output to the input dtype first). The price is that
the attention waits for the halo; a window's halo is a few tiles per rank.
"""

from __future__ import annotations

import dataclasses
import math
import os
import weakref

import torch
import torch.distributed as dist

from .layout import SparseLayout, build_layout, popcount32, tile_rows
from .layout.core import layout_from_tiles
from .ops import sparse_attn_op
from .reference import sparse_attention

SHARD_ORDERS = ("contiguous", "head_tail")
_BACKENDS = ("auto", "triton", "torch")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# all-gather K/V instead when some rank would fetch more than this fraction of the other ranks'
# key tiles: an all-gather then moves about as much and NCCL runs it as a ring
GATHER_THRESHOLD = 0.5


@dataclasses.dataclass
class CommStats:
    """Bytes this rank sent to other ranks, summed over the calls that were given this object.

    ``sent_fwd``: K/V tiles sent in forwards; ``sent_bwd``: dK/dV tiles sent back in backwards;
    ``all_gather``: what an all-gather of K/V would have sent from this rank over the same
    forwards (the backward's reduce-scatter of dK/dV sends as much again); ``gathered``: calls
    that fell back to the all-gather.
    """

    calls: int = 0
    gathered: int = 0
    sent_fwd: int = 0
    sent_bwd: int = 0
    all_gather: int = 0

    @property
    def fraction(self) -> float:
        """Forward bytes sent / an all-gather's (1.0 when nothing was sent by either)."""
        return self.sent_fwd / self.all_gather if self.all_gather else 1.0


def shard_positions(seq_len: int, world_size: int, rank: int, shard_order: str = "contiguous",
                    device="cpu") -> torch.Tensor:
    """Global positions (int64) of the tokens a rank holds, in its local order.

    ``"contiguous"``: rank ``r`` holds ``[r * L / W, (r + 1) * L / W)``. ``"head_tail"``: the
    sequence is cut into ``2W`` chunks and rank ``r`` holds chunks ``r`` and ``2W - 1 - r``
    (PyTorch's load-balanced order for causal masks).
    """
    chunk, chunks = _chunking(seq_len, world_size, shard_order)
    starts = [c * chunk for c in chunks[rank]]
    return torch.cat([torch.arange(s, s + chunk, device=device) for s in starts])


def shard(x: torch.Tensor, world_size: int, rank: int, shard_order: str = "contiguous",
          dim: int = 1) -> torch.Tensor:
    """The part of a whole-sequence tensor that ``rank`` holds (along ``dim``), see
    :func:`shard_positions`."""
    pos = shard_positions(x.shape[dim], world_size, rank, shard_order, x.device)
    return x.index_select(dim, pos)


def touched_key_tiles(layout: SparseLayout, q_tiles: torch.Tensor) -> torch.Tensor:
    """Bool ``[num_k_tiles]``: the key tiles that any of the query tiles ``q_tiles`` visits, in
    any of the layout's batches and heads."""
    q_tiles = q_tiles.to(layout.device, torch.int64)
    rows = _rows(layout, q_tiles)
    touched = torch.zeros(layout.num_k_tiles, dtype=torch.bool, device=layout.device)
    for ptr, col in ((layout.full_ptr, layout.full_col), (layout.part_ptr, layout.part_col)):
        entries, _ = _segments(ptr, rows)
        touched[col[entries].long()] = True
    return touched


def restrict_layout(layout: SparseLayout, q_tiles: torch.Tensor, k_tile_map: torch.Tensor,
                    k_len: int) -> SparseLayout:
    """The layout of the query tiles ``q_tiles`` (in that order) against a new key axis.

    ``k_tile_map`` (``[num_k_tiles]`` integers) gives each key tile's position in the new key
    axis of length ``k_len`` (whole tiles of ``block_n``), or -1 for a tile that is not there;
    every tile the selected rows visit must be mapped. Tiles keep their masks and their order
    within each row, so a kernel walks them as it walks the original rows. Query tiles must
    be whole, except the layout's last one, which may come last. No token permutation; the
    result is for the tile walker (``with_kernel("gather")`` adds the gather forward's index).
    """
    if not isinstance(layout, SparseLayout):
        raise TypeError(f"layout must be a SparseLayout, got {type(layout).__name__}")
    if layout.is_reordered:
        raise ValueError("restrict_layout takes a layout without a token permutation")
    dev, bm, bn = layout.device, layout.block_m, layout.block_n
    q_tiles = torch.as_tensor(q_tiles, device=dev).long()
    k_tile_map = torch.as_tensor(k_tile_map, device=dev).long()
    if q_tiles.dim() != 1 or k_tile_map.shape != (layout.num_k_tiles,):
        raise ValueError(f"q_tiles must be 1-D and k_tile_map of shape ({layout.num_k_tiles},), "
                         f"got {tuple(q_tiles.shape)} and {tuple(k_tile_map.shape)}")
    n_qt, n_kt = q_tiles.numel(), -(-k_len // bn)
    if n_qt and not 0 <= int(q_tiles.min()) <= int(q_tiles.max()) < layout.num_q_tiles:
        raise ValueError(f"q_tiles must lie in [0, {layout.num_q_tiles})")
    if k_tile_map.numel() and int(k_tile_map.max()) >= n_kt:
        raise ValueError(f"k_tile_map points past k_len={k_len} ({n_kt} tiles of {bn})")
    last = layout.num_q_tiles - 1
    if layout.q_len % bm and bool((q_tiles[:-1] == last).any()):
        raise ValueError("the layout's last query tile is partial: it may only come last")
    q_len = n_qt * bm - (bm - layout.q_len % bm if n_qt and layout.q_len % bm
                         and int(q_tiles[-1]) == last else 0)
    rows = _rows(layout, q_tiles)
    lists = []
    for ptr, col in ((layout.full_ptr, layout.full_col), (layout.part_ptr, layout.part_col)):
        entries, new_ptr = _segments(ptr, rows)
        new_col = k_tile_map[col[entries].long()]
        if bool((new_col < 0).any()):
            raise ValueError("k_tile_map leaves out a key tile that the selected query tiles "
                             "visit")
        lists.append((entries, new_ptr, new_col))
    (_, full_ptr, full_col), (part_entries, part_ptr, part_col) = lists
    masks = layout.masks[part_entries]
    full_rows = tile_rows(full_ptr) % max(n_qt, 1)
    row_len = (q_len - full_rows * bm).clamp(max=bm)
    col_len = (k_len - full_col * bn).clamp(max=bn)
    nnz = int((row_len * col_len).sum()) + int(popcount32(masks).sum())
    return layout_from_tiles(q_len, k_len, bm, bn, layout.batch, layout.heads, layout.is_causal,
                             full_ptr, full_col, part_ptr, part_col, masks, nnz)


def context_parallel_attn(q, k, v, *, attn_indices=None, layout=None, is_causal=False,
                          softmax_scale=None, return_lse=False, group=None,
                          shard_order="contiguous", softcap=0.0, backend="auto", block_m=None,
                          block_n=None, gather_threshold=GATHER_THRESHOLD, stats=None):
    """Sparse attention over a sequence sharded across the ranks of ``group``.

    Args:
        q: ``(B, L / world, Hq, D)``, this rank's queries; k, v: ``(B, L / world, Hkv, D)``,
            its keys and values; the same positions (see :func:`shard_positions`).
        attn_indices: per-query key indices in global positions, either the whole
            ``(B|1, Hkv|1, L, W)`` (every rank passes the same) or this rank's rows
            ``(B|1, Hkv|1, L / world, W)`` in its local order.
        layout: a :class:`SparseLayout` of the whole sequence (``L x L``), or of this rank's
            rows against every key (``L / world x L``, rows in local order). With neither
            pattern, dense attention.
        is_causal: key ``j`` only for queries at global position ``>= j``; with ``layout=``
            it must agree with the layout (it is in its tiles).
        shard_order: ``"contiguous"`` or ``"head_tail"`` (see :func:`shard_positions`).
        block_m, block_n: the tiles of a layout built from ``attn_indices`` (default: 64, or
            the largest of 32, 16 that divides the shard's chunks).
        gather_threshold: all-gather K/V when some rank would otherwise fetch more than this
            fraction of the other ranks' key tiles.
        stats: a :class:`CommStats` to which this call's bytes are added.
        softmax_scale, return_lse, softcap, backend: as in ``sparse_attn_func``.

    Returns what the single-device call returns for this rank's query rows: ``out``
    ``(B, L / world, Hq, D)`` and, if asked, ``lse`` ``(B, Hq, L / world)``; the gradients of
    q, k and v are those of this rank's shard. Collective: every rank of ``group`` must call it
    with the same pattern arguments. A layout of the whole sequence needs ``block_n`` (and
    ``block_m``) to divide the shard's chunks; build it once and reuse it (the plan of which
    tiles go where is cached per layout object).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context_parallel_attn needs torch.distributed initialised "
                           "(dist.init_process_group)")
    _check_shards(q, k, v)
    if shard_order not in SHARD_ORDERS:
        raise ValueError(f"shard_order must be one of {SHARD_ORDERS}, got {shard_order!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if attn_indices is not None and layout is not None:
        raise ValueError("pass at most one of attn_indices, layout")
    if not isinstance(gather_threshold, (int, float)) or not 0 <= gather_threshold <= 1:
        raise ValueError(f"gather_threshold must be in [0, 1], got {gather_threshold!r}")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or \
            not 0 <= softcap < math.inf:
        raise ValueError(f"softcap must be a finite float >= 0 (0 = off), got {softcap!r}")
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(
            softmax_scale, (int, float)) or not math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a finite float, got {softmax_scale!r}")
    if stats is not None and not isinstance(stats, CommStats):
        raise TypeError(f"stats must be a CommStats, got {type(stats).__name__}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    shard_len = q.shape[1]
    seq_len = shard_len * world
    chunk, _ = _chunking(seq_len, world, shard_order)
    if layout is not None:
        if isinstance(layout, SparseLayout) and (
                layout.batch not in (1, q.shape[0])
                or layout.heads not in (1, k.shape[2], q.shape[2])):
            raise ValueError(f"layout has batch {layout.batch} and {layout.heads} heads; "
                             f"expected batch 1 or {q.shape[0]} and heads 1, {k.shape[2]} or "
                             f"{q.shape[2]}")
        layout, q_tiles = _rows_of_layout(layout, is_causal, seq_len, shard_len, world, rank,
                                          shard_order, q.device)
        plan = _cached_plan(layout, q_tiles, (world, rank, shard_order, gather_threshold),
                            group)
    else:
        fit = next((b for b in (64, 32, 16) if chunk % b == 0), 16)
        block_m, block_n = block_m or fit, block_n or fit
        if attn_indices is None:
            layout = _dense_layout(seq_len, bool(is_causal), block_m, block_n, str(q.device))
            layout, q_tiles = _rows_of_layout(layout, None, seq_len, shard_len, world, rank,
                                              shard_order, q.device)
        else:
            layout = _local_indices_layout(attn_indices, bool(is_causal), seq_len, shard_len,
                                           world, rank, shard_order, block_m, block_n, q, k)
            q_tiles = torch.arange(layout.num_q_tiles, device=layout.device)
        plan = _plan(layout, q_tiles, world, rank, shard_order, gather_threshold, group)
    k_buf, v_buf = _FetchKV.apply(k, v, plan, group, stats)
    if backend == "torch" or (backend == "auto" and not _triton_available(q)):
        out, lse = sparse_attention(q, k_buf, v_buf, plan.layout, softmax_scale, softcap)
    else:
        out, lse = sparse_attn_op(q, k_buf, v_buf, plan.layout, softmax_scale, softcap)
    return (out, lse) if return_lse else out


# ---- the plan: who sends which key tiles to whom ------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Plan:
    layout: SparseLayout  # this rank's queries x [own keys | fetched tiles]
    send_tiles: torch.Tensor  # own key tiles (local tile numbers) to send, by destination
    sent_tiles: torch.Tensor  # the distinct own key tiles that some rank fetches, ascending
    send_pos: torch.Tensor  # where each entry of send_tiles is in sent_tiles
    send_counts: list  # tiles per destination rank
    recv_counts: list  # tiles per source rank
    gather: bool  # all-gather K/V instead of the all-to-all


def _plan(layout, q_tiles, world, rank, shard_order, gather_threshold, group) -> _Plan:
    """Exchange what each rank's query tiles touch (one all-gather of a bit per key tile),
    then derive the same send/receive lists on every rank."""
    seq_len, bn = layout.k_len, layout.block_n
    chunk, chunks = _chunking(seq_len, world, shard_order)
    if chunk % bn:
        raise ValueError(f"block_n={bn} must divide the shard's chunks of {chunk} tokens "
                         f"(shard_order={shard_order!r})")
    dev = layout.device
    need = touched_key_tiles(layout, q_tiles).to(torch.uint8)
    comm_dev = _comm_device(group, dev)
    needs = torch.empty(world * need.numel(), dtype=torch.uint8, device=comm_dev)
    _all_gather(needs, need.to(comm_dev), group)
    needs = needs.view(world, -1).to(dev).bool()
    tiles_per_chunk = chunk // bn
    n_kt = layout.num_k_tiles
    tile_chunk = torch.arange(n_kt, device=dev) // tiles_per_chunk
    owner = torch.empty(len(chunks) * len(chunks[0]), dtype=torch.int64, device=dev)
    slot = torch.empty_like(owner)
    for r, owned in enumerate(chunks):
        for s, c in enumerate(owned):
            owner[c], slot[c] = r, s
    tile_owner = owner[tile_chunk]
    local_tile = slot[tile_chunk] * tiles_per_chunk + torch.arange(n_kt, device=dev) % \
        tiles_per_chunk
    owned = tile_owner[None, :] == torch.arange(world, device=dev)[:, None]  # [world, n_kt]
    remote = needs & ~owned
    per_rank = n_kt // world
    gather = world > 1 and int(remote.sum(1).max()) > gather_threshold * (n_kt - per_rank)
    if gather:
        remote = ~owned
    # tiles listed by global key tile, which is each owner's local order too
    send = [torch.nonzero(remote[dst] & owned[rank]).flatten() for dst in range(world)]
    recv = [torch.nonzero(remote[rank] & owned[src]).flatten() for src in range(world)]
    k_map = torch.full((n_kt,), -1, dtype=torch.int64, device=dev)
    k_map[owned[rank]] = local_tile[owned[rank]]
    fetched = torch.cat(recv)
    k_map[fetched] = per_rank + torch.arange(fetched.numel(), device=dev)
    sub = restrict_layout(layout, q_tiles, k_map, (per_rank + fetched.numel()) * bn)
    if layout.kernel == "gather":
        sub = sub.with_kernel("gather")
    send_tiles = local_tile[torch.cat(send)]
    sent_tiles, send_pos = torch.unique(send_tiles, sorted=True, return_inverse=True)
    return _Plan(layout=sub, send_tiles=send_tiles, sent_tiles=sent_tiles, send_pos=send_pos,
                 send_counts=[t.numel() for t in send], recv_counts=[t.numel() for t in recv],
                 gather=gather)


# plans of explicit layouts, per layout object (layouts are immutable), with a weak reference
# that proves the id still belongs to that layout
_PLAN_CACHE: dict = {}
_PLAN_CACHE_SIZE = 8


def _cached_plan(layout, q_tiles, key, group):
    full_key = (id(layout), id(group), *key)
    hit = _PLAN_CACHE.get(full_key)
    if hit is not None and hit[0]() is layout:
        return hit[1]
    plan = _plan(layout, q_tiles, *key, group)
    _PLAN_CACHE[full_key] = (weakref.ref(layout), plan)
    while len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
        _PLAN_CACHE.pop(next(iter(_PLAN_CACHE)))
    return plan


def clear_plan_cache() -> None:
    """Forget the communication plans of the layouts passed to :func:`context_parallel_attn`."""
    _PLAN_CACHE.clear()


# ---- the exchange ---------------------------------------------------------------------------
class _FetchKV(torch.autograd.Function):
    """``(k, v)`` of this shard -> ``(k_buf, v_buf)`` = own keys followed by the fetched tiles;
    the backward sends the fetched tiles' gradients back and adds what comes in to the own
    keys' gradients, in float32 and rank order, rounding once. Only the own shard is copied
    whole (into the buffer); the rest moves tile by tile."""

    @staticmethod
    def forward(ctx, k, v, plan, group, stats):
        ctx.plan, ctx.group, ctx.stats = plan, group, stats
        batch, shard_len, heads, dim = k.shape
        bn, world = plan.layout.block_n, len(plan.recv_counts)
        k_buf = k.new_empty(batch, plan.layout.k_len, heads, dim)
        v_buf = torch.empty_like(k_buf)
        k_buf[:, :shard_len], v_buf[:, :shard_len] = k, v
        shard_bytes = 2 * k.numel() * k.element_size()
        ctx.tile_bytes = shard_bytes // (shard_len // bn)
        if plan.gather:
            gathered = k.new_empty(world * 2 * k.numel())
            _all_gather(gathered, torch.stack([k, v]).flatten(), group)
            others = [s for s in range(world) if s != dist.get_rank(group)]
            fetched = gathered.view(world, 2, *k.shape)[others].movedim(0, 2)
            sent = (world - 1) * shard_bytes
        else:
            send = torch.stack([_tiles(t, bn).index_select(1, plan.send_tiles) for t in (k, v)])
            send = send.movedim(2, 0).contiguous()  # [tiles, 2, B, bn, H, D]
            recv = send.new_empty((sum(plan.recv_counts), *send.shape[1:]))
            work = dist.all_to_all_single(recv, send, plan.recv_counts, plan.send_counts,
                                          group=group, async_op=True)
            work.wait()
            fetched = recv.movedim(0, 2)  # [2, B, tiles, bn, H, D]
            sent = send.shape[0] * ctx.tile_bytes
        k_buf[:, shard_len:] = fetched[0].flatten(1, 2)
        v_buf[:, shard_len:] = fetched[1].flatten(1, 2)
        if stats is not None:
            stats.calls += 1
            stats.gathered += int(plan.gather)
            stats.sent_fwd += sent
            stats.all_gather += (world - 1) * shard_bytes
        ctx.shard_len = shard_len
        return k_buf, v_buf

    @staticmethod
    def backward(ctx, dk_buf, dv_buf):
        plan, group, shard_len = ctx.plan, ctx.group, ctx.shard_len
        bn = plan.layout.block_n
        back_out = torch.stack([_tiles(g[:, shard_len:], bn) for g in (dk_buf, dv_buf)])
        back_out = back_out.movedim(2, 0).contiguous()  # [fetched tiles, 2, B, bn, H, D]
        back_in = back_out.new_empty((sum(plan.send_counts), *back_out.shape[1:]))
        work = dist.all_to_all_single(back_in, back_out, plan.send_counts, plan.recv_counts,
                                      group=group, async_op=True)
        # the own queries' part is the gradient where no other rank fetched the tile
        dk, dv = (g[:, :shard_len] if g.is_contiguous() else g[:, :shard_len].clone()
                  for g in (dk_buf, dv_buf))
        work.wait()
        if ctx.stats is not None:
            ctx.stats.sent_bwd += back_out.shape[0] * ctx.tile_bytes
        if plan.sent_tiles.numel():
            acc = torch.stack([_tiles(g, bn)[:, plan.sent_tiles] for g in (dk, dv)]).float()
            start = 0
            for count in plan.send_counts:  # rank order
                pos = plan.send_pos[start:start + count]
                acc[:, :, pos] += back_in[start:start + count].movedim(0, 2).float()
                start += count
            for g, total in zip((dk, dv), acc.to(dk.dtype)):
                _tiles(g, bn)[:, plan.sent_tiles] = total
        return dk, dv, None, None, None


def _tiles(x, block_n):
    """``[B, n * block_n, H, D]`` -> a ``[B, n, block_n, H, D]`` view."""
    return x.unflatten(1, (-1, block_n))


# ---- patterns -> this rank's rows ------------------------------------------------------------
def _rows_of_layout(layout, is_causal, seq_len, shard_len, world, rank, shard_order, device):
    """``(layout, q_tiles)``: the layout and which of its query tiles are this rank's rows."""
    if not isinstance(layout, SparseLayout):
        raise TypeError(f"layout must be a SparseLayout, got {type(layout).__name__}")
    if layout.is_reordered:
        raise ValueError("context_parallel_attn takes layouts without a token permutation")
    if is_causal is not None and is_causal is not False and not layout.is_causal:
        raise ValueError(f"is_causal={is_causal} contradicts the layout, built with "
                         "is_causal=False")
    if layout.device != device:
        raise ValueError(f"layout is on {layout.device} but q is on {device}; move it once "
                         "with layout.to(device)")
    if layout.k_len != seq_len or layout.q_len not in (seq_len, shard_len):
        raise ValueError(f"layout is for q_len={layout.q_len}, k_len={layout.k_len}; expected "
                         f"the whole sequence ({seq_len} x {seq_len}) or this rank's rows "
                         f"({shard_len} x {seq_len})")
    if layout.q_len == shard_len and world > 1:
        return layout, torch.arange(layout.num_q_tiles, device=device)
    chunk, _ = _chunking(seq_len, world, shard_order)
    if chunk % layout.block_m:
        raise ValueError(f"the layout's block_m={layout.block_m} must divide the shard's "
                         f"chunks of {chunk} tokens (shard_order={shard_order!r})")
    pos = shard_positions(seq_len, world, rank, shard_order, device)
    return layout, pos[::layout.block_m] // layout.block_m


def _local_indices_layout(attn_indices, is_causal, seq_len, shard_len, world, rank,
                          shard_order, block_m, block_n, q, k):
    """The layout of this rank's rows of ``attn_indices`` against every key (global keys)."""
    if not isinstance(attn_indices, torch.Tensor) or attn_indices.dim() != 4:
        raise ValueError("attn_indices must be a 4-D tensor (batch, kv_heads, rows, W), got "
                         f"{getattr(attn_indices, 'shape', type(attn_indices).__name__)}")
    n_b, n_h, rows, _ = attn_indices.shape
    if n_b not in (1, q.shape[0]) or n_h not in (1, k.shape[2], q.shape[2]):
        raise ValueError(f"attn_indices has batch {n_b} and {n_h} heads; expected batch 1 or "
                         f"{q.shape[0]} and heads 1, {k.shape[2]} or {q.shape[2]}")
    pos = shard_positions(seq_len, world, rank, shard_order, attn_indices.device)
    if rows == seq_len:
        attn_indices = attn_indices[:, :, pos]
    elif rows != shard_len:
        raise ValueError(f"attn_indices has {rows} rows; expected the whole sequence "
                         f"({seq_len}) or this rank's rows ({shard_len})")
    if is_causal:  # global causality: the local rows do not sit at the end of the keys
        attn_indices = torch.where(attn_indices <= pos[:, None], attn_indices, -1)
    layout = build_layout(attn_indices, seq_len, block_m=block_m, block_n=block_n)
    return layout.to(q.device)


_DENSE: dict = {}


def _dense_layout(seq_len, is_causal, block_m, block_n, device):
    key = (seq_len, is_causal, block_m, block_n, device)
    if key not in _DENSE:
        _DENSE.clear()  # one at a time: a dense layout of a long sequence is large
        _DENSE[key] = SparseLayout.dense(seq_len, seq_len, is_causal=is_causal,
                                         block_m=block_m, block_n=block_n, device=device)
    return _DENSE[key]


# ---- helpers ----------------------------------------------------------------------------------
def _chunking(seq_len, world, shard_order):
    """``(chunk, chunks)``: the chunk length and the chunks each rank holds, in its order."""
    if shard_order not in SHARD_ORDERS:
        raise ValueError(f"shard_order must be one of {SHARD_ORDERS}, got {shard_order!r}")
    parts = world if shard_order == "contiguous" else 2 * world
    if seq_len % parts:
        raise ValueError(f"the sequence ({seq_len} tokens) must split into {parts} equal "
                         f"chunks for shard_order={shard_order!r}")
    if shard_order == "contiguous":
        return seq_len // parts, [[r] for r in range(world)]
    return seq_len // parts, [[r, 2 * world - 1 - r] for r in range(world)]


def _rows(layout, q_tiles):
    """CSR rows of the query tiles ``q_tiles`` in every (batch, head) group, group-major."""
    groups = torch.arange(layout.batch * layout.heads, device=q_tiles.device)
    return (groups[:, None] * layout.num_q_tiles + q_tiles[None, :]).flatten()


def _segments(ptr, rows):
    """``(entries, new_ptr)``: the list entries of ``rows`` one row after another, and the
    row pointers of that new list."""
    ptr = ptr.long()
    starts, counts = ptr[rows], ptr[rows + 1] - ptr[rows]
    new_ptr = torch.zeros(rows.numel() + 1, dtype=torch.int64, device=ptr.device)
    torch.cumsum(counts, 0, out=new_ptr[1:])
    total = int(new_ptr[-1])
    offsets = torch.arange(total, device=ptr.device) - torch.repeat_interleave(
        new_ptr[:-1], counts, output_size=total)
    return torch.repeat_interleave(starts, counts, output_size=total) + offsets, new_ptr


def _all_gather(out, inp, group):
    """Every rank's 1-D ``inp`` into ``out`` (world * len), in rank order."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp, group=group)


def _comm_device(group, device):
    """Where this group's collectives take tensors: CUDA for NCCL, else the CPU."""
    backend = dist.get_backend(group)
    return device if "nccl" in str(backend) else torch.device("cpu")


def _triton_available(t):
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _check_shards(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, shard_len, heads, head_dim), got "
                             f"{tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if not q.dtype == k.dtype == v.dtype or not q.device == k.device == v.device:
        raise ValueError("q, k and v must share a dtype and a device")
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k and v must be (B, shard_len, Hkv, D) like q {tuple(q.shape)}, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of k/v heads "
                         f"({k.shape[2]})")
