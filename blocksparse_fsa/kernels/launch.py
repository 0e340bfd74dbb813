"""Launching a Triton kernel for less host time than ``kernel[grid](...)``.

A launch through ``JITFunction.run`` binds and specializes every argument, looks up the
compiled kernel and builds launch metadata: ~20 us plus ~2 us an argument on the H200 host
(``benchmarks/NOTES.md``, session 6), 50-90 us for the layout build's kernels of ~30
arguments. :class:`Launcher` keeps the compiled kernel of each specialization it has seen
(the first launch of one goes through ``kernel[grid]``, which compiles and launches it) and
launches it again through its launcher, ~10 us. ``Launcher(kernel).bind(**scalars)`` fixes
the arguments of one problem shape once; the bound launcher takes the rest per launch.

The key of a specialization holds at least what Triton specializes on (a tensor's dtype and
16-byte alignment; an int's value 1, divisibility by 16 and width; every ``tl.constexpr``
parameter by value, whatever its type; the launch options), so a cached kernel is only
reused for arguments it was compiled for. (Until session 7 constexpr ints were keyed like
plain ints: a second tile shape whose constants differed only by multiples of 16 reused the
first one's kernel and built wrong layouts.) The
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
    """What Triton's specialization can depend on for one non-constexpr argument value."""
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int, value == 1, value % 16 == 0, -2**31 <= value < 2**31, value >= 2**63
    if isinstance(value, float):
        return float
    return value  # dtypes, None


class Launcher:
    """The compiled kernels of one Triton kernel by specialization; ``bind`` gives the
    launcher of one problem shape."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled = {}
        self.enabled = _enabled()
        # the Python function's parameters (the interpreter's kernels have no ``params``)
        params = inspect.signature(kernel.fn).parameters.values()
        self.names = [p.name for p in params]
        self.names_set = set(self.names)
        self.constexpr = ["constexpr" in str(p.annotation) for p in params]
        self.defaults = {p.name: p.default for p in params
                         if p.default is not inspect.Parameter.empty}

    def key(self, kwargs) -> tuple:
        """The arguments in order and the cache key of their specialization."""
        args = [kwargs[n] if n in kwargs else self.defaults[n] for n in self.names]
        options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in self.names_set))
        spec = tuple((type(a), a) if const else _spec(a) for a, const in zip(args,
                                                                           self.constexpr))
        return args, spec + options

    def bind(self, **static) -> "Bound":
        """This kernel with some arguments fixed (the scalars of one problem shape): a launch
        then passes only the others, and the cache key of the fixed ones is computed once."""
        return Bound(self, static)

    def run(self, grid, args, key, kwargs):
        """Launch with ``args`` in order whose specialization is ``key``: the compiled kernel
        directly, or the first time ``kernel[grid](**kwargs)``."""
        driver = triton.runtime.driver.active
        device = driver.get_current_device()  # a kernel is loaded per device
        kernel = self.compiled.get((device, key))
        if kernel is None:
            self.compiled[device, key] = self.kernel[grid](**kwargs)
            return
        grid = tuple(grid) + (1, 1)
        stream = driver.get_current_stream(device)
        kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata,
                   None, None, None, *args)


class Bound:
    """``Launcher.bind``'s result: ``bound(grid, **other_args)`` launches the kernel with
    every argument by name, as ``kernel[grid](**args)`` would; the launch options (such as
    ``num_warps``) are among the fixed arguments."""

    def __init__(self, launcher, static):
        self.launcher = launcher
        self.static = static
        names = launcher.names
        placeholders = {n: None for n in names if n not in static and n not in launcher.defaults}
        args, key = launcher.key(static | placeholders)
        self.args, self.key, self.options = args, list(key[:len(names)]), key[len(names):]
        self.free = [(i, name, launcher.constexpr[i], name in placeholders)
                     for i, name in enumerate(names) if name not in static]
        self.free_names = {name for _, name, _, _ in self.free}

    def __call__(self, grid, **kwargs):
        launcher = self.launcher
        if not kwargs.keys() <= self.free_names:
            raise TypeError(f"not arguments of {launcher.kernel.fn.__name__} left free: "
                            f"{sorted(kwargs.keys() - self.free_names)}")
        if not launcher.enabled or _hooked():
            return launcher.kernel[grid](**self.static, **kwargs)
        args, key = self.key_of(kwargs)
        return launcher.run(grid, args, key, self.static | kwargs)

    def key_of(self, kwargs) -> tuple:
        """``Launcher.key`` of the fixed arguments with ``kwargs``."""
        args, key = self.args.copy(), self.key.copy()
        for i, name, const, required in self.free:
            if name in kwargs:
                value = args[i] = kwargs[name]
                key[i] = (type(value), value) if const else _spec(value)
            elif required:
                raise TypeError(f"{self.launcher.kernel.fn.__name__}: missing argument "
                                f"{name!r}")
        return args, tuple(key) + self.options
