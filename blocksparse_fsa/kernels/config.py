"""Launch configuration: one small function per pass, easy to override.

Tile shapes come from the layout (``block_m`` x ``block_n``); these functions choose warps and
pipeline stages. Replace them (``blocksparse_fsa.kernels.config.get_fwd_config = mine``) to tune
for another GPU.
"""


def get_fwd_config(head_dim: int, block_m: int, block_n: int) -> dict:
    """Warps and stages of the forward kernel.

    Measured on an H200 (benchmarks/results/tune_NVIDIA_H200.csv, D=128, bf16): 64x64 tiles
    like 4 warps and 3-4 stages; 128x64 tiles 4 warps and 2 stages; 128x128 tiles 8 warps.
    A ``warp_specialize=True`` entry asks Triton to warp-specialize the tile loop (TMA loads
    only; on sm_90 Triton's pass needs 8 warps: with 4 it fails to compile).
    """
    if WARP_SPECIALIZE:
        return dict(num_warps=8, num_stages=2, warp_specialize=True)
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
    ``head_div``. The forward stacks up to 128 rows (faster on an H200); dQ stacks nothing by
    default, since stacking it made the backward slower (``benchmarks/NOTES.md``).
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


# TMA: the kernels read K/V (forward, dQ) and Q/dO (dK/dV) tiles through TMA descriptors where
# the tensors allow it (``common.use_tma``); False falls back to pointer loads everywhere.
# TMA_DILATION: the same in the computed dilation order (a 3-D descriptor, one box per tile).
# Both are faster on an H200 in every pass measured (benchmarks/NOTES.md).
TMA = True
TMA_DILATION = True
# WARP_SPECIALIZE: the forward's default config asks Triton for automatic warp specialization
# of the tile loop (producer warps issue the TMA loads, consumer warps the MMAs). Off until it
# measures faster on sm_90 (benchmarks/NOTES.md).
WARP_SPECIALIZE = False
# PARTIAL_LOADS: how the kernels read the operand of a partial tile whose unused rows must read
# as 0 (garbage there would reach a dot): "pointer" loads with a mask, "select" (the TMA box,
# then a select) or "branch" (the TMA box when the tile uses every row, pointer loads else).
PARTIAL_LOADS = "pointer"
# DECODE_MERGE: how a decode step with several key splits merges them (``kernels/decode.py``):
# "kernel", a second launch, or "ticket", in the split kernel, by the last of a query block's
# programs to finish (one launch per step: faster eager, the same under a CUDA graph; opt-in
# until its GPU tests have passed, benchmarks/NOTES.md).
DECODE_MERGE = "kernel"
# PREFILL_TILES_MIN_QUERIES: sparse_attn_with_kvcache runs a window / sinks / dense chunk of at
# least this many new queries per row through the tile walker (sparse_attn_func on the analytic
# layout) when every row has one length the host knows without a sync (an int cache_seqlens,
# or the eager data check's read-back) and the cache is contiguous; the split kernel otherwise
# (decode steps always: a query tile of one row wastes the walker). The walker reads each K/V
# tile once per 64 queries, the split kernel once per 16 (benchmarks/NOTES.md).
PREFILL_TILES_MIN_QUERIES = 512
