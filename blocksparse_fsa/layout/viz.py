"""Pictures of a layout's tile map (matplotlib, an optional dependency: ``[plot]`` extra)."""

from __future__ import annotations

import numpy as np
import torch

from .convert import popcount_rows
from .core import SparseLayout

_FULL_COLOR = (0.84, 0.15, 0.16, 1.0)  # red: outside the density colormap (viridis)
_EMPTY_COLOR = (1.0, 1.0, 1.0, 1.0)
_GRID_MAX_TILES = 64  # draw tile borders up to this many tiles per side
_NEAREST_MAX_TILES = 512  # beyond, let matplotlib antialias the downsampled map


def tile_density_map(layout: SparseLayout, batch: int = 0, head: int = 0):
    """``(density, full)`` NumPy ``[QT, KT]`` maps of one (batch, head).

    ``density`` = active pairs / (block_m * block_n) of each visited tile, NaN where the tile is
    not visited; ``full`` marks the full tiles (density 1, no mask in the kernels).
    """
    if not 0 <= batch < layout.batch:
        raise ValueError(f"batch must lie in [0, {layout.batch}), got {batch}")
    if not 0 <= head < layout.heads:
        raise ValueError(f"head must lie in [0, {layout.heads}), got {head}")
    n_qt, n_kt = layout.num_q_tiles, layout.num_k_tiles
    r0 = (batch * layout.heads + head) * n_qt
    density = np.full((n_qt, n_kt), np.nan)
    full = np.zeros((n_qt, n_kt), dtype=bool)
    for is_full, ptr, col in ((True, layout.full_ptr, layout.full_col),
                              (False, layout.part_ptr, layout.part_col)):
        lo, hi = int(ptr[r0]), int(ptr[r0 + n_qt])
        counts = (ptr[r0 + 1:r0 + n_qt + 1] - ptr[r0:r0 + n_qt]).long().cpu()
        qt = torch.repeat_interleave(torch.arange(n_qt), counts).numpy()
        kt = col[lo:hi].long().cpu().numpy()
        if is_full:
            density[qt, kt], full[qt, kt] = 1.0, True
        else:
            pairs = popcount_rows(layout.masks[lo:hi]).sum(-1).cpu().numpy()
            density[qt, kt] = pairs / (layout.block_m * layout.block_n)
    return density, full


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def plot_layout(layout: SparseLayout, path=None, *, batch: int = 0, head: int = 0, ax=None):
    """See :meth:`SparseLayout.plot`. One ``imshow`` of the ``[QT, KT]`` map, any size."""
    try:
        from matplotlib import colormaps
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise ImportError("SparseLayout.plot needs matplotlib: pip install 'blocksparse_fsa[plot]' "
                          "(or pip install matplotlib)") from exc

    density, full = tile_density_map(layout, batch, head)
    n_qt, n_kt = density.shape
    visited = ~np.isnan(density)
    cmap, norm = colormaps["viridis"], Normalize(0.0, 1.0)
    rgba = np.empty((n_qt, n_kt, 4))
    rgba[:] = _EMPTY_COLOR
    rgba[visited] = cmap(norm(density[visited]))
    rgba[full] = _FULL_COLOR

    if ax is None:
        ratio = n_qt / max(n_kt, 1)
        fig = Figure(figsize=(7.5, float(np.clip(6.0 * ratio, 3.5, 9.0)) + 0.8))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    big = max(n_qt, n_kt) > _NEAREST_MAX_TILES
    aspect = "equal" if 0.25 <= n_qt / max(n_kt, 1) <= 4 else "auto"
    ax.imshow(rgba, extent=(-0.5, n_kt - 0.5, n_qt - 0.5, -0.5), aspect=aspect,
              interpolation="antialiased" if big else "nearest")
    if max(n_qt, n_kt) <= _GRID_MAX_TILES:  # tile borders for small maps
        ax.set_xticks(np.arange(-0.5, n_kt, 1.0), minor=True)
        ax.set_yticks(np.arange(-0.5, n_qt, 1.0), minor=True)
        ax.grid(which="minor", color=(0.85, 0.85, 0.85), linewidth=0.5)
        ax.tick_params(which="minor", length=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"key tile ({layout.block_n} keys each)")
    ax.set_ylabel(f"query tile ({layout.block_m} queries each)")

    bm, bn = layout.block_m, layout.block_n
    n_tiles, n_full = int(visited.sum()), int(full.sum())
    nnz = int(round(float(np.nansum(density)) * bm * bn))
    dens = nnz / (n_tiles * bm * bn) if n_tiles else 1.0
    where = (f", batch {batch} head {head} of {layout.batch}x{layout.heads}"
             if layout.batch * layout.heads > 1 else "")
    ax.set_title(f"{layout.q_len} x {layout.k_len} (queries x keys), {bm}x{bn} tiles"
                 f"{', causal' if layout.is_causal else ''}"
                 f"{', tokens reordered' if layout.is_reordered else ''}{where}\n"
                 f"{n_tiles} of {n_qt * n_kt} tiles visited ({n_full} full), density {dens:.3f}, "
                 f"nnz {nnz:,}; layout {_human_bytes(layout.nbytes)}", fontsize=10)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.046, pad=0.03,
                 label="partial tile density (active pairs / tile pairs)")
    ax.legend(handles=[Patch(facecolor=_FULL_COLOR, label="full tile (no mask)"),
                       Patch(facecolor=_EMPTY_COLOR, edgecolor="0.6", label="not visited")],
              loc="upper left", bbox_to_anchor=(0.0, -0.1), ncol=2, frameon=False, fontsize=9)
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig
