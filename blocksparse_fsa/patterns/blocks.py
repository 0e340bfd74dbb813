"""Block patterns: :func:`block_sparse`, :func:`bigbird` and :func:`fixed`."""

from __future__ import annotations

import itertools

import torch

from ..layout.build import check_int, layout_from_predicate
from ..layout.core import SparseLayout, check_blocks
from ..preprocess.predicate import tile_bounds
from .checks import block_map_arg, int_pair


def block_sparse(block_map: torch.Tensor, block_size: int | tuple[int, int],
                 q_len: int | None = None, k_len: int | None = None, *, is_causal: bool = False,
                 block_m: int | None = None, block_n: int | None = None,
                 device="cpu") -> SparseLayout:
    """Token pattern of a block-level pattern: ``(i, j)`` is active iff
    ``block_map[b, h, i // bq, j // bk]`` (then ANDed with ``is_causal``).

    ``block_map``: bool (or 0/1 integer) ``[nbq, nbk]``, ``[heads, nbq, nbk]`` or ``[batch,
    heads, nbq, nbk]``; the layout gets its batch and heads. ``block_size``: ``b`` or ``(bq,
    bk)``, any positive size (it need not match the layout's tile). ``q_len`` / ``k_len``
    default to ``nbq * bq`` / ``nbk * bk`` and may cut the last block short: ``nbq`` must equal
    ``ceil(q_len / bq)``. Blocks use absolute token indices (no bottom-right shift).
    """
    bmap = block_map_arg(block_map)
    bq, bk = int_pair("block_size", block_size)
    n_bq, n_bk = bmap.shape[-2:]
    q_len = n_bq * bq if q_len is None else check_int("q_len", q_len, 1)
    k_len = n_bk * bk if k_len is None else check_int("k_len", k_len, 1)
    for name, length, size, count in (("q_len", q_len, bq, n_bq), ("k_len", k_len, bk, n_bk)):
        if -(-length // size) != count:
            raise ValueError(f"{name}={length} needs {-(-length // size)} blocks of {size}, but "
                             f"block_map has {count}")
    block_m, block_n = check_blocks(block_m, block_n)
    device = torch.device(device)
    bmap = bmap.to(device)
    n_b, n_h = bmap.shape[:2]
    r0, r1 = tile_bounds(q_len, block_m, device)
    c0, c1 = tile_bounds(k_len, block_n, device)
    rb0, rb1, cb0, cb1 = r0 // bq, r1 // bq + 1, c0 // bk, c1 // bk + 1  # block ranges [lo, hi)
    area = (rb1 - rb0)[:, None] * (cb1 - cb0)[None, :]
    may = torch.empty(n_b, n_h, r0.numel(), c0.numel(), dtype=torch.bool, device=device)
    full = torch.empty_like(may)
    for b, h in itertools.product(range(n_b), range(n_h)):  # one prefix-sum table at a time
        table = torch.zeros(n_bq + 1, n_bk + 1, dtype=torch.int32, device=device)
        table[1:, 1:] = bmap[b, h].to(torch.int32).cumsum(0).cumsum(1)

        def rect(rows, cols, table=table):
            return table[rows][:, cols]

        count = rect(rb1, cb1) - rect(rb0, cb1) - rect(rb1, cb0) + rect(rb0, cb0)
        may[b, h] = count > 0
        full[b, h] = count == area

    def predicate(b, h, q, k):
        return bmap[b, h, q // bq, k // bk]

    return layout_from_predicate(q_len, k_len, predicate, may, batch=n_b, heads=n_h,
                                 is_causal=is_causal, block_m=block_m, block_n=block_n,
                                 device=device, full_tiles=full)


def bigbird(q_len: int, *, block_size: int = 64, num_local: int = 3, num_global: int = 2,
            num_random: int = 3, heads: int = 1, seed: int = 0, is_causal: bool = False,
            block_m: int | None = None, block_n: int | None = None,
            device="cpu") -> SparseLayout:
    """BigBird (ITC) block pattern over ``nb = ceil(q_len / block_size)`` blocks, ``Lq = Lk``.

    Query block ``r`` attends key block ``c`` iff any of:

    - local: ``r - (num_local - 1) // 2 <= c <= r + num_local // 2`` (the ``num_local`` blocks
      centred on ``r``, clipped at the ends); with ``is_causal``, ``r - num_local < c <= r``;
    - global: ``c < num_global`` or ``r < num_global`` (both directions);
    - random: per (head, query block), ``min(num_random, available)`` distinct blocks drawn
      uniformly from the blocks not already local or global (with ``is_causal``, only ``c <=
      r``), using ``torch.Generator().manual_seed(seed)`` on the CPU (the same on every device):
      for each head in turn, ``torch.rand(nb, nb)`` scores, the smallest allowed ones win.

    ``is_causal`` then ANDs token-level causality (global rows see only the past). The layout
    has ``heads`` heads (1 = one pattern for every head).
    """
    q_len = check_int("q_len", q_len, 1)
    block_size = check_int("block_size", block_size, 1)
    num_local, num_global = check_int("num_local", num_local), check_int("num_global",
                                                                          num_global)
    num_random, heads = check_int("num_random", num_random), check_int("heads", heads, 1)
    seed = check_int("seed", seed)
    n = -(-q_len // block_size)
    r = torch.arange(n)[:, None]
    c = torch.arange(n)[None, :]
    if is_causal:
        local = (c <= r) & (c > r - num_local)
    else:
        local = (c >= r - (num_local - 1) // 2) & (c <= r + num_local // 2)
    chosen = local | (c < num_global) | (r < num_global)  # [nb, nb]
    allowed = ~chosen & (c <= r) if is_causal else ~chosen
    gen = torch.Generator().manual_seed(seed)
    draws = min(num_random, n)
    blocks = torch.empty(heads, n, n, dtype=torch.bool)
    for h in range(heads):
        scores = torch.rand(n, n, generator=gen).masked_fill_(~allowed, 2.0)
        drawn = torch.zeros(n, n, dtype=torch.bool)
        if draws:
            value, pick = scores.topk(draws, dim=1, largest=False)  # distinct blocks per row
            drawn.scatter_(1, pick, value < 1.5)  # value 2.0: not allowed, fewer remained
        blocks[h] = chosen | drawn
    return block_sparse(blocks, block_size, q_len, q_len, is_causal=is_causal, block_m=block_m,
                        block_n=block_n, device=device)


def fixed(q_len: int, *, block_size: int, num_local_blocks: int, num_global_blocks: int = 1,
          is_causal: bool = False, horizontal_global: bool = False,
          num_different_global_patterns: int = 1, heads: int = 1, block_m: int | None = None,
          block_n: int | None = None, device="cpu") -> SparseLayout:
    """DeepSpeed's ``FixedSparsityConfig`` ("fixed" pattern of Sparse Transformers), ``Lq = Lk``.

    Over ``nb = ceil(q_len / block_size)`` blocks, windows of ``L = num_local_blocks`` blocks
    (``[0, L)``, ``[L, 2L)``, ...; the last may be short), ``G = num_global_blocks`` (``L % G ==
    0``), and for head ``h`` the offset ``f = L - (1 + h % num_different_global_patterns) * G``:

    - local: block ``(r, c)`` with ``r // L == c // L`` (and ``c <= r`` when causal);
    - global columns: for each full window starting at ``s``, blocks ``s + f .. s + f + G - 1``
      are seen by every query block (causal: by rows ``>= s + f``); if the last window is short
      (``nb % L != 0``, ``e = nb - nb % L``), the global group is ``start = min(e + f, nb - G)``
      .. ``start + G - 1`` (seen by every row, or rows ``>= start`` when causal);
    - ``horizontal_global`` (bidirectional only): global blocks' rows also see every block.

    This is DeepSpeed's ``set_local_layout`` / ``set_global_layout`` with ``attention =
    "unidirectional" if is_causal else "bidirectional"``; ``is_causal`` also ANDs token-level
    causality (DeepSpeed leaves that to the attention mask). Unlike DeepSpeed, ``q_len`` need
    not be a multiple of ``block_size`` (the last block is cut short). The layout has ``heads``
    heads; head ``h`` uses global pattern ``h % num_different_global_patterns``.
    """
    q_len = check_int("q_len", q_len, 1)
    block_size = check_int("block_size", block_size, 1)
    local = check_int("num_local_blocks", num_local_blocks, 1)
    glob = check_int("num_global_blocks", num_global_blocks, 1)
    patterns = check_int("num_different_global_patterns", num_different_global_patterns, 1)
    heads = check_int("heads", heads, 1)
    if local % glob:
        raise ValueError(f"num_local_blocks={local} must be a multiple of "
                         f"num_global_blocks={glob}")
    if patterns > local // glob:
        raise ValueError(f"num_different_global_patterns={patterns} must be <= "
                         f"num_local_blocks // num_global_blocks = {local // glob}")
    if horizontal_global and is_causal:
        raise ValueError("horizontal_global=True needs is_causal=False (bidirectional)")
    n = -(-q_len // block_size)
    if n < glob:
        raise ValueError(f"num_global_blocks={glob} is more than the {n} blocks of q_len")
    r = torch.arange(n)[:, None]
    c = torch.arange(n)[None, :]
    local_map = (r // local) == (c // local)
    if is_causal:
        local_map &= c <= r
    end = n - n % local
    blocks = torch.empty(heads, n, n, dtype=torch.bool)
    for h in range(heads):
        first = local - (1 + h % patterns) * glob
        starts = list(range(first, end, local))
        if end < n:
            starts.append(min(end + first, n - glob))
        first_row = torch.full((n,), n)  # per key block: the first row that sees it (n: none)
        global_row = torch.zeros(n, dtype=torch.bool)
        for s in starts:  # the last group may overlap the one before: keep the lower row
            first_row[s:s + glob] = torch.clamp(first_row[s:s + glob], max=s if is_causal else 0)
            global_row[s:s + glob] = horizontal_global
        blocks[h] = local_map | (r >= first_row[None, :]) | global_row[:, None]
    return block_sparse(blocks, block_size, q_len, q_len, is_causal=is_causal, block_m=block_m,
                        block_n=block_n, device=device)
