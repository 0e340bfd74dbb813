"""Launch configuration: one small function per pass, easy to override.

Tile shapes come from the layout (``block_m`` x ``block_n``); these functions choose warps and
pipeline stages. Replace them (``blocksparse_fsa.kernels.config.get_fwd_config = mine``) to tune
for another GPU.
"""

import triton


def get_fwd_config(head_dim: int, block_m: int, block_n: int) -> dict:
    """Warps and stages of the forward kernel.

    Measured on an H200 (benchmarks/results/tune_NVIDIA_H200.csv, D=128, bf16): 64x64 tiles
    like 4 warps and 3-4 stages; 128x64 tiles 4 warps and 2 stages; 128x128 tiles 8 warps.
    """
    if head_dim <= 64:
        return dict(num_warps=4, num_stages=3)
    if head_dim <= 128:
        if block_m * block_n >= 128 * 128:
            return dict(num_warps=8, num_stages=2)
        return dict(num_warps=4, num_stages=3 if block_m <= 64 else 2)
    return dict(num_warps=8, num_stages=2)


def get_bwd_config(head_dim: int, block_m: int, block_n: int, kernel: str = "dkdv") -> dict:
    """Warps and stages of the dK/dV (``kernel="dkdv"``) and dQ (``"dq"``) kernels (H200,
    D=128: 64x64 tiles with 4 warps and 2-4 stages are best; larger tiles want 8 warps and are
    slower overall). Both kernels take the same config: tuned one at a time
    (``tune_configs.py --passes dq dkdv``), neither beat 4 warps x 2 stages by more than 1%."""
    if head_dim <= 64:
        return dict(num_warps=4, num_stages=3)
    if head_dim <= 128:
        return dict(num_warps=4 if block_m * block_n <= 64 * 64 else 8, num_stages=2)
    return dict(num_warps=8, num_stages=1)


def heads_per_program(block_m: int, group_size: int, head_div: int, kernel: str = "fwd") -> int:
    """How many query heads one forward (``kernel="fwd"``) or dQ (``"dq"``) program stacks.

    Stacked heads share a KV head and a layout row, so the count divides ``group_size`` and
    ``head_div``. H200, D=128, 64x64 tiles (benchmarks/results/tune_NVIDIA_H200_stack.csv):
    stacking the forward to 128 rows took it from 1.71 to 1.49 ms; stacking dQ made the
    backward slower (4.14 -> 6.24 ms with 4 warps), so dQ stacks nothing by default.
    """
    if kernel != "fwd":
        return 1
    heads = 1
    while (heads * 2 * block_m <= 128 and group_size % (heads * 2) == 0
           and head_div % (heads * 2) == 0):
        heads *= 2
    return heads


def get_gather_config(kernel: str, head_dim: int, heads: int) -> dict:
    """Chunk sizes, warps and stages of the gather kernels (``kernels/gather.py``).

    ``kernel="fwd"`` / ``"dq"``: one query of ``heads`` stacked query heads (padded to at least
    16 dot rows) walks its keys ``BLOCK_N`` at a time. ``kernel="dkdv"``: one key walks the
    queries that chose it, ``ROWS`` rows (queries x the heads of a stack, padded to a power of
    two) at a time; ``heads`` is the GQA group size, and ``head_split`` (a divisor of it)
    spreads those heads over that many programs per key (fp32 partial sums). Not measured yet:
    first guesses for an H200, to be swept.
    """
    if kernel in ("fwd", "dq"):
        return dict(BLOCK_N=64 if head_dim <= 128 else 32, num_warps=4, num_stages=2)
    if kernel == "dkdv":
        return dict(ROWS=64 if head_dim <= 128 else 32, head_split=1,
                    num_warps=4 if head_dim <= 64 else 8, num_stages=2)
    raise ValueError(f"kernel must be 'fwd', 'dq' or 'dkdv', got {kernel!r}")


def get_tiles_config(block_m: int, block_n: int, window: int, index_bytes: int = 4) -> dict:
    """Window, chunk, warps, register cap and programs of the Triton layout build
    (``preprocess/indices_triton.py``) for ``window`` indices per query of ``index_bytes``.

    ``SPAN``: key words (32 keys, 16 at ``block_n`` 16) of a program's bitmap, sized so that a
    contiguous window of ``window`` keys over ``block_m`` queries fits once centred
    (``window + block_m`` keys plus two tiles of slack), capped at 16384 words. ``CHUNK``:
    index columns a program folds per step, about 2048 indices; a query's 32 consecutive keys
    touch at most two words, which one step merges. Warps: 16 query rows and at most 32
    bitmap words a thread.
    ``maxnreg``: the register cap that keeps four 4-warp programs on an SM.
    ``programs_per_sm``: the persistent grid. ``FAST``: the fast scan where ``CHUNK`` divides
    the width (two words per query and chunk, rows it cannot hold rescanned), ``STAGES`` its
    software pipeline (``cp.async`` copies in flight). H200, the benchmark's sliding window
    (``benchmarks/NOTES.md``, session 5): pass 1 0.638 ms without the fast scan, 0.588 with it;
    8 warps, 2 programs per SM, 3-4 stages within 0.02 ms of that.
    """
    bits = min(block_n, 32)
    n_words = block_n // bits
    need = -(-(window + block_m) // bits) + 2 * n_words + 2
    span = max(n_words, min(triton.next_power_of_2(need), 16384 // block_m))
    chunk = max(16, min(2048 // block_m, 64))
    num_warps = max(4, min(16, max(block_m // 16, block_m * span // 1024)))
    maxnreg = (128 if index_bytes == 4 else 168) if num_warps == 4 else None
    return dict(SPAN=span, CHUNK=chunk, num_warps=num_warps, maxnreg=maxnreg,
                programs_per_sm=4, FAST=True, WINDOW=True, STAGES=3)


# TMA: the kernels read K/V (forward, dQ) and Q/dO (dK/dV) tiles through TMA descriptors where
# the tensors allow it (``common.use_tma``); False falls back to pointer loads everywhere.
# TMA_DILATION: the same in the computed dilation order (a 3-D descriptor, one box per tile).
# H200, L=32768 (benchmarks/NOTES.md, session 4): sliding window forward 1.530 -> 1.376 ms,
# backward 4.49 -> 4.20 ms; dilated_reordered forward 1.060 -> 0.931 ms, backward 3.04 -> 2.90.
TMA = True
TMA_DILATION = True
