#!/usr/bin/env bash
# Prepares, on the CPU machine, what benchmarks/gpu_session.sh carries to the GPU machine:
#     bash benchmarks/gpu_prep.sh [BASE [HEAD]]
#   .base/, .head/  the package at commits BASE (default 6b16626, the kernels before issues 16
#                   and 21) and HEAD (optional) for the same-run kernel A/B
#   .fa4x/          FlashAttention-4 in one archive (../shared/tools/fa4-wheels, then
#                   benchmarks/fa4_pack.sh; a few minutes of xz)
#   .testsite/      pytest-xdist and execnet from PyPI (the image's pytest then runs the GPU
#                   tests on 4 workers; gpu_session.sh puts it on PYTHONPATH)
# then: device run, carry [".fa4x", ".base", ".testsite"] (and ".head"),
#       OUT=$OUT bash benchmarks/gpu_session.sh d (or another stage)
set -euo pipefail
base=${1:-6b16626}; head=${2:-}
for pair in ".base:$base" ".head:$head"; do
  dir=${pair%%:*}; rev=${pair#*:}
  rm -rf "$dir"
  [ -n "$rev" ] || continue
  mkdir "$dir" && git archive "$rev" blocksparse_fsa | tar -x -C "$dir"
  grep -qx "/$dir/" .git/info/exclude 2>/dev/null || echo "/$dir/" >> .git/info/exclude
done
if [ ! -f .fa4x/fa4.tar.xz ]; then
  [ -d .fa4a ] && [ -d .fa4b ] || ../shared/tools/fa4-wheels
  bash benchmarks/fa4_pack.sh
fi
if [ ! -d .testsite/xdist ]; then
  wheels=$(mktemp -d)
  python3 -m pip download -q --no-deps -d "$wheels" pytest-xdist execnet
  python3 -m pip install -q --no-deps --target .testsite "$wheels"/*.whl
  rm -rf "$wheels"
fi
du -sh .base .fa4x .testsite ${head:+.head}
