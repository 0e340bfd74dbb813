"""``kernels.launch.Launcher``'s cache key: a compiled kernel is reused only for arguments
it was compiled for. (The direct launch itself needs a GPU and Triton 3.6: the GPU tests
of the layout build run it.)"""

import pytest
import torch
import triton
import triton.language as tl

from blocksparse_fsa.kernels.launch import Launcher


@triton.jit
def _kernel(x_ptr, n, scale, BLOCK: tl.constexpr, FLAG: tl.constexpr = False):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * scale, mask=offs < n)


def key(**kwargs):
    args = dict(x_ptr=torch.zeros(64), n=32, scale=2.0, BLOCK=32)
    return Launcher(_kernel).key({**args, **kwargs})[1]


def test_constexprs_are_keyed_by_value():
    """Two tile sizes that are both multiples of 16 are two kernels (session 7's bug: they
    shared one, and the layout build of the second tile shape came out wrong)."""
    assert key(BLOCK=16) != key(BLOCK=32)
    assert key(FLAG=True) != key(FLAG=1)
    assert key(FLAG=False) == key()  # the default


def test_plain_ints_are_keyed_as_triton_specializes_them():
    """Ints: by 1, divisibility by 16 and width only; tensors by dtype and 16-byte alignment;
    launch options by value."""
    assert key(n=32) == key(n=48)
    assert key(n=32) != key(n=33) != key(n=1)
    assert key(n=2**31) != key(n=32)
    x = torch.zeros(64)
    assert key(x_ptr=x[4:]) == key()
    assert key(x_ptr=x[1:]) != key()
    assert key(x_ptr=x.double()) != key()
    assert key(num_warps=4) != key(num_warps=8)


def test_a_bound_launch_has_the_key_of_a_full_one():
    """``bind`` fixes some arguments (launch options too); its launches key the rest as a full
    launch would, and reject arguments that are not left free."""
    launcher = Launcher(_kernel)
    bound = launcher.bind(n=32, BLOCK=32, num_warps=4)
    x = torch.zeros(64)
    for free in (dict(x_ptr=x, scale=2.0), dict(x_ptr=x[1:], scale=3.0, FLAG=True)):
        assert bound.key_of(free) == launcher.key(dict(n=32, BLOCK=32, num_warps=4, **free))
    with pytest.raises(TypeError, match="left free"):
        bound((1,), x_ptr=x, scale=1.0, BLOCK=16)
    with pytest.raises(TypeError, match="missing argument 'scale'"):
        bound.key_of(dict(x_ptr=x))
