"""``SparseLayout``: the tile metadata every kernel walks, and the ways to build it."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from .preprocess import dense_to_tiles, indices_to_tiles, mask_to_tiles
from .preprocess.device import (index_range_error, indices_to_tiles_torch, transpose_keys,
                                transpose_tiles)
from .reorder import inverse

if TYPE_CHECKING:
    from .gather_index import GatherIndex

DEFAULT_BLOCK_M = 64
DEFAULT_BLOCK_N = 64
_KERNELS = ("auto", "tiles", "gather")
# kernel="auto" picks the gather forward below this tile density (useful / computed pairs).
# Measured on an H200 (benchmarks/results/bench_gather_NVIDIA_H200_61543d8.csv, D=128,
# L=32768): gather / walker forward = 16.7 / 25.0 ms at density 0.058, 9.0 / 3.27 ms at 0.24;
# with the gather cost following the pairs and the walker's the tiles, both cross at ~0.087
GATHER_MAX_DENSITY = 0.08
_VALID_BLOCKS = (16, 32, 64, 128, 256)
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_METHODS = ("auto", "numba", "torch", "triton")


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
    # the kernels compute them (reorder.dilation_of)

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
        from .interop import layout_to_indices
        if not self.is_reordered:
            return layout_to_indices(self)
        idx = layout_to_indices(self.unordered())  # kernel order
        idx = torch.where(idx >= 0, self.k_perm[idx.clamp(min=0)], -1)  # original keys
        idx = idx[:, :, inverse(self.q_perm)]  # original queries
        big = torch.iinfo(idx.dtype).max  # keys ascending, the -1 padding last
        idx = torch.sort(torch.where(idx < 0, big, idx), dim=-1).values
        return idx.masked_fill_(idx == big, -1)

    def to_scipy(self) -> list:
        """``[batch][heads]`` nested list of bool ``scipy.sparse.csr_array`` ``(q_len, k_len)``.

        Canonical CSR (sorted, unique columns), built without a dense array.
        """
        from .interop import layout_to_scipy
        if not self.is_reordered:
            return layout_to_scipy(self)
        q_inv, k_inv = (inverse(p).cpu().numpy() for p in (self.q_perm, self.k_perm))
        return [[m[q_inv][:, k_inv].tocsr() for m in row]
                for row in layout_to_scipy(self.unordered())]

    def to_flex_block_mask(self, num_q_heads: int | None = None):
        """A FlexAttention ``BlockMask`` (with its ``mask_mod``) of exactly this pattern.

        ``flex_attention(q, k, v, block_mask=layout.to_flex_block_mask(Hq), enable_gqa=True)``
        with q ``(B, Hq, Lq, D)`` equals this layout's attention. Partial tiles become
        ``kv_indices``, full tiles ``full_kv_indices``, ``BLOCK_SIZE = (block_m, block_n)``.
        ``num_q_heads`` (default: ``heads``) must be a multiple of ``heads``; a per-KV-head
        layout is expanded to one BlockMask head per query head; a batch of 1 broadcasts. The
        ``mask_mod`` is exact on every pair (eager flex ignores the block lists and evaluates it
        everywhere); the BlockMask holds ``[B, H, QT, KT]`` tables. A compiled flex needs its kernel
        tile to divide ours: pass ``kernel_options={"BLOCK_M": block_m, "BLOCK_N": block_n}``
        (or smaller) when its default is larger. See ``interop.layout_to_flex_block_mask``.
        """
        from .interop import layout_to_flex_block_mask
        if self.is_reordered:
            raise ValueError("to_flex_block_mask needs a layout without a token permutation: "
                             "export the layout you built before reordering")
        return layout_to_flex_block_mask(self, num_q_heads)

    def plot(self, path=None, *, batch: int = 0, head: int = 0, ax=None):
        """Picture of one (batch, head)'s tile map: density per visited tile, full tiles apart.

        Saves a PNG to ``path`` if given; draws into ``ax`` if given. Returns the matplotlib
        ``Figure``. Needs matplotlib (``pip install 'blocksparse_fsa[plot]'``).
        """
        from .viz import plot_layout
        return plot_layout(self, path, batch=batch, head=head, ax=ax)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_indices(cls, attn_indices: torch.Tensor, k_len: int, *, is_causal: bool = False,
                     block_m: int | None = None, block_n: int | None = None,
                     reorder=None, method: str = "auto", kernel: str = "auto") -> SparseLayout:
        """See :func:`build_layout`."""
        if kernel not in _KERNELS:
            raise ValueError(f"kernel must be one of {_KERNELS}, got {kernel!r}")
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        if reorder is not None:
            _check_indices(attn_indices, k_len)
            q_perm, k_perm = _token_orders(
                reorder, attn_indices.shape[2], k_len,
                lambda: cls.from_indices(attn_indices, k_len, is_causal=is_causal,
                                         block_m=block_m, block_n=block_n, method=method,
                                         kernel="tiles"))
            layout = _permuted(attn_indices, k_len, is_causal, block_m, block_n, q_perm, k_perm,
                               method)
            return layout.with_kernel(kernel)  # "gather" is an error here, "auto" the walker
        block_m, block_n = _check_blocks(block_m, block_n)
        idx = _check_indices(attn_indices, k_len, check_range=False)
        if method == "auto":
            method = {"cpu": "numba", "cuda": "triton"}.get(idx.device.type, "torch")
        if method != "triton":  # the Triton kernels check the range in the same pass
            _check_range(idx, k_len)
        n_b, n_h, q_len, _ = idx.shape
        meta = (q_len, int(k_len), block_m, block_n, n_b, n_h, bool(is_causal))
        if method == "triton":  # every tensor on the GPU, the transposed lists included
            from .preprocess.indices_triton import layout_tensors_triton
            tensors, nnz = layout_tensors_triton(idx, q_len, int(k_len), bool(is_causal),
                                                 block_m, block_n)
            return cls(q_len=q_len, k_len=int(k_len), block_m=block_m, block_n=block_n,
                       batch=n_b, heads=n_h, is_causal=bool(is_causal), nnz=nnz,
                       **tensors).with_kernel(kernel)
        if method == "torch":
            arrays = indices_to_tiles_torch(idx, q_len, int(k_len), bool(is_causal), block_m,
                                            block_n)
        else:
            arrays = indices_to_tiles(np.ascontiguousarray(idx.cpu().numpy()), q_len, int(k_len),
                                      bool(is_causal), block_m, block_n)
            arrays = [torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in arrays]
            arrays[4] = arrays[4].view(torch.int32)  # uint32 words -> int32 bit patterns
        return _finish(*meta, *arrays).to(attn_indices.device).with_kernel(kernel)

    @classmethod
    def from_dense_mask(cls, attn_mask: torch.Tensor, *, is_causal: bool = False,
                        block_m: int | None = None, block_n: int | None = None,
                        q_len: int | None = None, k_len: int | None = None) -> SparseLayout:
        """Layout of a dense boolean mask ``(B|1, H|1, Lq|1, Lk|1)`` (True = attend).

        A size-1 query or key dim broadcasts (FSA's rules: ``(B, 1, 1, Lk)`` is a key-padding
        mask); then pass ``q_len`` / ``k_len``, and the layout is built from the mask's rows
        and columns without expanding it to Lq x Lk. The reduction to tiles runs on the
        mask's device; the result lives there too.
        """
        block_m, block_n = _check_blocks(block_m, block_n)
        if not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool:
            raise TypeError("attn_mask must be a torch.bool tensor (True = attend), got "
                            f"{getattr(attn_mask, 'dtype', type(attn_mask))}")
        if attn_mask.dim() != 4:
            raise ValueError("attn_mask must have shape (batch, heads, q_len, k_len), got "
                             f"{tuple(attn_mask.shape)}")
        n_b, n_h, mask_q, mask_k = attn_mask.shape
        q_len = mask_q if q_len is None else q_len
        k_len = mask_k if k_len is None else k_len
        for name, size, length in (("query", mask_q, q_len), ("key", mask_k, k_len)):
            if size not in (1, length):
                raise ValueError(f"attn_mask has {size} {name} positions; expected 1 or {length}")
        if (mask_q, mask_k) != (q_len, k_len):
            return _broadcast_mask_layout(attn_mask, q_len, k_len, bool(is_causal), block_m,
                                          block_n)
        arrays = mask_to_tiles(attn_mask, bool(is_causal), block_m, block_n)
        layout = _finish(q_len, k_len, block_m, block_n, n_b, n_h, bool(is_causal), *arrays)
        return layout.to(attn_mask.device)

    @classmethod
    def dense(cls, q_len: int, k_len: int, *, is_causal: bool = False, block_m: int | None = None,
              block_n: int | None = None, device="cpu") -> SparseLayout:
        """Layout of dense attention (causal if asked), built without a dense mask."""
        block_m, block_n = _check_blocks(block_m, block_n)
        arrays = dense_to_tiles(q_len, k_len, bool(is_causal), block_m, block_n, device)
        layout = _finish(q_len, k_len, block_m, block_n, 1, 1, bool(is_causal), *arrays)
        return layout.to(device)

    def with_kernel(self, kernel: str) -> SparseLayout:
        """This layout for the tile walker (``"tiles"``), the gather forward (``"gather"``: each
        query loads its own keys, for scattered patterns; adds a :class:`GatherIndex` of 4
        bytes per active pair; the backward still walks the tiles) or whichever fits
        (``"auto"``: gather below ``GATHER_MAX_DENSITY`` tile density, for layouts without a
        token permutation)."""
        if kernel not in _KERNELS:
            raise ValueError(f"kernel must be one of {_KERNELS}, got {kernel!r}")
        if kernel == "auto":
            kernel = ("gather" if self.density < GATHER_MAX_DENSITY and not self.is_reordered
                      else "tiles")
        if kernel == self.kernel:
            return self
        if kernel == "tiles":
            return replace(self, gather_index=None)
        if self.is_reordered:
            raise ValueError("the gather kernels take layouts without a token permutation: a "
                             "reordered layout is meant for the tile walker")
        from .gather_index import build_gather_index
        return replace(self, gather_index=build_gather_index(self, transposed=False))

    def unordered(self) -> SparseLayout:
        """The same tiles without the token permutation (the pattern in kernel order)."""
        return replace(self, q_perm=None, k_perm=None, perm_dilation=0)

    def reordered(self, reorder) -> SparseLayout:
        """This pattern with its tokens permuted so that its active pairs fill fewer tiles.

        ``reorder`` is ``("dilation", d)`` (group tokens by position mod d, query positions
        bottom-right aligned: a dilated window becomes d plain windows), ``"rcm"`` (scipy's
        reverse Cuthill-McKee on the symmetrised pattern; needs q_len == k_len), or a pair of
        permutations ``(q_perm, k_perm)``. Outputs and gradients of ``sparse_attn_func`` stay
        in the callers' order. The permuted tiles are built from per-query indices
        (``to_indices()``): O(q_len * W) memory.
        """
        if self.is_reordered:
            raise ValueError("this layout is already reordered; reorder layout.unordered()")
        q_perm, k_perm = _token_orders(reorder, self.q_len, self.k_len, lambda: self)
        return _permuted(self.to_indices(), self.k_len, self.is_causal, self.block_m,
                         self.block_n, q_perm, k_perm)

    @classmethod
    def from_scipy(cls, matrices, *, is_causal: bool = False, block_m: int | None = None,
                   block_n: int | None = None, device="cpu") -> SparseLayout:
        """Layout of SciPy sparse matrices: one ``(Lq, Lk)``, or a nested ``[batch][heads]``.

        Any sparse format (``csr_array``, ``coo_matrix``, ...). A pair is active iff its value
        in ``matrix.toarray()`` is nonzero: duplicates are summed, explicit zeros dropped (NaN
        counts as nonzero). Built from the nonzeros in O(nnz) memory, never a dense array; the
        caller's matrices are not modified.
        """
        from .interop import layout_from_scipy
        return layout_from_scipy(matrices, is_causal=is_causal, block_m=block_m,
                                 block_n=block_n, device=device)


def build_layout(attn_indices: torch.Tensor, k_len: int, *, is_causal: bool = False,
                 block_m: int | None = None, block_n: int | None = None,
                 reorder=None, method: str = "auto", kernel: str = "auto") -> SparseLayout:
    """Build the tile layout of ``attn_indices`` once; reuse it for every layer and the backward.

    ``attn_indices``: integer tensor ``(B|1, H|1, Lq, W)``, entries in ``[-1, k_len)``, ``-1`` =
    unused slot, duplicates count once, order within a row is free. ``is_causal`` drops every
    index ``j > i + k_len - Lq`` (bottom-right aligned). Every method costs O(Lq * W) per
    (batch, head) and returns the same layout, tensor for tensor, on ``attn_indices``' device.
    ``method``: ``"numba"`` (the CPU preprocessor), ``"triton"`` (two Triton kernels on the
    indices' GPU, reading the indices about once: for indices a router or top-k selector just
    produced), ``"torch"`` (PyTorch on the indices' device, chunked: a slower fallback for any
    device) or ``"auto"`` (triton for CUDA indices, numba for CPU ones, torch otherwise).
    ``reorder``: an optional token permutation that makes scattered patterns tile-dense, see
    :meth:`SparseLayout.reordered`.
    ``kernel``: ``"tiles"``, ``"gather"`` or ``"auto"`` (gather for scattered patterns), see
    :meth:`SparseLayout.with_kernel`; a reordered layout always takes the tile walker.
    """
    return SparseLayout.from_indices(attn_indices, k_len, is_causal=is_causal, block_m=block_m,
                                     block_n=block_n, reorder=reorder, method=method,
                                     kernel=kernel)


def _broadcast_mask_layout(mask, q_len, k_len, is_causal, block_m, block_n):
    """Layout of a mask with a size-1 query and/or key dim, from its rows and columns only:
    a tile may be active where its rows and its columns both have an active entry, and is
    full where all of them are."""
    from .patterns import layout_from_predicate
    n_b, n_h, mask_q, mask_k = mask.shape

    def per_tile(values, length, block, broadcast):  # [B, H, L|1] -> [B, H, tiles|1] x2
        if broadcast:
            return values, values
        n = -(-length // block)
        padded = torch.nn.functional.pad(values, (0, n * block - length))
        tiles = padded.view(n_b, n_h, n, block)
        return tiles.any(-1), tiles.all(-1)

    rows_any, rows_all = per_tile(mask.any(-1), q_len, block_m, mask_q == 1)
    cols_any, cols_all = per_tile(mask.any(-2), k_len, block_n, mask_k == 1)
    if mask_q == 1:  # any column active means every query row sees it
        rows_any = rows_all = torch.ones_like(rows_any)
    if mask_k == 1:
        cols_any = cols_all = torch.ones_like(cols_any)
    n_qt, n_kt = -(-q_len // block_m), -(-k_len // block_n)
    may = (rows_any[..., :, None] & cols_any[..., None, :]).expand(n_b, n_h, n_qt, n_kt)
    full = (rows_all[..., :, None] & cols_all[..., None, :]).expand(n_b, n_h, n_qt, n_kt)
    if mask_q == 1 and mask_k == 1:
        may = full = mask.expand(n_b, n_h, n_qt, n_kt)

    def predicate(b, h, q, k):
        return mask[b, h, q if mask_q > 1 else 0, k if mask_k > 1 else 0]

    return layout_from_predicate(q_len, k_len, predicate, may, batch=n_b, heads=n_h,
                                 is_causal=is_causal, block_m=block_m, block_n=block_n,
                                 device=mask.device, full_tiles=full)


def _token_orders(reorder, q_len, k_len, unordered_layout):
    """``(q_perm, k_perm)`` of a ``reorder`` spec (see :meth:`SparseLayout.reordered`);
    ``unordered_layout()`` gives the pattern's layout, built only when RCM needs it."""
    from . import reorder as ro
    if isinstance(reorder, str) and reorder == "rcm":
        perm = ro.rcm_order(unordered_layout())
        return perm, perm
    if isinstance(reorder, tuple) and len(reorder) == 2 and reorder[0] == "dilation":
        return (ro.dilation_order(q_len, reorder[1], offset=k_len - q_len),
                ro.dilation_order(k_len, reorder[1]))
    if isinstance(reorder, tuple) and len(reorder) == 2:
        return (ro.check_permutation("q_perm", reorder[0], q_len),
                ro.check_permutation("k_perm", reorder[1], k_len))
    raise ValueError(f"reorder must be 'rcm', ('dilation', d) or (q_perm, k_perm), got "
                     f"{reorder!r}")


def _permuted(attn_indices, k_len, is_causal, block_m, block_n, q_perm, k_perm, method="auto"):
    """The layout of ``attn_indices`` with its tokens in the order ``q_perm`` / ``k_perm``."""
    from .reorder import dilation_of, permute_indices
    dev = attn_indices.device
    idx = permute_indices(attn_indices, k_len, is_causal, q_perm.to(dev), k_perm.to(dev))
    layout = SparseLayout.from_indices(idx, k_len, block_m=block_m, block_n=block_n,
                                       method=method, kernel="tiles")
    dilation = dilation_of(q_perm, k_perm, layout.block_m, layout.block_n)
    return replace(layout, is_causal=bool(is_causal), q_perm=q_perm.to(layout.device),
                   k_perm=k_perm.to(layout.device), perm_dilation=dilation)


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


def _finish(q_len, k_len, block_m, block_n, n_b, n_h, is_causal, full_ptr, full_col, part_ptr,
            part_col, masks, nnz) -> SparseLayout:
    """Add the transposed CSR and pack everything as int32 tensors, on the given tensors'
    device (the CPU after numba, the GPU for GPU indices or masks). The Triton build makes
    its layouts itself (``indices_triton.layout_tensors_triton``)."""
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


def _check_blocks(block_m, block_n):
    block_m = DEFAULT_BLOCK_M if block_m is None else block_m
    block_n = DEFAULT_BLOCK_N if block_n is None else block_n
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value not in _VALID_BLOCKS:
            raise ValueError(f"{name} must be one of {_VALID_BLOCKS}, got {value!r}")
    return block_m, block_n


def _check_indices(attn_indices, k_len, check_range=True) -> torch.Tensor:
    """Validate ``attn_indices`` (its entries too if ``check_range``); return it detached as
    int32 or int64, on its device."""
    if not isinstance(attn_indices, torch.Tensor):
        raise TypeError(f"attn_indices must be a torch.Tensor, got {type(attn_indices).__name__}")
    if attn_indices.dtype not in _INT_DTYPES:
        raise TypeError(f"attn_indices must be an integer tensor, got {attn_indices.dtype}")
    if attn_indices.dim() != 4:
        raise ValueError("attn_indices must have shape (batch, kv_heads, q_len, window), got "
                         f"{tuple(attn_indices.shape)}")
    if not isinstance(k_len, (int, np.integer)) or isinstance(k_len, bool) or k_len < 0:
        raise ValueError(f"k_len must be a non-negative int, got {k_len!r}")
    idx = attn_indices.detach()
    if idx.dtype not in (torch.int32, torch.int64):
        idx = idx.to(torch.int32)
    if check_range:
        _check_range(idx, k_len)
    return idx


def _check_range(idx, k_len):
    """Entries of ``idx`` in ``[-1, k_len)`` (one read of the indices and one sync)."""
    if idx.numel():
        lo, hi = torch.stack(torch.aminmax(idx)).tolist()
        if lo < -1 or hi >= k_len:
            raise index_range_error(idx, k_len)
