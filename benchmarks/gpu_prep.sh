#!/usr/bin/env bash
# Prepares, on the CPU machine, what benchmarks/gpu_session.sh carries to the GPU machine:
#     bash benchmarks/gpu_prep.sh [BASE [HEAD]]
#   .base/, .head/  the package at commits BASE (default 6b16626, the kernels before issues 16
#                   and 21) and HEAD (optional) for the same-run kernel A/B
#   .fa4x/          FlashAttention-4 in one archive (../shared/tools/fa4-wheels, then
#                   benchmarks/fa4_pack.sh; a few minutes of xz)
# then: device run, carry [".fa4x", ".base", ".head"], OUT=$OUT bash benchmarks/gpu_session.sh v
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
du -sh .base .fa4x ${head:+.head}
