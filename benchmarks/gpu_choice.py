"""Picks the kernel modes a GPU session measured fastest, for the session's next call.

    python benchmarks/gpu_choice.py DIR [--write FILE]

reads ``DIR/ab_kernels.jsonl`` (``config.PARTIAL_LOADS``: pointer, branch, select) and
``DIR/ab_decode.jsonl`` (``config.DECODE_MERGE``: kernel, ticket), as ``gpu_session.sh h``
writes them, and prints ``NAME=VALUE`` lines (and writes them to FILE). A mode replaces the
default only where it ran every row its rivals ran and was more than ``MARGIN`` faster in
total, and only where the tests log beside them (which runs every mode) ends in a pytest
summary of passes alone.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re

MARGIN = 0.01
# config name: (its default, the A/B file, the labels it compares)
MODES = {"PARTIAL_LOADS": ("pointer", "ab_kernels.jsonl", ("pointer", "branch", "select")),
         "DECODE_MERGE": ("kernel", "ab_decode.jsonl", ("kernel", "ticket"))}


def fastest(path: str, labels, default: str) -> str:
    """The label with the smallest total ``ms`` over rows every label ran; ``default`` unless
    another beats it by more than MARGIN."""
    times = collections.defaultdict(dict)
    if os.path.exists(path):
        with open(path) as f:
            for row in map(json.loads, f):
                if row["label"] in labels:
                    key = tuple(row.get(k) for k in ("pattern", "pass_name", "batch", "mode"))
                    times[row["label"]][key] = row["ms"]
    if default not in times:
        return default
    common = set.intersection(*(set(t) for t in times.values()))
    total = {label: sum(t[k] for k in common) for label, t in times.items()}
    best = min(total, key=total.get)
    return best if total[best] < (1 - MARGIN) * total[default] else default


def passed(log: str) -> bool:
    """Whether pytest finished the run that ``log`` holds with passes and nothing else: a run
    cut short by a timeout ends without its summary line and does not count."""
    if not os.path.exists(log):
        return False
    with open(log) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    summary = lines[-1] if lines else ""
    return (re.fullmatch(r"=* ?\d+ passed(, \d+ (skipped|deselected|warnings?))* in .*", summary)
            is not None)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--write")
    args = ap.parse_args(argv)
    tests_ok = passed(os.path.join(args.dir, "gpu_window_decode_tests.log"))
    lines = []
    for name, (default, file, labels) in MODES.items():
        value = fastest(os.path.join(args.dir, file), labels, default)
        if not tests_ok:
            value = default
        lines.append(f"{name}={value}")
    print("\n".join(lines))
    if args.write:
        with open(args.write, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
