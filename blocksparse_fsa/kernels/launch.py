"""Launching a Triton kernel for less host time than ``kernel[grid](...)``.

A launch through ``JITFunction.run`` binds and specializes every argument, looks up the
compiled kernel and builds launch metadata: ~20 us plus ~2 us an argument on the H200 host
(``benchmarks/NOTES.md``, session 6), 50-90 us for the layout build's kernels of ~30
arguments. :class:`Launcher` keeps the compiled kernel of each specialization it has seen
(the first launch of one goes through ``kernel[grid]``, which compiles and launches it) and
launches it again through its launcher, ~10 us.

The key of a specialization holds at least what Triton specializes on (a tensor's dtype and
16-byte alignment; an int's value 1, divisibility by 16 and width; constexprs by value; the
launch options), so a cached kernel is only reused for arguments it was compiled for. The
direct path needs the compiled kernel's ``run(grid, stream, function, packed_metadata,
launch_metadata, hooks, *args)`` of the Triton versions in ``TRITON_VERSIONS`` (tested on
3.6); any other version, the CPU interpreter, a launch hook (a profiler's) or
``BSA_FAST_LAUNCH=0`` take ``kernel[grid]`` every time.
"""

import inspect
import os

import torch
import triton

TRITON_VERSIONS = ("3.6.",)


def _enabled() -> bool:
    return (triton.__version__.startswith(TRITON_VERSIONS)
            and os.environ.get("TRITON_INTERPRET") != "1"
            and os.environ.get("BSA_FAST_LAUNCH", "1") != "0")


def _hooked() -> bool:
    """Whether a launch hook (a profiler's) is installed: Triton 3.6 keeps them in a chain."""
    hook = triton.knobs.runtime.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))


def _spec(value):
    """What Triton's specialization can depend on for one argument value."""
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int, value == 1, value % 16 == 0, -2**31 <= value < 2**31, value >= 2**63
    if isinstance(value, float):
        return float
    return value  # constexprs (ints above), dtypes, None


class Launcher:
    """``Launcher(kernel)(grid, **args)``: launch ``kernel`` with every argument by name (and
    launch options such as ``num_warps``), as ``kernel[grid](**args)`` would."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled = {}
        self.enabled = _enabled()
        if self.enabled:
            self.names = list(kernel.arg_names)
            self.names_set = set(self.names)
            self.defaults = {p.name: p.default for p in kernel.params
                             if p.default is not inspect.Parameter.empty}

    def __call__(self, grid, **kwargs):
        if not self.enabled or _hooked():
            return self.kernel[grid](**kwargs)
        args = [kwargs[n] if n in kwargs else self.defaults[n] for n in self.names]
        options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in self.names_set))
        key = tuple(map(_spec, args)) + options
        kernel = self.compiled.get(key)
        if kernel is None:
            self.compiled[key] = self.kernel[grid](**kwargs)
            return
        grid = tuple(grid) + (1, 1)
        driver = triton.runtime.driver.active
        stream = driver.get_current_stream(driver.get_current_device())
        kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata,
                   None, None, None, *args)
