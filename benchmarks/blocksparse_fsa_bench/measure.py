"""Running the systems of one (pattern, L): the correctness check against ours, the timings
(``do_bench``, peak memory, host time per call), FLOP counts and progress reporting (see
:mod:`blocksparse_fsa_bench.cli` for the method)."""

from __future__ import annotations

import gc
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import torch

from .patterns import Pattern, PatternBuilder
from .systems import (CHECKERS, DENSE_SYSTEMS, SYSTEM_SETUPS, SYSTEMS, Inputs, Skipped,
                      SystemRun, make_inputs, short_error, sync, timed)

PASSES = ("fwd", "fwdbwd")
FWDBWD_FLOP_FACTOR = 3.5
REL_TOL = 2e-2


def pattern_flops(nnz: float, batch: int, heads_q: int, head_dim: int, pass_name: str) -> float:
    """FLOPs of attention over ``nnz`` pairs per (batch, query head): 4 nnz D Hq B, x3.5 fwdbwd."""
    fwd = 4.0 * nnz * head_dim * heads_q * batch
    return fwd * (FWDBWD_FLOP_FACTOR if pass_name == "fwdbwd" else 1.0)


def dense_causal_flops(batch: int, heads_q: int, seq_len: int, head_dim: int,
                       pass_name: str) -> float:
    """FLOPs of dense causal attention (Lq == Lk): nnz = L (L + 1) / 2 per head."""
    return pattern_flops(seq_len * (seq_len + 1) / 2, batch, heads_q, head_dim, pass_name)


def tflops(flops: float, ms: float | None) -> float | None:
    return None if not ms else flops / ms / 1e9



@dataclass
class Row:
    pattern: str
    seq_len: int
    system: str
    pass_name: str
    status: str = "ok"
    ms: float | None = None
    tflops: float | None = None
    dense_tflops: float | None = None
    speedup_vs_flex: float | None = None
    rel_err: float | None = None
    nan_count: int | None = None
    peak_mb: float | None = None
    host_us: float | None = None
    layout_ms: float | None = None
    layout_first_ms: float | None = None
    layout_mb: float | None = None
    density: float | None = None
    nnz: int | None = None  # distinct pairs summed over the KV heads (mean over the batch)
    first_call_s: float | None = None
    note: str = ""

    def as_dict(self) -> dict:
        return {("pass" if k == "pass_name" else k): v for k, v in asdict(self).items()}


def free_memory() -> None:
    """Collect garbage and return cached GPU memory between systems."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float32 (nan if either holds a NaN)."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def bench_ms(fn, leaves, args, device) -> float:
    """Median ms of ``fn`` by ``triton.testing.do_bench`` (a plain loop off CUDA, for tests)."""
    if torch.device(device).type != "cuda":
        times = [timed(fn, device)[1] for _ in range(3)]
        return sorted(times)[1]
    import triton.testing
    return triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep,
                                   grad_to_none=list(leaves) or None, return_mode="median")


def peak_mb(fn, leaves, device) -> float | None:
    """Peak extra GPU memory (MiB) of one ``fn()`` over what was allocated before it."""
    if torch.device(device).type != "cuda":
        return None
    for t in leaves:
        t.grad = None
    free_memory()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for t in leaves:
        t.grad = None
    return peak / 2**20


def host_calls(ms: float) -> int:
    """Calls for ``host_us``: 20, fewer when they would queue more than ~100 ms of GPU work
    (which the next measurement would wait for), at least 3."""
    return max(3, min(20, round(100 / ms))) if ms else 20


def host_us(fn, leaves, device, calls: int = 20) -> float:
    """Host time (us) to issue one ``fn()``: ``calls`` back-to-back calls with no
    synchronization between them, so the GPU work queues up and what is timed is the Python,
    dispatch and launch overhead (the part a short kernel cannot hide). Off CUDA (tests) the
    calls run the work itself: two of them."""
    if torch.device(device).type != "cuda":
        calls = 2
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    sync(device)
    for t in leaves:
        t.grad = None
    return elapsed / calls * 1e6


def check_run(run: SystemRun, inp: Inputs, with_backward: bool, device):
    """One forward (+ backward) kept for the checks: (out, (dq, dk, dv) or None, seconds)."""
    for t in run.leaves:
        t.grad = None
    t0 = time.perf_counter()
    out = run.fwd()
    grads = None
    if with_backward:
        out.backward(inp.dout)
        grads = tuple(g.detach().clone() for g in run.grads())
    sync(device)
    seconds = time.perf_counter() - t0
    for t in run.leaves:
        t.grad = None
    return out.detach().clone(), grads, seconds


def _nan_count(*tensors) -> int:
    return int(sum(int(torch.isnan(t).sum()) for t in tensors if t is not None))


class Progress:
    """Where a sweep stands, on stderr: one step per (pattern, L, system, pass).

    A tqdm bar when tqdm is installed and the stream is a terminal, else one line per step,
    ``[3/40] sliding_window L=32768 flex fwd  (12 s)``, which also reads well in a log file.
    ``bar``: True / False force or refuse the bar (True still needs tqdm).
    """

    def __init__(self, total: int, stream=None, bar: bool | None = None):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self.stream = sys.stderr if stream is None else stream
        tqdm = _tqdm() if bar is not False else None
        if bar is None:
            tqdm = tqdm if self.stream.isatty() else None
        self._bar = None if tqdm is None else tqdm(total=total, file=self.stream,
                                                   unit="step", dynamic_ncols=True)

    def step(self, label: str, count: int = 1) -> None:
        """The next ``count`` steps start (more than one: steps that will not run)."""
        first, self.done = self.done + 1, min(self.done + count, self.total)
        if self._bar is not None:
            self._bar.update(first - 1 - self._bar.n)  # the steps before these are done
            self._bar.set_description_str(label)
            return
        where = f"{first}" if self.done <= first else f"{first}-{self.done}"
        print(f"[{where}/{self.total}] {label}  ({time.perf_counter() - self.t0:.0f} s)",
              file=self.stream, flush=True)

    def log(self, msg: str, file=None) -> None:
        """Print a line to ``file`` (default: the progress stream) without breaking the bar."""
        file = self.stream if file is None else file
        if self._bar is not None:
            self._bar.write(msg, file=file)
        else:
            print(msg, file=file, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.update(self.done - self._bar.n)
            self._bar.close()


def _tqdm():
    try:
        from tqdm import tqdm
    except ImportError:  # optional: the plain counter instead
        return None
    return tqdm


def run_system(system: str, pattern: Pattern, inp: Inputs, args, ref, device,
               progress: Progress | None = None) -> tuple[list, tuple]:
    """Rows (one per pass) of one system, and its (out, grads) for later checks."""
    rows = [Row(pattern.name, pattern.seq_len, system, p) for p in args.passes]
    with_backward = "fwdbwd" in args.passes
    run = None
    result = (None, None)
    step = "setup"
    announced = 0  # passes announced to ``progress``

    def announce(suffix: str = "", count: int = 1):
        nonlocal announced
        if progress is not None and announced < len(rows):
            progress.step(f"{pattern.name} L={pattern.seq_len} {system} "
                          f"{rows[announced].pass_name}{suffix}", count)
        announced += count

    try:
        announce()  # the first pass' step includes the setup and the check
        run = SYSTEM_SETUPS[system](pattern, inp, args)
        step = "check"
        out, grads, seconds = check_run(run, inp, with_backward, device)
        result = (out, grads)
        for row in rows:
            row.first_call_s, row.note = seconds, run.note
            row.layout_ms, row.layout_first_ms = run.layout_ms, run.layout_first_ms
            row.layout_mb, row.density = run.layout_mb, run.density
            if run.nnz is not None:
                row.nnz = round(run.nnz * pattern.groups / run.nnz_groups)
            bwd = row.pass_name == "fwdbwd"
            row.nan_count = _nan_count(out, *(grads if bwd else ()))
            if system == "ours":
                row.status = "ok"  # the reference; finalize() says whether others agree
            elif not run.checked:
                row.status = "unchecked"
            elif ref[0] is None:
                row.status = "unchecked"
                row.note = (row.note + "; " if row.note else "") + "no reference (ours failed)"
            else:
                errs = [rel_err(out, ref[0])]
                if bwd:
                    errs += [rel_err(a, b) for a, b in zip(grads, ref[1])]
                row.rel_err = max(errs) if not any(math.isnan(e) for e in errs) else math.nan
                row.status = "ok" if row.rel_err < REL_TOL else "mismatch"
        for i, row in enumerate(rows):
            step = f"{row.pass_name} timing"
            if i == announced:
                announce()
            fn = run.fwd if row.pass_name == "fwd" else run.fwdbwd
            leaves = run.leaves if row.pass_name == "fwdbwd" else ()
            row.peak_mb = peak_mb(fn, run.leaves, device)
            row.ms = bench_ms(fn, leaves, args, device)
            row.host_us = host_us(fn, run.leaves, device, calls=host_calls(row.ms))
    except Skipped as exc:
        for row in rows:
            row.status = f"skipped: {exc}"
    except Exception as exc:  # OOM, compile failure, ...: report and go on
        msg = short_error(exc)
        for row in rows:
            if row.ms is None:
                row.status, row.ms = f"error ({step}): {msg}", None
    finally:
        if run is not None:
            for t in run.leaves:
                t.grad = None
            if run.close is not None:
                run.close()
        del run
        free_memory()
        if announced < len(rows):  # passes that will not run after a skip or an error
            announce(f": {rows[announced].status}", len(rows) - announced)
    return rows, result


def finalize(rows: list[Row], pattern: Pattern, args, nnz_ref: int) -> None:
    """Fill nnz, TFLOP/s, ours' status and speed-ups of one (pattern, L) once all ran."""
    by = {(r.system, r.pass_name): r for r in rows}
    for p in args.passes:
        ours = by.get(("ours", p))
        if ours is not None and ours.status == "ok":
            verdicts = [by[(s, p)].status for s in CHECKERS if (s, p) in by]
            if ours.nan_count:
                ours.status = "mismatch"  # NaN in out or grads
            elif "ok" in verdicts:
                ours.status = "ok"
            elif "mismatch" in verdicts:
                ours.status = "mismatch"
            else:
                ours.status = "unverified"
        same = by.get(("ours_indices", p))  # checked against ours: as good as ours
        if same is not None and same.status == "ok" and ours is not None:
            same.status = ours.status
    nnz = by[("ours", args.passes[0])].nnz if ("ours", args.passes[0]) in by else None
    if nnz is None:
        nnz = nnz_ref
    elif nnz != nnz_ref:
        warnings.warn(f"{pattern.name} L={pattern.seq_len}: layout.nnz={nnz} but the pattern "
                      f"has {nnz_ref} distinct pairs")
    nnz_per_head = nnz / pattern.groups  # one (batch, KV head), averaged
    L = pattern.seq_len
    for r in rows:
        r.nnz = round(nnz_per_head * args.heads_kv)
        r.tflops = tflops(pattern_flops(nnz_per_head, args.batch, args.heads_q, args.head_dim,
                                        r.pass_name), r.ms)
        if r.system in DENSE_SYSTEMS:
            r.dense_tflops = tflops(dense_causal_flops(args.batch, args.heads_q, L,
                                                       args.head_dim, r.pass_name), r.ms)
    good = ("ok", "unchecked", "unverified")
    for p in args.passes:
        flex = by.get(("flex", p))
        if flex is None or flex.status not in good or not flex.ms:
            continue
        for s in SYSTEMS:
            r = by.get((s, p))
            if r is not None and r.status in good and r.ms:
                r.speedup_vs_flex = flex.ms / r.ms


def run_pattern(name: str, build: PatternBuilder, seq_len: int, args, device,
                progress: Progress | None = None) -> list[Row]:
    """All systems and passes of one (pattern, L); ``build`` from ``load_pattern``."""
    try:
        pattern = build(seq_len, args.heads_kv, device)
        if pattern.batch not in (1, args.batch):
            raise ValueError(f"the pattern has batch {pattern.batch}; expected 1 or --batch "
                             f"{args.batch}")
        nnz_ref = pattern.nnz()
        inp = make_inputs(args.batch, seq_len, args.heads_q, args.heads_kv, args.head_dim,
                          args.torch_dtype, device, seed=args.seed,
                          requires_grad="fwdbwd" in args.passes)
    except Exception as exc:
        msg = f"error (pattern): {short_error(exc)}"
        free_memory()
        if progress is not None:
            progress.step(f"{name} L={seq_len}: {msg}", len(args.systems) * len(args.passes))
        return [Row(name, seq_len, s, p, status=msg) for s in args.systems for p in args.passes]
    rows, ref = [], (None, None)
    for system in sorted(args.systems, key=SYSTEMS.index):  # ours first: it is the reference
        t0 = time.perf_counter()
        sys_rows, result = run_system(system, pattern, inp, args, ref, device, progress)
        if system == "ours":
            ref = result  # (None, None) if ours failed
        del result
        rows += sys_rows
        if progress is not None:
            progress.log(f"  {system:<12} {time.perf_counter() - t0:6.1f} s  "
                         f"{', '.join(sorted({r.status for r in sys_rows}))}")
    finalize(rows, pattern, args, nnz_ref)
    del pattern, inp, ref
    free_memory()
    return rows

