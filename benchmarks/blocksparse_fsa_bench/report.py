"""The benchmark's output: the console table and summary, run metadata, and the JSON / CSV /
PNG result files (see :mod:`blocksparse_fsa_bench.cli`)."""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
import re
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from .measure import PASSES, REL_TOL, Row
from .systems import DENSE_SYSTEMS, SYSTEMS

REPO = Path(__file__).resolve().parents[1]


_COLUMNS = (("pattern", "pattern", "{:<17}"), ("L", "seq_len", "{:>6}"),
            ("system", "system", "{:<12}"), ("pass", "pass_name", "{:<6}"),
            ("ms", "ms", "{:>9.3f}"), ("TFLOP/s", "tflops", "{:>7.1f}"),
            ("dense", "dense_tflops", "{:>6.1f}"), ("x_flex", "speedup_vs_flex", "{:>6.2f}"),
            ("rel_err", "rel_err", "{:>8.1e}"), ("nan", "nan_count", "{:>4}"),
            ("peak_MB", "peak_mb", "{:>8.0f}"), ("host_us", "host_us", "{:>7.0f}"),
            ("layout_ms", "layout_ms", "{:>9.1f}"),
            ("layout_MB", "layout_mb", "{:>9.1f}"), ("density", "density", "{:>7.3f}"),
            ("status", "status", "{}"))


def format_row(row: Row | None = None) -> str:
    """One table line (the header when ``row`` is None)."""
    cells = []
    for title, attr, fmt in _COLUMNS:
        width = int(re.search(r"(\d+)", fmt).group(1)) if re.search(r"\d", fmt) else 0
        if row is None:
            cells.append(title.ljust(width) if "<" in fmt or not width else title.rjust(width))
            continue
        value = getattr(row, attr)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            cells.append(("-" if value is None else "nan").rjust(width))
        else:
            cells.append(fmt.format(value))
    return "  ".join(cells)


def summary(rows: list[Row], seq_lens, sdpa_mask_max_len: int) -> list[str]:
    """The headline numbers: ours vs flex, vs dense causal flash, vs SDPA + dense mask."""
    idx = {(r.pattern, r.seq_len, r.system, r.pass_name): r for r in rows}
    L = 32768 if 32768 in seq_lens else max(seq_lens)
    lines = [f"Summary (L={L} unless noted)"]

    def fmt(x, spec="{:.2f}x"):
        return "n/a" if x is None else spec.format(x)

    patterns = list(dict.fromkeys(r.pattern for r in rows))
    for pat in patterns:
        if not any((pat, L, "flex", p) in idx for p in PASSES):
            continue  # flex not among the systems: nothing to say
        parts = [f"{p} {fmt(getattr(idx.get((pat, L, 'ours', p)), 'speedup_vs_flex', None))}"
                 for p in PASSES]
        lines.append(f"  {pat:<17} ours vs flex:  " + ", ".join(parts))
    cache = []
    for pat in patterns:
        a, b = idx.get((pat, L, "ours", "fwd")), idx.get((pat, L, "ours_indices", "fwd"))
        if a and b and a.host_us and b.host_us:
            cache.append(f"{pat} {b.host_us:.0f} vs {a.host_us:.0f}")
    if cache:
        lines.append("  host us per fwd call, attn_indices= (layout cache) vs layout=:  "
                     + ", ".join(cache))
    for pat in patterns:
        parts = []
        for p in PASSES:
            ours = idx.get((pat, L, "ours", p))
            if not (ours and ours.ms and ours.status == "ok"):
                continue
            for other in ("flex_flash", "fa4_window", "fa4_varlen"):
                r = idx.get((pat, L, other, p))
                if r and r.ms and r.status in ("ok", "unchecked", "unverified"):
                    parts.append(f"{p} {r.ms / ours.ms:.2f}x {other}")
            for dense_system in DENSE_SYSTEMS:
                d = idx.get((pat, L, dense_system, p))
                if d and d.dense_tflops and ours.tflops:
                    parts.append(f"{p} {ours.tflops:.0f} TFLOP/s = "
                                 f"{100 * ours.tflops / d.dense_tflops:.0f}% of {dense_system}'s "
                                 f"{d.dense_tflops:.0f}")
        if parts:
            lines.append(f"  {pat:<17} ours vs the frontier:  " + ", ".join(parts))
    mask_lens = [x for x in seq_lens if x <= sdpa_mask_max_len]
    if mask_lens:
        Lm = max(mask_lens)
        for pat in patterns:
            parts = []
            for p in PASSES:
                a, b = idx.get((pat, Lm, "ours", p)), idx.get((pat, Lm, "sdpa_mask", p))
                ok = (a and b and a.ms and b.ms and a.status == "ok" and b.status == "ok")
                parts.append(f"{p} {fmt(b.ms / a.ms if ok else None)}")
            if any("n/a" not in s for s in parts):
                lines.append(f"  {pat:<14} ours vs sdpa_mask (L={Lm}):  " + ", ".join(parts))
    return lines


def git_commit(repo: Path = REPO) -> str:
    """Short HEAD commit, '-dirty' if the tree has changes; 'unknown' without git/commits.

    ``BSA_COMMIT`` overrides it, for copies of the tree without ``.git`` (a remote GPU box).
    """
    if os.environ.get("BSA_COMMIT"):
        return os.environ["BSA_COMMIT"]

    def git(*cmd):
        try:
            res = subprocess.run(["git", *cmd], cwd=repo, capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    status = git("status", "--porcelain")
    return commit + ("-dirty" if status else "")


def metadata(args, device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    cuda = torch.device(device).type == "cuda"
    return {
        "gpu": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "batch": args.batch, "heads_q": args.heads_q, "heads_kv": args.heads_kv,
        "head_dim": args.head_dim, "dtype": str(args.torch_dtype).replace("torch.", ""),
        "seq_lens": list(args.seq_len), "patterns": list(args.pattern),
        "systems": list(args.systems), "passes": list(args.passes),
        "warmup_ms": args.warmup, "rep_ms": args.rep, "rel_tol": REL_TOL,
        "flops": "fwd = 4*nnz*D*Hq*B with nnz = distinct causal pairs per (batch, KV head); "
                 "fwdbwd = 3.5*fwd; dense_tflops (fa4_dense_causal, sdpa_causal) uses "
                 "nnz = L(L+1)/2",
    }


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def default_out_dir() -> Path:
    """A new directory for one run's results under the system's temporary directory, so that
    a run never writes into the repository's results of record by default."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.gettempdir()) / "blocksparse_fsa_bench" / stamp


def write_results(rows: list[Row], meta: dict, out_dir: Path, plot: bool = True,
                  overwrite: bool = False) -> list[Path]:
    """``bench_<gpu>.json`` / ``.csv`` (rows + metadata) and, if asked, ``.png``. Raises
    ``FileExistsError`` rather than replace an existing file, unless ``overwrite``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"bench_{slug(meta['gpu'])}"
    dicts = [r.as_dict() for r in rows]
    paths = [stem.with_suffix(".json"), stem.with_suffix(".csv")]
    existing = [p for p in (*paths, stem.with_suffix(".png")) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists: pass another --out, or --overwrite")
    strict = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}
              for d in dicts]  # NaN is not JSON
    paths[0].write_text(json.dumps({"meta": meta, "rows": strict}, indent=1, default=str) + "\n")
    meta_cols = {k: v for k, v in meta.items()
                 if not isinstance(v, (list, dict)) and k != "flops"}
    with paths[1].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*dicts[0], *meta_cols] if dicts else [])
        writer.writeheader()
        for d in dicts:
            writer.writerow({**d, **meta_cols})
    if plot:
        png = plot_results(rows, meta, stem.with_suffix(".png"))
        if png is not None:
            paths.append(png)
    return paths


def plot_results(rows: list[Row], meta: dict, path: Path) -> Path | None:
    """One panel per pass; per (pattern, L) one bar per system: speed-up vs flex (or
    effective TFLOP/s when no speed-up could be computed)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        warnings.warn("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    passes = [p for p in PASSES if any(r.pass_name == p for r in rows)]
    groups = list(dict.fromkeys((r.pattern, r.seq_len) for r in rows))
    systems = [s for s in SYSTEMS if any(r.system == s for r in rows)]
    metric = "speedup_vs_flex" if any(r.speedup_vs_flex for r in rows) else "tflops"
    idx = {(r.pattern, r.seq_len, r.system, r.pass_name): getattr(r, metric) for r in rows}
    fig, axes = plt.subplots(len(passes), 1, figsize=(max(8, 1.3 * len(groups)), 3.6 * len(passes)),
                             squeeze=False)
    width = 0.8 / max(1, len(systems))
    for ax, p in zip(axes[:, 0], passes):
        for k, s in enumerate(systems):
            xs, ys = [], []
            for g, (pat, L) in enumerate(groups):
                y = idx.get((pat, L, s, p))
                if y:
                    xs.append(g + (k - (len(systems) - 1) / 2) * width)
                    ys.append(y)
            bars = ax.bar(xs, ys, width, label=s, color=f"C{SYSTEMS.index(s)}")
            ax.bar_label(bars, fmt="%.2g", fontsize=6)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{pat}\nL={L}" for pat, L in groups], fontsize=8)
        if metric == "speedup_vs_flex":
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}x"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_ylabel("speed-up vs FlexAttention")
        else:
            ax.set_ylabel("effective TFLOP/s")
        ax.set_title(p, fontsize=10)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(systems), fontsize=8,
               bbox_to_anchor=(0.5, 0.975))
    fig.suptitle(f"{meta['gpu']}  B={meta['batch']} Hq={meta['heads_q']} Hkv={meta['heads_kv']} "
                 f"D={meta['head_dim']} {meta['dtype']}  (higher is better; no bar = failed, "
                 f"skipped or mismatched)", fontsize=9, y=0.995)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path

