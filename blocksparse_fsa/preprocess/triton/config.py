"""Launch configuration of the Triton layout build: one small function to override.

``blocksparse_fsa.preprocess.triton.config.get_tiles_config = mine`` retunes it for another GPU;
the attention kernels keep their own (``kernels/config.py``).
"""

import triton


def get_tiles_config(block_m: int, block_n: int, window: int, index_bytes: int = 4) -> dict:
    """Window, chunk, warps, register cap and programs of the Triton layout build for
    ``window`` indices per query of ``index_bytes``.

    ``SPAN``: key words (32 keys, 16 at ``block_n`` 16) of a program's bitmap, sized so that a
    contiguous window of ``window`` keys over ``block_m`` queries fits once centred
    (``window + block_m`` keys plus two tiles of slack), capped at 16384 words. ``CHUNK``:
    index columns a program folds per step, about 2048 indices; a query's 32 consecutive keys
    touch at most two words, which one step merges. Warps: 16 query rows and at most 32
    bitmap words a thread.
    ``maxnreg``: the register cap that keeps four 4-warp programs on an SM.
    ``programs_per_sm``: the persistent grid. ``FAST``: the fast scan where ``CHUNK`` divides
    the width (two words per query and chunk, rows it cannot hold rescanned), ``STAGES`` its
    software pipeline (``cp.async`` copies in flight). Measurements: ``benchmarks/NOTES.md``.
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


def word_args(block_n: int) -> dict:
    """How a tile row's key bits sit in words: 32 bits a word (16 at ``block_n`` 16),
    ``N_WORDS`` words a tile row, and the value of a word whose keys are all active."""
    bits = min(block_n, 32)
    n_words = block_n // bits
    return dict(N_WORDS=n_words, LOG_NW=n_words.bit_length() - 1, LOG_WB=bits.bit_length() - 1,
                FULL_WORD=(1 << bits) - 1)
