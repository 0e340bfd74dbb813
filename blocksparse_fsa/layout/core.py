"""``SparseLayout`` and ``GatherIndex``: the data every kernel walks, at the bottom of the stack.

This module imports nothing of the package above ``preprocess`` (it packs tile lists with
``preprocess.torch``). What builds, converts, draws or permutes a layout lives in the modules
of this package built on it (``build``, ``convert``, ``gather_index``, ``reorder``, ``viz``);
the methods here that need them are one-line delegates that import them when called.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from ..preprocess.torch import transpose_keys, transpose_tiles

DEFAULT_BLOCK_M = 64
DEFAULT_BLOCK_N = 64
VALID_BLOCKS = (16, 32, 64, 128, 256)


@dataclass(frozen=True, eq=False)
class SparseLayout:
    """Which (query tile, key tile) pairs an attention pattern touches, and its exact pairs.

    A *row* is one (layout batch ``b``, layout head ``h``, query tile ``qt``), numbered
    ``(b * heads + h) * num_q_tiles + qt``; a transposed row is one (b, h, key tile). Full tiles
    (every pair active) carry no mask; partial tiles carry ``masks[p]``: ``block_m`` rows of
    ``ceil(block_n / 32)`` int32 words, bit ``c % 32`` of word ``c // 32`` = key column ``c``.
    ``batch`` is 1 (broadcast) or the batch size; ``heads`` is 1, the number of KV heads or the
    number of query heads. All index tensors are int32 and live on one device.

    An optional token permutation (``q_perm``, ``k_perm``, int64) means the tiles describe
    attention between ``q[:, q_perm]`` and ``k[:, k_perm]``: ``sparse_attn_func`` gathers the
    inputs into that order and scatters outputs and gradients back, so callers never see it.
    ``to_dense_mask``, ``to_indices`` and ``to_scipy`` give the pattern in the callers' order;
    ``plot`` and the tile statistics show the tiles as the kernels walk them.
    """

    q_len: int
    k_len: int
    block_m: int
    block_n: int
    batch: int
    heads: int
    is_causal: bool
    nnz: int  # active (query, key) pairs summed over the layout's batch and heads
    full_ptr: torch.Tensor  # [rows + 1] -> full_col
    full_col: torch.Tensor  # [Tf] key tile of each full tile
    part_ptr: torch.Tensor  # [rows + 1] -> part_col, masks
    part_col: torch.Tensor  # [Tp] key tile of each partial tile
    masks: torch.Tensor  # [Tp, block_m, n_words] int32
    full_ptr_t: torch.Tensor  # [rows_t + 1] -> full_row_t
    full_row_t: torch.Tensor  # [Tf] query tile of each full tile, by key tile
    part_ptr_t: torch.Tensor  # [rows_t + 1] -> part_row_t, part_mask_t
    part_row_t: torch.Tensor  # [Tp] query tile of each partial tile, by key tile
    part_mask_t: torch.Tensor  # [Tp] index into masks
    q_perm: torch.Tensor | None = None  # [q_len] original query of each kernel row, or None
    k_perm: torch.Tensor | None = None  # [k_len] original key of each kernel column, or None
    gather_index: GatherIndex | None = None  # set: the gather kernels run this layout
    perm_dilation: int = 0  # d > 0: q_perm / k_perm are ("dilation", d) over whole tiles;
    # the kernels compute them (``reorder.dilation_of``)

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def num_q_tiles(self) -> int:
        return -(-self.q_len // self.block_m)

    @property
    def num_k_tiles(self) -> int:
        return -(-self.k_len // self.block_n)

    @property
    def num_full_tiles(self) -> int:
        return self.full_col.numel()

    @property
    def num_partial_tiles(self) -> int:
        return self.part_col.numel()

    @property
    def num_tiles(self) -> int:
        """Visited (query tile, key tile) pairs, summed over the layout's batch and heads."""
        return self.num_full_tiles + self.num_partial_tiles

    @property
    def density(self) -> float:
        """Useful pairs / pairs in visited tiles (1.0 = no wasted work inside tiles)."""
        visited = self.num_tiles * self.block_m * self.block_n
        return self.nnz / visited if visited else 1.0

    @property
    def nbytes(self) -> int:
        own = sum(t.numel() * t.element_size() for t in self._tensors())
        return own + (self.gather_index.nbytes if self.gather_index is not None else 0)

    @property
    def kernel(self) -> str:
        """``"gather"`` (each query loads its own keys) or ``"tiles"`` (the tile walker)."""
        return "tiles" if self.gather_index is None else "gather"

    @property
    def device(self) -> torch.device:
        return self.full_ptr.device

    def _tensors(self):
        return [getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name),
                                                                           torch.Tensor)]

    def to(self, device) -> SparseLayout:
        """A copy on ``device`` (the same object if it already lives there)."""
        device = torch.device(device)
        if self.device == device:
            return self
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        if self.gather_index is not None:
            moved["gather_index"] = self.gather_index.to(device)
        return replace(self, **moved)

    def __repr__(self) -> str:
        return (f"SparseLayout(q_len={self.q_len}, k_len={self.k_len}, batch={self.batch}, "
                f"heads={self.heads}, block={self.block_m}x{self.block_n}, "
                f"tiles={self.num_tiles} ({self.num_full_tiles} full), "
                f"density={self.density:.3f}, nnz={self.nnz}, causal={self.is_causal}, "
                f"reordered={self.is_reordered}, kernel={self.kernel!r}, nbytes={self.nbytes}, "
                f"device={self.device})")

    @property
    def is_reordered(self) -> bool:
        return self.q_perm is not None

    # ---- inspection ---------------------------------------------------------------------------
    def to_dense_mask(self) -> torch.Tensor:
        """The exact pattern as a dense ``(batch, heads, q_len, k_len)`` bool tensor.

        O(Lq * Lk) memory: meant for tests and small sizes.
        """
        qt_n, kt_n, bm, bn = self.num_q_tiles, self.num_k_tiles, self.block_m, self.block_n
        groups = self.batch * self.heads
        dense = torch.zeros(groups, qt_n, bm, kt_n, bn, dtype=torch.bool, device=self.device)
        for ptr, col, bits in ((self.full_ptr, self.full_col, None),
                               (self.part_ptr, self.part_col, unpack_bits(self.masks, bn))):
            rows = tile_rows(ptr)
            g, qt, kt = rows // qt_n, rows % qt_n, col.long()
            dense[g, qt, :, kt, :] = True if bits is None else bits
        dense = dense.view(self.batch, self.heads, qt_n * bm, kt_n * bn)
        dense = dense[:, :, :self.q_len, :self.k_len]
        if self.is_reordered:  # kernel order -> the callers' order
            dense = dense[:, :, inverse(self.q_perm)][:, :, :, inverse(self.k_perm)]
        return dense

    def to_indices(self) -> torch.Tensor:
        """The exact pattern as ``(batch, heads, q_len, W)`` int64 per-query key indices.

        Keys ascending, padded with -1, ``W`` = the most keys of any query (at least 1); on the
        layout's device, no dense mask. ``build_layout(layout.to_indices(), layout.k_len,
        block_m=layout.block_m, block_n=layout.block_n)`` rebuilds the same tiles.
        """
        from .convert import layout_to_indices
        return layout_to_indices(self)

    def to_scipy(self) -> list:
        """``[batch][heads]`` nested list of bool ``scipy.sparse.csr_array`` ``(q_len, k_len)``.

        Canonical CSR (sorted, unique columns), built without a dense array.
        """
        from .convert import layout_to_scipy
        return layout_to_scipy(self)

    def to_flex_block_mask(self, num_q_heads: int | None = None):
        """A FlexAttention ``BlockMask`` (with its ``mask_mod``) of exactly this pattern; see
        :func:`blocksparse_fsa.layout.convert.layout_to_flex_block_mask`."""
        from .convert import layout_to_flex_block_mask
        return layout_to_flex_block_mask(self, num_q_heads)

    def plot(self, path=None, *, batch: int = 0, head: int = 0, ax=None):
        """Picture of one (batch, head)'s tile map: density per visited tile, full tiles apart.

        Saves a PNG to ``path`` if given; draws into ``ax`` if given. Returns the matplotlib
        ``Figure``. Needs matplotlib (``pip install 'blocksparse_fsa[plot]'``).
        """
        from .viz import plot_layout
        return plot_layout(self, path, batch=batch, head=head, ax=ax)

    # ---- construction: delegates to ``build`` and ``convert`` ---------------------------------
    @classmethod
    def from_indices(cls, attn_indices: torch.Tensor, k_len: int, *, is_causal: bool = False,
                     block_m: int | None = None, block_n: int | None = None,
                     reorder=None, method: str = "auto", kernel: str = "auto") -> SparseLayout:
        """See :func:`blocksparse_fsa.build_layout`."""
        from .build import build_layout
        return build_layout(attn_indices, k_len, is_causal=is_causal, block_m=block_m,
                            block_n=block_n, reorder=reorder, method=method, kernel=kernel)

    @classmethod
    def from_dense_mask(cls, attn_mask: torch.Tensor, *, is_causal: bool = False,
                        block_m: int | None = None, block_n: int | None = None,
                        q_len: int | None = None, k_len: int | None = None) -> SparseLayout:
        """See :func:`blocksparse_fsa.layout.build.layout_from_dense_mask`."""
        from .build import layout_from_dense_mask
        return layout_from_dense_mask(attn_mask, is_causal=is_causal, block_m=block_m,
                                      block_n=block_n, q_len=q_len, k_len=k_len)

    @classmethod
    def dense(cls, q_len: int, k_len: int, *, is_causal: bool = False, block_m: int | None = None,
              block_n: int | None = None, device="cpu") -> SparseLayout:
        """Layout of dense attention (causal if asked), built without a dense mask."""
        from .build import dense_layout
        return dense_layout(q_len, k_len, is_causal=is_causal, block_m=block_m,
                            block_n=block_n, device=device)

    @classmethod
    def from_scipy(cls, matrices, *, is_causal: bool = False, block_m: int | None = None,
                   block_n: int | None = None, device="cpu") -> SparseLayout:
        """See :func:`blocksparse_fsa.layout.convert.layout_from_scipy`."""
        from .convert import layout_from_scipy
        return layout_from_scipy(matrices, is_causal=is_causal, block_m=block_m,
                                 block_n=block_n, device=device)

    def with_kernel(self, kernel: str) -> SparseLayout:
        """This layout for the tile walker (``"tiles"``), the gather forward (``"gather"``) or
        whichever fits (``"auto"``); see :func:`blocksparse_fsa.layout.build.with_kernel`."""
        from .build import with_kernel
        return with_kernel(self, kernel)

    def unordered(self) -> SparseLayout:
        """The same tiles without the token permutation (the pattern in kernel order)."""
        return replace(self, q_perm=None, k_perm=None, perm_dilation=0)

    def reordered(self, reorder) -> SparseLayout:
        """This pattern with its tokens permuted so that its active pairs fill fewer tiles; see
        :func:`blocksparse_fsa.layout.build.reordered`."""
        from .build import reordered
        return reordered(self, reorder)


@dataclass(frozen=True, eq=False)
class GatherIndex:
    """The exact pairs of a :class:`SparseLayout`, as a CSR over query rows and (optionally) its
    transpose.

    A *group* is one (layout batch ``b``, layout head ``h``), numbered ``b * heads + h``, with
    the layout's broadcasting: ``batch`` is 1 or the batch size, ``heads`` 1, the number of KV
    heads or of query heads. Row ``g * q_len + i`` lists the keys of query ``i`` in group ``g``
    (ascending, unique, causality already applied); transposed row ``g * k_len + j`` lists the
    queries that attend key ``j`` (ascending; only ``gather_attn_bwd`` reads it). Tokens are in
    the layout's kernel order (a reordered layout's permuted order). Pointers are int64 (nnz may
    pass 2**31), entries int32. Memory: 4 bytes per pair plus 8 per query row, twice that with
    the transpose.
    """

    q_len: int
    k_len: int
    batch: int
    heads: int
    is_causal: bool
    row_ptr: torch.Tensor  # [batch * heads * q_len + 1] int64 -> col
    col: torch.Tensor  # [nnz] int32 key of each pair, by query row
    row_ptr_t: torch.Tensor | None = None  # [batch * heads * k_len + 1] int64 -> row_t
    row_t: torch.Tensor | None = None  # [nnz] int32 query of each pair, by key row
    # (the transpose is for ``gather_attn_bwd``; a layout's index, forward only, has none)

    @property
    def nnz(self) -> int:
        """Active pairs summed over the index's batch and heads."""
        return self.col.numel()

    @property
    def device(self) -> torch.device:
        return self.col.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def _tensors(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    def to(self, device) -> GatherIndex:
        """A copy on ``device`` (the same object if it already lives there)."""
        device = torch.device(device)
        if self.device == device:
            return self
        return replace(self, **{name: t.to(device) for name, t in self._tensors().items()})

    def __repr__(self) -> str:
        return (f"GatherIndex(q_len={self.q_len}, k_len={self.k_len}, batch={self.batch}, "
                f"heads={self.heads}, nnz={self.nnz}, causal={self.is_causal}, "
                f"nbytes={self.nbytes}, device={self.device})")


def tile_rows(ptr: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """The CSR row of every entry of a layout's tile list (``ptr`` = its row pointers), int64.

    ``n``: the list's length, if known (saves a device sync).
    """
    rows = torch.arange(ptr.numel() - 1, device=ptr.device)
    return torch.repeat_interleave(rows, (ptr[1:] - ptr[:-1]).long(), output_size=n)


def popcount32(words: torch.Tensor) -> torch.Tensor:
    """Set bits of each int32 word (as int64)."""
    x = words.to(torch.int64) & 0xFFFFFFFF
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) & 0xFFFFFFFF) >> 24


def unpack_bits(masks: torch.Tensor, block_n: int) -> torch.Tensor:
    """``[T, block_m, n_words]`` int32 words -> ``[T, block_m, block_n]`` bool."""
    shifts = torch.arange(32, device=masks.device, dtype=torch.int32)
    bits = (masks[..., None] >> shifts) & 1
    return bits.flatten(-2)[..., :block_n].bool()


def inverse(perm: torch.Tensor) -> torch.Tensor:
    """``inv[perm[i]] = i``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def layout_from_tiles(q_len, k_len, block_m, block_n, n_b, n_h, is_causal, full_ptr, full_col,
                      part_ptr, part_col, masks, nnz) -> SparseLayout:
    """A :class:`SparseLayout` from its query-tile lists: adds the key-tile lists and packs
    everything as int32 tensors on the given tensors' device. (The Triton build makes all
    the lists itself, ``preprocess.triton.layout_tensors_triton``.)"""
    n_qt, n_kt = -(-q_len // block_m), -(-k_len // block_n)
    if max(full_col.numel(), part_col.numel()) >= 2**31:  # (ptr[-1]: a device sync)
        raise ValueError("layout has more than 2**31 tiles; use larger block_m / block_n")
    keys = transpose_keys(full_ptr, full_col, part_ptr, part_col, n_qt, n_kt)
    full_ptr_t, full_row_t, part_ptr_t, part_row_t, part_mask_t = transpose_tiles(
        keys, full_col.numel(), n_b * n_h, n_qt, n_kt)
    tensors = dict(full_ptr=full_ptr, full_col=full_col, part_ptr=part_ptr, part_col=part_col,
                   masks=masks, full_ptr_t=full_ptr_t, full_row_t=full_row_t,
                   part_ptr_t=part_ptr_t, part_row_t=part_row_t, part_mask_t=part_mask_t)
    return SparseLayout(q_len=q_len, k_len=k_len, block_m=block_m, block_n=block_n, batch=n_b,
                        heads=n_h, is_causal=is_causal, nnz=int(nnz),
                        **{name: t.to(torch.int32).contiguous() for name, t in tensors.items()})


def check_blocks(block_m, block_n):
    """``block_m, block_n`` with the defaults filled in; raises ``ValueError`` for others."""
    block_m = DEFAULT_BLOCK_M if block_m is None else block_m
    block_n = DEFAULT_BLOCK_N if block_n is None else block_n
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value not in VALID_BLOCKS:
            raise ValueError(f"{name} must be one of {VALID_BLOCKS}, got {value!r}")
    return block_m, block_n
