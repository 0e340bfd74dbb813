"""The Triton layout build (``preprocess/triton/``) against the numba and PyTorch
builds: the same tensors, exactly. CPU tests run the kernels under the Triton interpreter."""

import numpy as np
import pytest
import torch

from blocksparse_fsa import build_layout
from blocksparse_fsa.preprocess.torch import indices_to_tiles_torch, transpose_keys
from blocksparse_fsa.preprocess.numba import indices_to_tiles
from blocksparse_fsa.preprocess.triton import build as indices_triton
from blocksparse_fsa.preprocess.triton import indices_to_tiles_triton, layout_tensors_triton

from ..helpers import HAS_CUDA, INTERPRET, LAYOUT_TENSORS, check_layout_invariants, random_indices

pytestmark = pytest.mark.skipif(not (HAS_CUDA or INTERPRET),
                                reason="needs a CUDA GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if HAS_CUDA else "cpu"
NAMES = ["full_ptr", "full_col", "part_ptr", "part_col", "masks"]


def assert_same_tiles(got, want, label=""):
    """Raw builder outputs equal, dtype included; on failure name the first differing row."""
    for name, g, w in zip(NAMES, got, want):
        g, w = g.cpu(), w.cpu()
        assert g.dtype == w.dtype, f"{label} {name}: dtype {g.dtype} != {w.dtype}"
        if g.shape != w.shape or not torch.equal(g, w):
            ptr = want[0 if name.startswith("full") else 2].cpu()
            rows = torch.arange(ptr.numel() - 1)
            if name.endswith("ptr"):
                bad = (g != w).nonzero()[0].item() if g.shape == w.shape else -1
                raise AssertionError(f"{label} {name} differs from row {bad}: got {g[:12]} "
                                     f"want {w[:12]} (shapes {tuple(g.shape)}, "
                                     f"{tuple(w.shape)})")
            first = (g != w).reshape(g.shape[0], -1).any(1).nonzero()[0].item() \
                if g.shape == w.shape else 0
            row = int(rows[(ptr[1:] > first)][0]) if ptr[-1] > first else -1
            raise AssertionError(f"{label} {name}: first difference at entry {first} (row {row}): "
                                 f"got {g[first].tolist()}, want {w[first].tolist()}")
    assert got[5] == want[5], f"{label} nnz {got[5]} != {want[5]}"


def numba_tiles(idx, q_len, k_len, is_causal, block_m, block_n):
    arrays = indices_to_tiles(np.ascontiguousarray(idx.cpu().numpy()), q_len, k_len, is_causal,
                              block_m, block_n)
    full_ptr, full_col, part_ptr, part_col, masks, nnz = arrays
    return (torch.from_numpy(full_ptr), torch.from_numpy(full_col), torch.from_numpy(part_ptr),
            torch.from_numpy(part_col), torch.from_numpy(masks).view(torch.int32), nnz)


def check_tiles(idx, q_len, k_len, is_causal, block_m, block_n, **kwargs):
    """``indices_to_tiles_triton`` == PyTorch build == numba build, and its transpose keys
    are ``transpose_keys`` of its tiles."""
    got, keys = indices_to_tiles_triton(idx.to(DEVICE), q_len, k_len, is_causal, block_m,
                                        block_n, with_keys=True, **kwargs)
    in_torch = indices_to_tiles_torch(idx, q_len, k_len, is_causal, block_m, block_n)
    assert_same_tiles(got, in_torch, "vs torch:")
    want_keys = transpose_keys(*in_torch[:4], -(-q_len // block_m), -(-k_len // block_n))
    assert keys.dtype == want_keys.dtype and torch.equal(keys.cpu(), want_keys), "keys differ"
    want = numba_tiles(idx, q_len, k_len, is_causal, block_m, block_n)
    want = tuple(t.long() if i in (0, 2) else t for i, t in enumerate(want[:5])) + (want[5],)
    assert_same_tiles(got, want, "vs numba:")
    return got


def check_all(idx, q_len, k_len, is_causal, block_m, block_n, **kwargs):
    """Every tensor of the Triton build's layout (``layout_tensors_triton``: both passes, the
    key-tile lists) == the numba build's."""
    tensors, nnz = layout_tensors_triton(idx.to(DEVICE), q_len, k_len, is_causal, block_m,
                                         block_n, **kwargs)
    want = build_layout(idx, k_len, is_causal=is_causal, block_m=block_m, block_n=block_n,
                        method="numba")
    assert nnz == want.nnz, f"nnz {nnz} != {want.nnz}"
    for name in LAYOUT_TENSORS:
        got, expected = tensors[name].cpu(), getattr(want, name)
        assert got.dtype == torch.int32, f"{name}: {got.dtype}"
        assert got.shape == expected.shape and torch.equal(got, expected), \
            f"{name} differs: got {got.flatten()[:12]}, want {expected.flatten()[:12]}"
    return tensors


def window(q_len, k_len, left, right=0, order="ascending", dup=False, pad_to=None, seed=0):
    """Query i sees keys i + off - left .. i + off + right (off = k_len - q_len), clipped to
    -1; in ascending, descending or shuffled order, optionally duplicated and -1 padded."""
    i = torch.arange(q_len)[:, None] + (k_len - q_len)
    idx = i + torch.arange(-left, right + 1)[None, :]
    idx = torch.where((idx >= 0) & (idx < k_len), idx, -1)
    if dup:
        idx = torch.cat([idx, idx[:, ::3]], dim=1)
    if order == "descending":
        idx = idx.flip(1)
    elif order == "shuffled":
        g = torch.Generator().manual_seed(seed)
        idx = idx[:, torch.randperm(idx.shape[1], generator=g)]
    if pad_to is not None:
        idx = torch.nn.functional.pad(idx, (0, pad_to - idx.shape[1]), value=-1)
    return idx[None, None]


BLOCK_PAIRS = [(16, 16), (16, 128), (128, 16), (32, 64), (64, 32), (64, 64), (128, 128),
               (256, 32), (32, 256)]


@pytest.mark.parametrize("block_m,block_n", BLOCK_PAIRS, ids=lambda b: str(b))
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(2, 1, 77, 91, 9), (1, 2, 100, 40, 23), (1, 1, 33, 130, 40)],
                         ids=lambda s: "B{}-H{}-Lq{}-Lk{}-W{}".format(*s))
def test_random_indices(shape, is_causal, block_m, block_n):
    """Duplicates, unsorted rows, -1 padding, Lq > Lk and Lq < Lk, odd lengths."""
    n_b, n_h, q_len, k_len, width = shape
    idx = random_indices((n_b, n_h, q_len, width), k_len, seed=q_len + width + block_m)
    idx[:, :, 5:9] = -1  # empty rows
    check_all(idx, q_len, k_len, is_causal, block_m, block_n)


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (64, 64), (16, 128), (128, 32)], ids=str)
@pytest.mark.parametrize("case", [
    dict(q_len=200, k_len=200, left=5),  # narrower than a tile
    dict(q_len=200, k_len=200, left=150, order="descending", dup=True),
    dict(q_len=130, k_len=333, left=100, right=20, order="shuffled"),
    dict(q_len=270, k_len=150, left=70, pad_to=100),
    dict(q_len=131, k_len=131, left=130, right=130),  # the whole sequence
], ids=["W6", "W151-desc-dup", "Lq<Lk-shuffled", "Lq>Lk-padded", "full"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_windows(case, is_causal, block_m, block_n):
    """Sliding windows wider and narrower than a tile, in every order."""
    q_len, k_len = case["q_len"], case["k_len"]
    args = {k: v for k, v in case.items() if k not in ("q_len", "k_len")}
    check_all(window(q_len, k_len, **args), q_len, k_len, is_causal, block_m, block_n)


@pytest.mark.parametrize("pool_bytes", [0, 2000, 2**20], ids=["no-pool", "small-pool", "pool"])
@pytest.mark.parametrize("span,chunk", [(2, 16), (4, 32), (8, 64)], ids=lambda x: str(x))
def test_several_windows_per_row(span, chunk, pool_bytes):
    """Spans smaller than a row's keys: windows below and above the first one, rows that do
    not fit the pool, and chunks whose rows take several steps."""
    config = dict(SPAN=span, CHUNK=chunk, num_warps=4, programs_per_sm=1)
    for order in ("ascending", "descending", "shuffled"):
        idx = window(70, 90, left=50, right=10, order=order, dup=True)
        check_all(idx, 70, 90, False, 32, 64, pool_bytes=pool_bytes, config=config)
    idx = random_indices((1, 2, 40, 30), 300, seed=span)
    check_all(idx, 40, 300, True, 16, 32, pool_bytes=pool_bytes, config=config)


@pytest.mark.parametrize("case", ["random", "window", "several-spans"])
def test_tiles_and_keys(case):
    """``indices_to_tiles_triton`` (the tiles with pass 2's transpose keys)."""
    if case == "random":
        idx = random_indices((2, 1, 77, 9), 91, seed=3)
        check_tiles(idx, 77, 91, True, 32, 16)
    elif case == "window":
        check_tiles(window(200, 200, left=150, order="descending", dup=True), 200, 200, False,
                    64, 64)
    else:
        config = dict(SPAN=4, CHUNK=32, num_warps=4, programs_per_sm=1)
        check_tiles(window(70, 90, left=50, right=10, order="shuffled"), 70, 90, False, 32, 64,
                    pool_bytes=2000, config=config)


FAST_CONFIG = dict(SPAN=16, CHUNK=16, num_warps=4, programs_per_sm=1, FAST=True, STAGES=2)


@pytest.mark.parametrize("case,rescanned", [
    ("ascending", False), ("descending", False), ("int64", False), ("short-last-tile", False),
    ("shuffled", True), ("outside-span", True), ("random", True)])
def test_fast_scan(case, rescanned):
    """Widths that ``CHUNK`` divides take the fast scan; rows it cannot hold (more than two
    words of a query in a chunk, words outside the span) are rescanned by the general one,
    and the layout is the same either way."""
    q_len, k_len, config = 96, 96, dict(FAST_CONFIG)
    if case in ("ascending", "int64", "short-last-tile"):
        q_len = 90 if case == "short-last-tile" else q_len
        idx = window(q_len, k_len, left=40, right=3, pad_to=48)
    elif case == "descending":
        idx = window(q_len, k_len, left=40, right=3, order="descending", pad_to=48)
    elif case == "shuffled":
        idx = window(q_len, k_len, left=40, right=3, order="shuffled", pad_to=48)
    elif case == "outside-span":  # a row's 75 keys cover 3 or 4 words, the span 2
        config["SPAN"] = 2
        idx = window(q_len, k_len, left=40, right=3, pad_to=48)
    else:
        idx = random_indices((1, 2, q_len, 32), k_len, seed=5)
    if case == "int64":
        idx = idx.long()
    for is_causal in (False, True):
        check_all(idx, q_len, k_len, is_causal, 32, 32, config=config)
        assert (indices_triton.LAST_BUILD["rescanned_rows"] > 0) == rescanned, \
            indices_triton.LAST_BUILD
    check_all(idx, q_len, k_len, True, 32, 32, config=dict(config, FAST=False))


def test_fast_scan_finds_out_of_range_indices():
    idx = window(96, 96, left=40, right=3, pad_to=48).int()
    idx[0, 0, 50, 47] = 96
    with pytest.raises(ValueError, match=r"found 96 at position \(0, 0, 50, 47\)"):
        layout_tensors_triton(idx.to(DEVICE), 96, 96, True, 32, 32, config=FAST_CONFIG)


@pytest.mark.parametrize("case,held", [
    ("causal-window", True), ("two-sided", True), ("Lq<Lk", True), ("Lq>Lk", True),
    ("int64", True), ("short-last-tile", True), ("empty-rows", True), ("trailing-pad", False),
    ("descending", False), ("hole", False), ("outside-span", False), ("out-of-range", False)])
def test_window_scan(case, held):
    """Rows whose slots hold ``i - W + 1 + arange(W)`` style windows (keys clipped to -1 at
    either end) are held by pass 1's window scan; anything else (a window padded at the end,
    reversed, a key missing, wider than the span) goes to the other scans. Same layout."""
    q_len, k_len, config = 96, 96, dict(FAST_CONFIG)
    idx = window(q_len, k_len, left=47)
    if case == "two-sided":
        idx = window(q_len, k_len, left=40, right=7)
    elif case == "Lq<Lk":
        q_len, k_len, idx = 90, 130, window(90, 130, left=47)
    elif case == "Lq>Lk":
        q_len, k_len, idx = 100, 60, window(100, 60, left=31)
    elif case == "int64":
        idx = idx.long()
    elif case == "short-last-tile":
        q_len, idx = 90, window(90, k_len, left=47)
    elif case == "empty-rows":
        idx[:, :, 40:70] = -1
    elif case == "trailing-pad":
        idx = window(q_len, k_len, left=40, right=3, pad_to=48)
    elif case == "descending":
        idx = window(q_len, k_len, left=47, order="descending")
    elif case == "hole":
        idx[0, 0, 70, 20] = -1
    elif case == "outside-span":
        config["SPAN"] = 2
    for is_causal in (False, True):
        if case == "out-of-range":
            bad = idx.clone()
            bad[0, 0, 70, 20] = k_len
            with pytest.raises(ValueError, match=rf"found {k_len} at position \(0, 0, 70, 20\)"):
                layout_tensors_triton(bad.to(DEVICE), q_len, k_len, is_causal, 32, 32,
                                      config=config)
            assert indices_triton.LAST_BUILD["window_rows"] < indices_triton.LAST_BUILD["rows"]
            continue
        check_all(idx, q_len, k_len, is_causal, 32, 32, config=config)
        build = indices_triton.LAST_BUILD
        assert (build["window_rows"] == build["rows"]) == held, build
        assert build["rescanned_rows"] == 0 or not held, build
    check_all(idx, q_len, k_len, True, 32, 32, config=dict(config, WINDOW=False))
    assert indices_triton.LAST_BUILD["window_rows"] == 0


def test_capacity_reuse():
    """A second build of a shape allocates the first one's tile counts (plus 1/16) and syncs
    once, at the end: right when the new layout fits, redone when it needs more room, copied
    to its own storage when it used less than half, and index errors still raise."""
    indices_triton.forget_capacities()
    shape = (1, 2, 100, 24)
    sparse = window(100, 100, left=2, pad_to=24).expand(shape).contiguous()  # the diagonal
    dense = random_indices(shape, 100, seed=2)
    steps = [("first", sparse), ("same", sparse), ("more tiles", dense), ("fewer tiles", sparse)]
    for name, idx in steps:
        tensors = check_all(idx, 100, 100, True, 16, 16)
        key = next(reversed(indices_triton._CAPACITY))
        cap_f, cap_p = indices_triton._CAPACITY[key]
        n_full, n_part = tensors["full_col"].numel(), tensors["part_col"].numel()
        assert n_full <= cap_f <= n_full + n_full // 16 + 16, name
        assert n_part <= cap_p <= n_part + n_part // 16 + 16, name
        storage = tensors["masks"].untyped_storage().nbytes()
        if name == "fewer tiles":  # copied out of the dense layout's room
            assert storage == tensors["masks"].numel() * 4
    bad = sparse.clone()
    bad[0, 1, 50, 2] = 100
    with pytest.raises(ValueError, match=r"found 100 at position \(0, 1, 50, 2\)"):
        layout_tensors_triton(bad.to(DEVICE), 100, 100, True, 16, 16)
    tensors, _ = layout_tensors_triton(sparse.to(DEVICE), 100, 100, True, 16, 16,
                                       reuse_capacity=False)  # exact: no room to spare
    in_buffer = sum(t.numel() for name, t in tensors.items()
                    if name not in ("full_ptr", "part_ptr"))  # those two: the zeroed buffer
    assert tensors["masks"].untyped_storage().nbytes() == in_buffer * 4


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int16, torch.uint8],
                         ids=str)
def test_dtypes_strides_and_layout(dtype):
    """Index dtypes, broadcast (stride 0) and sliced inputs, and the full layout through
    ``build_layout``."""
    base = window(90, 90, left=40, right=3, order="shuffled")
    if dtype == torch.uint8:
        base = base.clamp(min=0)
    idx = base.expand(2, 3, -1, -1).to(dtype)  # stride 0 over batch and heads
    ours = build_layout(idx.to(DEVICE), 90, is_causal=True, block_m=32, block_n=16,
                        method="triton")
    want = build_layout(idx, 90, is_causal=True, block_m=32, block_n=16, method="numba")
    assert ours.nnz == want.nnz
    for name in LAYOUT_TENSORS:
        assert torch.equal(getattr(ours, name).cpu(), getattr(want, name)), name
    check_layout_invariants(ours.to("cpu"))
    if dtype in (torch.int32, torch.int64):  # a strided view, read in place
        wide = torch.cat([base, torch.full_like(base, 7)], dim=-1).to(dtype)[..., ::2]
        got = indices_to_tiles_triton(wide.to(DEVICE), 90, 90, False, 16, 16)
        assert_same_tiles(got, indices_to_tiles_torch(wide, 90, 90, False, 16, 16))


@pytest.mark.parametrize("bad", [-2, 50, 2**31 - 1, 2**32 + 3, -(2**40)])
def test_out_of_range_index_is_an_error(bad):
    idx = window(40, 50, left=10)
    idx = idx.long() if abs(bad) >= 2**31 else idx.int()
    idx[0, 0, 17, 3] = bad
    with pytest.raises(ValueError, match=rf"found {bad} at position \(0, 0, 17, 3\)"):
        build_layout(idx.to(DEVICE), 50, block_m=16, block_n=16, method="triton")


def test_long_key_tile_lists():
    """Key tiles with more full and more partial entries than ``rank_tiles_kernel`` sorts in
    one block (32): 40 to 80 entries per list, in two batches."""
    q_len, k_len = 16 * 80, 32
    idx = torch.arange(k_len).repeat(q_len, 1)
    odd = (torch.arange(q_len) // 16) % 2 == 1  # every other query tile drops a key
    idx[odd, torch.arange(q_len)[odd] % k_len] = -1
    idx = torch.stack([idx, idx.roll(16, 0)])[:, None]  # (2, 1, Lq, W)
    tensors = check_all(idx, q_len, k_len, False, 16, 16)
    assert tensors["full_ptr_t"].diff().max() > 32 and tensors["part_ptr_t"].diff().max() > 32


def test_empty_inputs():
    for q_len, width, k_len in ((0, 4, 10), (40, 0, 10), (40, 3, 0)):
        idx = torch.full((1, 2, q_len, width), -1, dtype=torch.int64)
        got = indices_to_tiles_triton(idx.to(DEVICE), q_len, k_len, True, 16, 32)
        assert_same_tiles(got, indices_to_tiles_torch(idx, q_len, k_len, True, 16, 32))
        layout = build_layout(idx.to(DEVICE), k_len, method="triton", block_m=16, block_n=32)
        assert layout.num_tiles == 0 and layout.nnz == 0


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("block_m,block_n", [(64, 64), (128, 64), (16, 256)], ids=str)
def test_gpu_larger_patterns_match_torch(dtype, block_m, block_n):
    """L=4096 on the GPU: the benchmark's causal sliding window (ascending, padded at the
    start), a descending one, random top-k with duplicates; and ``auto`` picks triton."""
    length, heads = 4096, 2
    i = torch.arange(length, device="cuda")[:, None]
    asc = i - 511 + torch.arange(512, device="cuda")
    patterns = {
        "window": torch.where(asc >= 0, asc, -1),
        "window-desc": torch.where(asc >= 0, asc, -1).flip(-1),
        "topk": (torch.rand(length, 700, device="cuda") * (i + 1)).long(),
    }
    for name, idx in patterns.items():
        idx = idx.to(dtype)[None, None].expand(1, heads, -1, -1).contiguous()
        got = indices_to_tiles_triton(idx, length, length, True, block_m, block_n)
        want = indices_to_tiles_torch(idx, length, length, True, block_m, block_n)
        assert_same_tiles(got, want, name)
    ours = build_layout(idx, length, is_causal=True, block_m=block_m, block_n=block_n)
    want = build_layout(idx, length, is_causal=True, block_m=block_m, block_n=block_n,
                        method="torch")
    for name in LAYOUT_TENSORS:
        assert torch.equal(getattr(ours, name), getattr(want, name)), name


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_repeated_builds_reuse_the_capacity():
    """Repeated builds of a shape reuse the capacity and the cached plan: the same layout
    every time, also for an int64 copy and a view that is not 16-byte aligned (other
    specializations of the kernels)."""
    length = 4096
    i = torch.arange(length, device="cuda")[:, None]
    wide = i - 512 + torch.arange(513, device="cuda")
    wide = torch.where(wide >= 0, wide, -1).int()[None, None].expand(1, 2, -1, -1).contiguous()
    for idx in (wide[..., 1:], wide[..., 1:].contiguous(), wide[..., 1:].long()):
        want = build_layout(idx, length, is_causal=True, block_m=64, block_n=64,
                            method="torch")
        for _ in range(3):
            got = build_layout(idx, length, is_causal=True, block_m=64, block_n=64)
            for name in LAYOUT_TENSORS:
                assert torch.equal(getattr(got, name), getattr(want, name)), name
