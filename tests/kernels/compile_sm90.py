"""Compile every kernel variant the public API launches for a Hopper GPU (sm_90), on the CPU.

The interpreter runs the kernels' Python, not Triton's compiler: a kernel can pass every CPU
test and still fail to compile (a constexpr-dead branch that does not type-check, a layout the
backend rejects). This script, run without ``TRITON_INTERPRET`` (``tests/kernels/
test_compile_sm90.py`` does), replaces ``JITFunction.run`` by an offline ``triton.compile`` for
``GPUTarget("cuda", 90, 32)`` with the launch's real arguments, then drives
``sparse_attn_func`` forward and backward through the variants on small CPU tensors (the
kernels do not run: their outputs are garbage, only compilation is checked).
Prints one line per compiled kernel variant and exits non-zero on the first failure.
``--tma 0`` / ``--tma 1`` compile only the variants without / with TMA loads and
``--skip-layout-build`` leaves out the layout build's kernels, so that the test can run the
halves in two processes (one core each under pytest-xdist); without options, everything. The
TMA half also compiles the non-default ``config.PARTIAL_LOADS`` modes on one variant.
"""

import argparse
import itertools
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

import blocksparse_fsa as bsa
from blocksparse_fsa.api import attention
from blocksparse_fsa.kernels import common, config

TARGET = GPUTarget("cuda", 90, 32)
LENGTH = 256  # / 2 a multiple of the 64-token tiles: the dilation order is computed
_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
           torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8",
           torch.bool: "i1"}
_seen = set()


def _type_of(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i64" if abs(value) >= 2**31 else "i32"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def _signature(value, path, constexprs, attrs, specialize=True):
    """Triton's type of one launch argument (of a tuple's elements, recursively), recording at
    ``path`` the constants and the 16-divisibility hints a launch would."""
    if isinstance(value, tuple):
        return tuple(_signature(v, path + (j,), constexprs, attrs, specialize)
                     for j, v in enumerate(value))
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if value is None or (specialize and is_int and value == 1):
        # as a launch does: None and an int argument equal to 1 become constants
        constexprs[path] = value
        return "constexpr"
    if (is_int and value % 16 == 0) or isinstance(value, torch.Tensor):
        attrs[path] = [["tt.divisibility", 16]]  # (CPU tensors: assumed aligned)
    return _type_of(value)


def compile_offline(self, *args, grid, warmup, **kwargs):
    """Stand-in for ``JITFunction.run``: compile this launch for sm_90, launch nothing."""
    options = {name: kwargs.pop(name) for name in ("num_warps", "num_stages", "maxnreg")
               if name in kwargs}
    bound = dict(zip(self.arg_names, args), **kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(self.params):
        value = bound.get(param.name, param.default)
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(i,)] = value
        else:
            signature[param.name] = _signature(value, (i,), constexprs, attrs,
                                               specialize=not param.do_not_specialize)
    key = (self.fn.__name__, repr(sorted(signature.items())),
           repr(sorted((k, str(v)) for k, v in constexprs.items())), repr(sorted(attrs)),
           tuple(options.items()))
    if key not in _seen:
        _seen.add(key)
        triton.compile(ASTSource(fn=self, signature=signature, constexprs=constexprs,
                                 attrs=attrs), target=TARGET, options=options)
        flags = {self.params[k[0]].name for k, v in constexprs.items()
                 if len(k) == 1 and isinstance(v, bool) and v}
        absent = {self.params[k[0]].name for k, v in constexprs.items()
                  if len(k) == 1 and v is None}
        print(f"ok {self.fn.__name__} {options} {sorted(flags)}"
              + (f" without {sorted(absent)}" if absent else ""), flush=True)


def variants():
    """(name, sparse_attn_func keyword arguments, make bias?) covering every constexpr path."""
    g = torch.Generator().manual_seed(0)
    length = LENGTH
    idx = torch.randint(0, length, (1, 2, length, 16), generator=g)
    window = (torch.arange(length)[:, None] - torch.arange(48)[None, :]).clamp(min=-1)
    tiles = bsa.build_layout(idx, length, is_causal=True, kernel="tiles")
    gather = bsa.build_layout(idx, length, is_causal=True, kernel="gather")
    dilated = bsa.build_layout(window[None, None].expand(1, 2, -1, -1), length, is_causal=True,
                               reorder=("dilation", 2))
    assert dilated.perm_dilation == 2  # the computed order, not the gathered one
    yield "tiles", dict(layout=tiles), None
    yield "tiles+softcap+lse", dict(layout=tiles, softcap=3.0, return_lse=True), None
    yield "tiles+bias row (kv heads)", dict(layout=tiles), (1, 2, 1, length)
    yield "tiles+bias row (q heads)", dict(layout=tiles), (1, 8, 1, length)
    yield "tiles+bias full", dict(layout=tiles), (1, 8, length, length)
    yield "permuted+bias", dict(layout=dilated), (1, 2, 1, length)
    shuffled = tiles.reordered((torch.randperm(length, generator=g),) * 2)
    yield "permuted (gathered order)", dict(layout=shuffled), None
    yield "gather+softcap+lse", dict(layout=gather, softcap=3.0, return_lse=True), None


def layout_builds():
    """Compile the Triton layout build (``build_layout(method="triton")``) per index dtype and
    tile shape. Its first pass does not run here, so its counts come from zero-filled buffers
    (empty outputs) to reach the second pass."""
    from blocksparse_fsa.preprocess.triton import build as triton_build
    triton_build.new_int = lambda shape, dtype, device: torch.zeros(shape, dtype=dtype,
                                                                    device=device)
    g = torch.Generator().manual_seed(0)
    for dtype, (bm, bn) in itertools.product((torch.int32, torch.int64),
                                              ((64, 64), (128, 32), (16, 256))):
        print(f"-- layout build, {dtype}, {bm}x{bn}", flush=True)
        idx = torch.randint(-1, 200, (1, 2, 200, 16), generator=g, dtype=dtype)
        bsa.build_layout(idx, 200, is_causal=True, block_m=bm, block_n=bn, method="triton")
        # the fast scan (a width its chunk divides); one row and k_len 1: arguments equal to
        # 1 become constants
        idx = torch.zeros(1, 1, 33, 128, dtype=dtype)
        bsa.build_layout(idx, 1, is_causal=True, block_m=bm, block_n=bn, method="triton")


def range_masks():
    """Compile the bit kernel of the window / packed-sequence layouts per causality and tile
    shape (``api.window.analytic_layout`` launches it on a GPU)."""
    from blocksparse_fsa.preprocess.ranges import range_tiles
    from blocksparse_fsa.preprocess.triton.ranges import range_masks_triton
    for (cu_q, cu_k), causal, (bm, bn) in itertools.product(
            (([0, 300], [0, 300]), ([0, 70, 300], [0, 90, 300])), (False, True),
            ((64, 64), (128, 32), (16, 256))):
        print(f"-- window bits, {len(cu_q) - 1} sequence(s), causal={causal}, {bm}x{bn}",
              flush=True)
        tiles = range_tiles(cu_q, cu_k, 40, 3, 2, causal, bm, bn)
        range_masks_triton(torch.from_numpy(tiles.buffer), tiles.part_qt.size, causal, bm, bn)


def _compile_variant(kwargs, bias_shape, dtype, dim, backward):
    """Run ``sparse_attn_func`` (and its backward) on small CPU inputs: each kernel launch
    compiles offline."""
    q = torch.randn(1, LENGTH, 8, dim, dtype=dtype, requires_grad=backward)
    k, v = (torch.randn(1, LENGTH, 2, dim, dtype=dtype, requires_grad=backward)
            for _ in range(2))
    inputs = [q, k, v]
    if bias_shape is not None:
        kwargs = dict(kwargs, attn_bias=torch.randn(bias_shape, dtype=dtype,
                                                    requires_grad=backward))
        inputs.append(kwargs["attn_bias"])
    out = bsa.sparse_attn_func(q, k, v, backend="triton", **kwargs)
    if backward:
        loss = sum(t.float().sum() for t in (out if isinstance(out, tuple) else (out,)))
        torch.autograd.grad(loss, inputs)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Compile every kernel variant for sm_90 offline.")
    ap.add_argument("--tma", type=int, choices=(0, 1), default=None,
                    help="only the variants without (0) or with (1) TMA loads (default: both)")
    ap.add_argument("--warp-specialize", action="store_true",
                    help="also compile the warp-specialized forward (TMA variants, bf16 D=128)")
    ap.add_argument("--skip-layout-build", action="store_true",
                    help="leave out the Triton layout build's kernels")
    args = ap.parse_args(argv)
    JITFunction.run = compile_offline
    # CPU tensors reach the (compile-only) kernels: the API's device check would refuse them
    attention.check_backend = lambda backend, query: "triton"
    cases = ((torch.bfloat16, 64), (torch.float16, 128), (torch.bfloat16, 256))
    common._runs_tma = lambda t: True
    for tma, (dtype, dim), (name, kwargs, bias_shape) in itertools.product(
            (False, True) if args.tma is None else (bool(args.tma),), cases, variants()):
        # with and without TMA loads; CPU tensors, so the device check is bypassed
        config.TMA = config.TMA_DILATION = tma
        print(f"-- {name}, {dtype}, D={dim}{', TMA' if tma else ''}", flush=True)
        _compile_variant(kwargs, bias_shape, dtype, dim, backward=True)
    if args.tma in (None, 1):  # the other ways partial tiles read a guarded operand
        config.TMA = config.TMA_DILATION = True
        default = config.PARTIAL_LOADS
        for mode in ("pointer", "select", "branch"):
            if mode != default:
                config.PARTIAL_LOADS = mode
                print(f"-- tiles, PARTIAL_LOADS={mode!r}, TMA", flush=True)
                _compile_variant(dict(next(variants())[1]), None, torch.bfloat16, 128,
                                 backward=True)
        config.PARTIAL_LOADS = default
    if args.warp_specialize:
        config.TMA = config.TMA_DILATION = config.WARP_SPECIALIZE = True
        for name, kwargs, bias_shape in variants():
            print(f"-- {name}, warp-specialized forward", flush=True)
            _compile_variant(kwargs, bias_shape, torch.bfloat16, 128, backward=False)
        config.WARP_SPECIALIZE = False
    if not args.skip_layout_build:
        layout_builds()
        range_masks()
    print(f"compiled {len(_seen)} kernel variants for sm_90")


if __name__ == "__main__":
    sys.exit(main())
