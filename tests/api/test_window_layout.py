"""The closed-form window / sinks / packed-sequence layouts (``preprocess.ranges`` through
``api.window.analytic_layout``) against the predicate engine on the same per-row ranges
(``api.window.ranges_layout``), field by field: tile lists, their order, masks, ``nnz`` and
``is_causal``."""

import random

import numpy as np
import pytest
import torch

from blocksparse_fsa.api import window as window_mod
from blocksparse_fsa.preprocess.ranges import range_masks_numpy, range_tiles

from ..helpers import HAS_CUDA, needs_kernels

FIELDS = ("full_ptr", "full_col", "part_ptr", "part_col", "masks", "full_ptr_t", "full_row_t",
          "part_ptr_t", "part_row_t", "part_mask_t")
BLOCKS = [(16, 16), (32, 64), (64, 32), (128, 16), (64, 64)]


def engine_layout(cu_q, cu_k, window, causal, layout_causal, block, device="cpu"):
    """The oracle: per-row ranges through ``layout_from_predicate``."""
    cq = torch.tensor(cu_q, dtype=torch.int64, device=device)
    ck = torch.tensor(cu_k, dtype=torch.int64, device=device)
    ranges = window_mod.row_ranges(cq, ck, cu_q[-1], *window, causal)
    return window_mod.ranges_layout(ranges, cu_q[-1], cu_k[-1], layout_causal, *block, device)


def assert_same_layout(got, want, what):
    for name in FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, (
            f"{what}: {name} is {a.dtype} {tuple(a.shape)} on {a.device}, the engine's "
            f"{b.dtype} {tuple(b.shape)} on {b.device}")
        if not torch.equal(a, b):
            at = (a != b).nonzero()[0].tolist()
            raise AssertionError(f"{what}: {name} differs first at {at}: {a.tolist()[:40]} vs "
                                 f"{b.tolist()[:40]}")
    assert (got.nnz, got.is_causal, got.block_m, got.block_n) == (
        want.nnz, want.is_causal, want.block_m, want.block_n), what


def check(cu_q, cu_k, window, causal, block, device="cpu", bit_kernel=None):
    layout_causal = causal if len(cu_q) == 2 else False  # what window_ / packed_layout record
    want = engine_layout(cu_q, cu_k, window, causal, layout_causal, block, device)
    got = window_mod.analytic_layout(cu_q, cu_k, window, causal, layout_causal, *block, device,
                                     bit_kernel)
    # the lists share one buffer; each starts 16-byte aligned, as a tensor of its own would
    assert all(getattr(got, name).data_ptr() % 16 == 0 for name in FIELDS)
    assert_same_layout(got, want, f"cu_q={cu_q} cu_k={cu_k} window={window} causal={causal} "
                                  f"block={block}")


LENGTHS = [(1, 1), (37, 37), (100, 61), (61, 100), (130, 130), (5, 200), (200, 3)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("q_len,k_len", LENGTHS, ids=[f"Lq{q}-Lk{k}" for q, k in LENGTHS])
def test_one_sequence_equals_the_engine(q_len, k_len, causal):
    for left in (-1, 0, 3, 40, 500):
        for right in (-1, 0, 2, 500):
            for sinks in (0, 1, 5, 300):
                if left == right == -1 and sinks:
                    continue  # check_window drops sinks under an unbounded window
                for block in BLOCKS:
                    check([0, q_len], [0, k_len], (left, right, sinks), causal, block)


def cu(lens):
    return [0, *np.cumsum(lens).tolist()]


PACKED = {
    "empty-and-single": ([3, 0, 50, 1, 20], [9, 4, 50, 0, 33]),
    "ones": ([1] * 40, [1] * 40),
    "ones-vs-longer": ([1] * 30, [5] * 30),
    "one-long": ([2, 300, 1, 7], [2, 300, 1, 7]),
    "chunked-prefill": ([16, 1, 40], [100, 64, 40]),
    "more-queries": ([20, 33, 5], [3, 10, 0]),
}


@pytest.mark.parametrize("name", list(PACKED))
def test_packed_sequences_equal_the_engine(name):
    lens_q, lens_k = PACKED[name]
    for window in [(-1, -1, 0), (0, 0, 0), (7, 2, 2), (3, 0, 1), (500, -1, 3), (-1, 4, 0),
                   (1, 1, 400)]:
        for causal in (False, True):
            for block in BLOCKS[:4]:
                check(cu(lens_q), cu(lens_k), window, causal, block)


def test_random_packings_equal_the_engine():
    rng = random.Random(0)
    for _ in range(150):
        n = rng.randint(1, 6)
        lens_q = [rng.choice([0, 1, 2, rng.randint(0, 90)]) for _ in range(n)]
        lens_k = [rng.choice([0, 1, rng.randint(0, 90)]) for _ in range(n)]
        if sum(lens_q) == 0 or sum(lens_k) == 0:
            continue
        window = (rng.choice([-1, 0, 1, 7, 100]), rng.choice([-1, 0, 3, 100]),
                  rng.choice([0, 1, 3, 200]))
        block = (rng.choice([16, 32, 64, 128]), rng.choice([16, 32, 64, 128]))
        check(cu(lens_q), cu(lens_k), window, rng.random() < 0.5, block)


def test_long_totals_keep_the_engine(monkeypatch):
    calls = []
    real = window_mod.ranges_layout
    monkeypatch.setattr(window_mod, "ranges_layout", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(window_mod, "MAX_TOKENS", 64)
    got = window_mod.analytic_layout([0, 70], [0, 70], (5, 0, 1), True, True, 16, 16, "cpu")
    assert calls == [1]
    monkeypatch.undo()
    assert_same_layout(got, engine_layout([0, 70], [0, 70], (5, 0, 1), True, True, (16, 16)),
                       "engine fallback")


def test_window_layout_is_cached_and_equal():
    window_mod.clear_cache()
    a = window_mod.window_layout(300, 300, (63, 0, 4), True, "cpu")
    assert window_mod.window_layout(300, 300, (63, 0, 4), True, "cpu") is a
    assert_same_layout(a, engine_layout([0, 300], [0, 300], (63, 0, 4), True, True, (64, 64)),
                       "window_layout")


def kernel_case(cu_q, cu_k, window, causal, block, device):
    tiles = range_tiles(cu_q, cu_k, *window, causal, *block)
    want = range_masks_numpy(tiles.part_qt, tiles.part_col, cu_q, cu_k, *window, causal, *block)

    from blocksparse_fsa.preprocess.triton.ranges import range_masks_triton
    lists = torch.from_numpy(tiles.buffer).to(device)
    got = range_masks_triton(lists, tiles.part_qt.size, causal, *block)
    assert torch.equal(got.cpu(), torch.from_numpy(want)), (cu_q, cu_k, window, causal, block)


@pytest.mark.interpreter
@needs_kernels
@pytest.mark.parametrize("block", [(16, 16), (32, 64), (64, 128)], ids=str)
def test_bit_kernel_equals_the_host_bits(block):
    device = "cuda" if HAS_CUDA else "cpu"
    kernel_case(cu([3, 0, 50, 1, 20]), cu([9, 4, 50, 0, 33]), (7, 2, 2), True, block, device)
    kernel_case([0, 90], [0, 70], (5, -1, 3), False, block, device)
    kernel_case([0, 1], [0, 100], (-1, -1, 0), True, block, device)


@pytest.mark.interpreter
@needs_kernels
def test_the_gpu_path_equals_the_engine():
    """The CUDA path (tile lists in one buffer, the bit kernel) on the kernels' tier."""
    device = "cuda" if HAS_CUDA else "cpu"
    check(cu([3, 0, 50, 1, 20]), cu([9, 4, 50, 0, 33]), (7, 2, 2), True, (16, 32), device,
          bit_kernel=True)
    check([0, 150], [0, 150], (40, 0, 3), True, (32, 32), device, bit_kernel=True)
    check([0, 100], [0, 61], (5, -1, 0), False, (64, 16), device, bit_kernel=True)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_gpu_layouts_equal_the_engine_without_a_sync():
    cases = [([0, 1000], [0, 1000], (255, 0, 0), True, (64, 64)),
             ([0, 777], [0, 1500], (100, 37, 4), False, (128, 64)),
             (cu([300, 0, 1, 999, 17]), cu([400, 5, 1, 999, 0]), (63, 0, 2), True, (64, 32)),
             ([0, 4096], [0, 4096], (1023, 0, 0), True, (64, 64))]
    for cu_q, cu_k, window, causal, block in cases:
        layout_causal = causal if len(cu_q) == 2 else False
        want = engine_layout(cu_q, cu_k, window, causal, layout_causal, block, "cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # a device -> host read fails the build
        try:
            got = window_mod.analytic_layout(cu_q, cu_k, window, causal, layout_causal, *block,
                                             "cuda")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert_same_layout(got, want, f"cuda {cu_q} {cu_k} {window} {causal} {block}")


def test_too_many_tiles_is_refused_before_allocating():
    """Lists past int32 offsets: a clear error from the counts, before they are allocated."""
    n = 2**20  # 2**16 x 2**16 full tiles of 16 x 16
    with pytest.raises(ValueError, match="too many tiles"):
        range_tiles([0, n], [0, n], -1, -1, 0, False, 16, 16)
