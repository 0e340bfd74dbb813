"""The benchmark's sparse patterns (see :mod:`blocksparse_fsa_bench.cli`), each in the forms the
systems consume: key indices or a layout for ours, a FlexAttention ``mask_mod``, a dense mask.

The built-in patterns are causal and built on the benchmark's device as ``(1, Hkv, L, W)``
int32 ``attn_indices`` (-1 = unused slot); :data:`PATTERN_BUILDERS` maps their CLI names to
builders ``f(seq_len, num_kv_heads, device) -> Pattern``. :func:`load_pattern` adds the user's
own, ``--pattern module:function`` or ``--pattern path/to/file.py:function`` (see
:func:`user_pattern` for the function's contract).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from blocksparse_fsa import SparseLayout, build_layout

PATTERNS = ("sliding_window", "bigbird", "nsa_blocks", "dilated", "dilated_reordered",
            "topk_random")

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Pattern:
    """One sparse pattern at one length, in the forms the systems consume.

    ``indices``: ``(B|1, Hkv|1, L, W)`` integer key indices, -1 = unused slot; entries above the
    diagonal (bigbird's own block) are removed by ``is_causal=True``. ``None`` when the
    pattern comes as a ready ``layout`` (a user pattern), which is then exact as it stands.
    ``flex_mask``: builds the FlexAttention ``mask_mod(b, kv_head, q_idx, kv_idx)`` (causal
    included); a factory because topk_random's needs a large table, built only for flex.
    ``None``: flex gets the BlockMask of :meth:`exact_layout`.
    ``per_head``: whether the pattern differs between KV heads (else flex broadcasts one head).
    """

    name: str
    seq_len: int
    indices: torch.Tensor | None
    flex_mask: Callable[[], MaskMod] | None
    per_head: bool
    description: str
    reorder: object = None  # ``build_layout(..., reorder=)`` for ours (token permutation)
    layout: SparseLayout | None = None  # given instead of indices (ours uses it as it is)
    _nnz: int | None = field(default=None, repr=False)

    @property
    def batch(self) -> int:
        """1, or the batch size of a pattern that differs between batch entries."""
        return self.layout.batch if self.indices is None else self.indices.shape[0]

    @property
    def num_kv_heads(self) -> int:
        """Heads of the pattern: the KV heads, or 1 for a pattern stored once for all."""
        return self.layout.heads if self.indices is None else self.indices.shape[1]

    @property
    def groups(self) -> int:
        """(batch, head) pairs the pattern stores; ``nnz() / groups`` is nnz per pair."""
        return self.batch * self.num_kv_heads

    def nnz(self) -> int:
        """Distinct causal (query, key) pairs summed over the pattern's (batch, head) pairs
        (counted once, cached)."""
        if self._nnz is None:
            self._nnz = (self.layout.nnz if self.indices is None
                         else count_nnz(self.indices, self.seq_len, causal=True))
        return self._nnz

    def dense_mask(self) -> torch.Tensor:
        """The exact pattern as ``(B|1, Hkv, L, L)`` bool (True = attend), causal applied;
        one head ``(B|1, 1, L, L)`` when every head has the same pattern."""
        if self.indices is None:
            return self.layout.to_dense_mask()
        idx = self.indices if self.per_head else self.indices[:, :1]
        return dense_mask_from_indices(idx, self.seq_len, causal=True)

    def exact_layout(self, block: int) -> SparseLayout:
        """A layout of exactly this pattern with ``block`` x ``block`` tiles, without token
        permutation (for a BlockMask of the pattern at flex's block size)."""
        if self.indices is None:  # the layout's pairs are final: no causal cut
            return build_layout(self.layout.to_indices(), self.seq_len, block_m=block,
                                block_n=block, kernel="tiles")
        return build_layout(self.indices, self.seq_len, is_causal=True, block_m=block,
                            block_n=block, kernel="tiles")


def _rows(seq_len: int, device) -> torch.Tensor:
    return torch.arange(seq_len, device=device, dtype=torch.int32)[:, None]  # [L, 1]


def _per_head(idx: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[L, W] or [Hkv, L, W] -> contiguous (1, Hkv, L, W) int32."""
    idx = idx.to(torch.int32)
    if idx.dim() == 2:
        idx = idx.expand(num_kv_heads, *idx.shape)
    return idx.unsqueeze(0).contiguous()


def sliding_window(seq_len: int, num_kv_heads: int, device, window: int = 1024) -> Pattern:
    """Causal sliding window: query i sees keys max(0, i - window + 1) .. i."""
    window = min(window, seq_len)
    keys = _rows(seq_len, device) - (window - 1) + torch.arange(window, device=device)  # [L, W]
    idx = torch.where(keys >= 0, keys, -1)

    def flex_mask():
        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window)
        return mask_mod

    return Pattern("sliding_window", seq_len, _per_head(idx, num_kv_heads), flex_mask, False,
                   f"causal, window {window}")


def dilated(seq_len: int, num_kv_heads: int, device, num_keys: int = 512,
            stride: int = 4) -> Pattern:
    """Causal dilated window: keys i, i - stride, ..., i - stride * (num_keys - 1), those >= 0."""
    keys = _rows(seq_len, device) - stride * torch.arange(num_keys, device=device)  # [L, W]
    idx = torch.where(keys >= 0, keys, -1)
    span = stride * num_keys

    def flex_mask():
        def mask_mod(b, h, q_idx, kv_idx):
            diff = q_idx - kv_idx
            return (diff >= 0) & (diff < span) & (diff % stride == 0)
        return mask_mod

    return Pattern("dilated", seq_len, _per_head(idx, num_kv_heads), flex_mask, False,
                   f"causal, {num_keys} keys at stride {stride}")


def dilated_reordered(seq_len: int, num_kv_heads: int, device, num_keys: int = 512,
                      stride: int = 4) -> Pattern:
    """``dilated``, with our layout's tokens grouped by position mod stride (flex unchanged)."""
    pattern = dilated(seq_len, num_kv_heads, device, num_keys, stride)
    pattern.name, pattern.reorder = "dilated_reordered", ("dilation", stride)
    pattern.description += f"; ours reordered by position mod {stride}"
    return pattern


def bigbird_blocks(seq_len: int, num_kv_heads: int, device, block: int = 64, num_local: int = 3,
                   num_global: int = 2, num_random: int = 3, seed: int = 0) -> torch.Tensor:
    """Key blocks of each (KV head, query block): ``[Hkv, nb, num_local + num_global +
    num_random]`` int64, -1 = none.

    Slots, in order: local blocks qb - num_local + 1 .. qb, global blocks 0 .. num_global - 1,
    then ``min(num_random, qb)`` distinct blocks drawn uniformly from [0, qb) per (KV head,
    query block), seeded. Random blocks may repeat a local or global block (duplicates are
    allowed by the API and count once).
    """
    nb = -(-seq_len // block)
    qb = torch.arange(nb, device=device)
    local = qb[:, None] - torch.arange(num_local - 1, -1, -1, device=device)  # [nb, num_local]
    glob = torch.arange(num_global, device=device).expand(nb, num_global)
    gen = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(num_kv_heads, nb, nb, generator=gen, device=device)
    scores.masked_fill_(qb[None, None, :] >= qb[None, :, None], 2.0)  # only blocks < qb
    r = min(num_random, nb)
    val, rnd = scores.topk(r, dim=-1, largest=False)  # r distinct random blocks, [Hkv, nb, r]
    rnd = torch.where(val < 1.5, rnd, -1)
    pad = torch.full((num_kv_heads, nb, num_random - r), -1, device=device, dtype=rnd.dtype)
    blocks = torch.cat([local.expand(num_kv_heads, nb, num_local),
                        glob.expand(num_kv_heads, nb, num_global), rnd, pad], dim=-1)
    return torch.where((blocks >= 0) & (blocks < nb), blocks, -1)


def bigbird(seq_len: int, num_kv_heads: int, device, block: int = 64, num_local: int = 3,
            num_global: int = 2, num_random: int = 3, seed: int = 0) -> Pattern:
    """BigBird-style block pattern (see :func:`bigbird_blocks`), causal at token level.

    Query i's indices are all tokens of the blocks of query block ``i // block``
    (``8 * 64 = 512`` slots by default, -1 for missing blocks and tokens >= L).
    """
    blocks = bigbird_blocks(seq_len, num_kv_heads, device, block, num_local, num_global,
                            num_random, seed)  # [Hkv, nb, S]
    return Pattern("bigbird", seq_len, _block_indices(blocks, seq_len, block),
                   _block_table_mask(blocks, block), True,
                   f"{block}-token blocks: {num_local} local, {num_global} global, "
                   f"{num_random} random; causal")


def nsa_block_table(seq_len: int, num_kv_heads: int, device, block: int = 64,
                    num_selected: int = 16, num_initial: int = 1, num_local: int = 2,
                    seed: int = 0) -> torch.Tensor:
    """Key blocks selected by each (KV head, query block): ``[Hkv, nb, num_selected]`` int64,
    ascending, -1 = none (padding last).

    Query block ``qb`` chooses among its causal key blocks ``0 .. qb``: always the initial
    blocks ``0 .. num_initial - 1`` and the local blocks ``qb - num_local + 1 .. qb`` (the
    diagonal included), then distinct blocks drawn uniformly from the rest until it has
    ``num_selected``, seeded, independently per KV head. A query block with at most
    ``num_selected`` causal blocks takes all of them.
    """
    if num_initial + num_local > num_selected:
        raise ValueError(f"num_initial + num_local ({num_initial} + {num_local}) must not exceed "
                         f"num_selected ({num_selected})")
    nb = -(-seq_len // block)
    qb = torch.arange(nb, device=device)[:, None]  # [nb, 1]
    kb = torch.arange(nb, device=device)[None, :]  # [1, nb]
    gen = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(num_kv_heads, nb, nb, generator=gen, device=device)  # [Hkv, nb, nb]
    forced = (kb < num_initial) | ((kb <= qb) & (kb > qb - num_local))
    scores = torch.where(forced, -1.0, scores)  # drawn first
    scores = torch.where(kb > qb, 2.0, scores)  # never: not causal
    val, sel = scores.topk(min(num_selected, nb), dim=-1, largest=False)
    sel = torch.where(val < 1.5, sel, nb).sort(dim=-1).values  # ascending, the misses last
    sel = torch.nn.functional.pad(sel, (0, num_selected - sel.shape[-1]), value=nb)
    return torch.where(sel < nb, sel, -1)


def nsa_blocks(seq_len: int, num_kv_heads: int, device, block: int = 64, num_selected: int = 16,
               num_initial: int = 1, num_local: int = 2, seed: int = 0) -> Pattern:
    """NSA-style block selection (the selection branch of Native Sparse Attention, Yuan et
    al. 2025, at block granularity): each 64-query block and KV head attends 16 key blocks of
    64 tokens, see :func:`nsa_block_table`, causal at token level (so inside the diagonal block).

    The fixed blocks follow NSA's setup, whose 16 selected blocks of 64 include 1 initial and 2
    local blocks; the other 13 stand in for the learned top-k by a uniform draw among the
    causal blocks. Query i's indices are all tokens of its block's selection: ``16 * 64 = 1024``
    slots, as many keys as the sliding window, but scattered over the prefix.
    """
    blocks = nsa_block_table(seq_len, num_kv_heads, device, block, num_selected, num_initial,
                             num_local, seed)  # [Hkv, nb, num_selected]
    return Pattern("nsa_blocks", seq_len, _block_indices(blocks, seq_len, block),
                   _block_table_mask(blocks, block), True,
                   f"{num_selected} of the causal {block}-token key blocks per {block}-query "
                   f"block: {num_initial} initial, {num_local} local, the rest random; causal")


def _block_indices(blocks: torch.Tensor, seq_len: int, block: int) -> torch.Tensor:
    """``[Hkv, nb, S]`` key blocks of each query block (-1 = none) -> ``(1, Hkv, L, S * block)``
    int32 indices: query i gets every token of its block's key blocks (-1 past L)."""
    device = blocks.device
    tokens = blocks[..., None] * block + torch.arange(block, device=device)  # [Hkv, nb, S, block]
    tokens = torch.where((blocks[..., None] >= 0) & (tokens < seq_len), tokens, -1)
    tokens = tokens.flatten(-2).to(torch.int32)  # [Hkv, nb, S * block]
    return tokens[:, torch.arange(seq_len, device=device) // block][None].contiguous()


def _block_table_mask(blocks: torch.Tensor, block: int) -> Callable[[], MaskMod]:
    """Flex ``mask_mod`` factory of a block pattern: a ``[Hkv, nb, nb]`` bool table of the
    ``[Hkv, nb, S]`` key blocks, read at ``(h, q // block, kv // block)``, and causality."""
    def flex_mask():
        heads, nb, _ = blocks.shape
        # an extra column swallows the -1 slots
        table = torch.zeros(heads, nb, nb + 1, dtype=torch.bool, device=blocks.device)
        table.scatter_(2, torch.where(blocks >= 0, blocks, nb), True)
        table = table[..., :nb].contiguous()

        def mask_mod(b, h, q_idx, kv_idx):
            return table[h, q_idx // block, kv_idx // block] & (q_idx >= kv_idx)
        return mask_mod
    return flex_mask


def topk_random(seq_len: int, num_kv_heads: int, device, k: int = 1024, seed: int = 0) -> Pattern:
    """Each query i attends ``k`` keys drawn from its causal prefix [0, i], per KV head.

    Rows with ``i + 1 <= k`` take all of [0, i] (the other slots are -1). Longer rows draw ``k``
    uniform integers ``floor(u * (i + 1))`` *with replacement*, so they hold duplicates and
    fewer than ``k`` distinct keys (about ``(i + 1) (1 - exp(-k / (i + 1)))``); this keeps the
    builder O(L k) in memory. FLOPs use the distinct count (``layout.nnz``), so duplicates do
    not inflate them.
    """
    rows = _rows(seq_len, device)  # [L, 1]
    gen = torch.Generator(device=device).manual_seed(seed)
    u = torch.rand(num_kv_heads, seq_len, k, generator=gen, device=device)
    drawn = (u * (rows + 1).float()).to(torch.int32)  # floor, u in [0, 1)
    drawn = torch.minimum(drawn, rows)  # guard against rounding up to i + 1
    all_keys = torch.arange(k, device=device, dtype=torch.int32).expand(seq_len, k)
    all_keys = torch.where(all_keys <= rows, all_keys, -1)
    indices = _per_head(torch.where(rows + 1 <= k, all_keys, drawn), num_kv_heads)

    def flex_mask():
        # A bit-packed [Hkv, L, L / 8] uint8 table (1 GiB at L = 32768, Hkv = 8). A plain
        # [Hkv, L, L] bool table has more than 2**31 elements at that size, past what flex's
        # generated indexing handles (seen: an illegal memory access on the H200).
        packed = packed_mask_from_indices(indices, seq_len, causal=True)

        def mask_mod(b, h, q_idx, kv_idx):
            byte = packed[h, q_idx, kv_idx // 8].to(torch.int32)
            return ((byte >> (kv_idx % 8)) & 1) == 1
        return mask_mod

    return Pattern("topk_random", seq_len, indices, flex_mask, True,
                   f"{k} random keys of [0, i] (with replacement)")


PATTERN_BUILDERS: dict[str, Callable[..., Pattern]] = {
    "sliding_window": sliding_window,
    "bigbird": bigbird,
    "nsa_blocks": nsa_blocks,
    "dilated": dilated,
    "dilated_reordered": dilated_reordered,
    "topk_random": topk_random,
}


def dense_mask_from_indices(indices: torch.Tensor, k_len: int, causal: bool) -> torch.Tensor:
    """``(B, H, Lq, W)`` indices -> ``(B, H, Lq, k_len)`` bool, built by scatter (no loop over
    queries). With ``causal``, keys above the bottom-right diagonal are dropped."""
    batch, heads, q_len, _ = indices.shape
    rows = torch.arange(q_len, device=indices.device)[:, None]  # [Lq, 1]
    flat = torch.zeros(batch * heads * q_len * k_len + 1, dtype=torch.bool,
                       device=indices.device)
    for g in range(batch * heads):  # one (batch, head) at a time bounds the int64 temporaries
        idx = indices[g // heads, g % heads].long()  # [Lq, W]
        valid = (idx >= 0) & (idx < k_len)
        if causal:
            valid &= idx <= rows + (k_len - q_len)
        lin = (g * q_len + rows) * k_len + idx
        flat[torch.where(valid, lin, flat.numel() - 1)] = True  # the last cell swallows -1s
    return flat[:-1].view(batch, heads, q_len, k_len)


def packed_mask_from_indices(indices: torch.Tensor, k_len: int, causal: bool) -> torch.Tensor:
    """Like ``dense_mask_from_indices`` for ``(1, H, Lq, W)`` indices, but 8 keys a byte:
    ``[H, Lq, ceil(k_len / 8)]`` uint8, bit ``j % 8`` of byte ``j // 8`` = key ``j``. Built one
    head at a time."""
    _, heads, q_len, _ = indices.shape
    n_bytes = -(-k_len // 8)
    weights = (1 << torch.arange(8, device=indices.device)).to(torch.uint8)
    packed = torch.empty(heads, q_len, n_bytes, dtype=torch.uint8, device=indices.device)
    for h in range(heads):
        dense = dense_mask_from_indices(indices[:1, h:h + 1], k_len, causal)[0, 0]  # [Lq, Lk]
        dense = torch.nn.functional.pad(dense, (0, n_bytes * 8 - k_len))
        packed[h] = (dense.view(q_len, n_bytes, 8).to(torch.uint8) * weights).sum(
            -1, dtype=torch.uint8)
        del dense
    return packed


def count_nnz(indices: torch.Tensor, k_len: int, causal: bool) -> int:
    """Distinct valid (query, key) pairs of ``(B, H, Lq, W)`` indices, summed over (batch,
    head)."""
    batch, heads, q_len, _ = indices.shape
    rows = torch.arange(q_len, device=indices.device)[:, None]
    total = 0
    for g in range(batch * heads):
        idx = indices[g // heads, g % heads].long()
        valid = (idx >= 0) & (idx < k_len)
        if causal:
            valid &= idx <= rows + (k_len - q_len)
        keys = torch.where(valid, idx, k_len).sort(dim=-1).values  # invalid sort last
        first = torch.ones_like(keys[:, :1], dtype=torch.bool)
        new = torch.cat([first, keys[:, 1:] != keys[:, :-1]], dim=-1)
        total += int((new & (keys < k_len)).sum())
    return total


# ---- user patterns ----------------------------------------------------------------------------
PatternBuilder = Callable[[int, int, torch.device], Pattern]


def load_pattern(spec: str) -> tuple[str, PatternBuilder]:
    """A ``--pattern`` argument -> (the name its rows carry, its builder).

    ``spec`` is a built-in name (:data:`PATTERNS`), ``module:function`` (imported as ``import
    module``; ``python -m`` puts the current directory on the path) or
    ``path/to/file.py:function``. The function is loaded here, so a typo fails before the
    sweep; :func:`user_pattern` calls it once per sequence length.
    """
    if spec in PATTERN_BUILDERS:
        return spec, PATTERN_BUILDERS[spec]
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ValueError(f"unknown pattern {spec!r}: give one of {', '.join(PATTERNS)}, or "
                         "module:function, or path/to/file.py:function")
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    module = _import_file(Path(target)) if is_file else importlib.import_module(target)
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise AttributeError(f"{target} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise TypeError(f"{spec} is a {type(fn).__name__}, not a function")
    name = f"{Path(target).stem if is_file else target}:{attr}"
    return name, functools.partial(user_pattern, fn, name)


def _import_file(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    name = f"_bench_pattern_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses, pickling and dynamo look modules up by name
    spec.loader.exec_module(module)
    return module


def user_pattern(fn: Callable, name: str, seq_len: int, num_kv_heads: int, device) -> Pattern:
    """Call a user's ``fn(seq_len, heads_kv, device)`` and check what it returns:

    - ``attn_indices``: an integer tensor ``(B|1, Hkv|1, L, W)``, entries in ``[-1, L)``, as for
      ``sparse_attn_func``; like every built-in pattern it is made causal (``is_causal=True``:
      keys j > i are dropped). Ours times ``build_layout`` on it.
    - a :class:`SparseLayout` with ``q_len == k_len == L``, taken as it stands (its own
      causality, tiles and token permutation; ours uses it, no build is timed).
    - either of those and a ``mask_mod``, as a pair: flex then uses ``mask_mod(b, h, q_idx,
      kv_idx)``, where ``h`` is the *KV* head (the harness maps query heads onto it) and
      causality must be included. Without one, flex gets the pattern's exact BlockMask
      (``SparseLayout.to_flex_block_mask`` of a layout at flex's block size).

    B must be 1 or ``--batch``; one head means every KV head shares the pattern. Tensors on
    another device are moved to ``device``.
    """
    out = fn(seq_len, num_kv_heads, device)
    mask_mod = None
    if isinstance(out, tuple):
        if len(out) != 2 or not callable(out[1]):
            raise TypeError(f"{name} returned a tuple of {len(out)}: expected (attn_indices or "
                            "SparseLayout, mask_mod)")
        out, mask_mod = out
    indices = layout = None
    if isinstance(out, SparseLayout):
        layout = out.to(device)
        if (layout.q_len, layout.k_len) != (seq_len, seq_len):
            raise ValueError(f"{name} returned a layout for q_len={layout.q_len}, "
                             f"k_len={layout.k_len}; expected {seq_len} for both")
        heads = layout.heads
        what = (f"SparseLayout, {layout.block_m}x{layout.block_n} tiles"
                + (", reordered" if layout.is_reordered else ""))
    elif isinstance(out, torch.Tensor):
        if out.dtype == torch.bool or out.is_floating_point() or out.is_complex():
            raise TypeError(f"{name} returned {out.dtype} indices; expected an integer dtype")
        if out.dim() != 4 or out.shape[2] != seq_len:
            raise ValueError(f"{name} returned indices of shape {tuple(out.shape)}; expected "
                             f"(B|1, Hkv|1, {seq_len}, W)")
        indices = out.to(device)
        heads = out.shape[1]
        what = f"attn_indices {tuple(out.shape)}, causal"
    else:
        raise TypeError(f"{name} returned a {type(out).__name__}: expected attn_indices, a "
                        "SparseLayout, or either with a mask_mod as a pair")
    if heads not in (1, num_kv_heads):
        raise ValueError(f"{name} returned a pattern of {heads} heads; expected 1 or "
                         f"{num_kv_heads} (--heads-kv)")
    flex = None if mask_mod is None else (lambda: mask_mod)
    what += "; flex: " + ("its mask_mod" if mask_mod else "the pattern's BlockMask")
    return Pattern(name, seq_len, indices, flex, heads > 1, f"user pattern ({what})",
                   layout=layout)
