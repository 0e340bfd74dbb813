#!/usr/bin/env bash
# One GPU session in stages of under ten minutes each, everything written under $OUT and packed
# into $OUT/stage_<s>.tar.gz after every step (the device tool brings back few files). Steps run
# in priority order and a step that cannot finish before DEADLINE seconds (default 540) is cut
# short or skipped, so a call never outlives its limit:
#   bash benchmarks/gpu_session.sh a   GPU tests, kernel A/B against .base/, bench_varlen.py
#   bash benchmarks/gpu_session.sh b   FA4 install, the harness on window, documents, bigbird
#                                      against FA4, flex (both backends) and SDPA; then
#                                      nsa_blocks, dilated_reordered and topk_random
#   bash benchmarks/gpu_session.sh c   bench_decode.py; the forward warp-specialized (Triton's
#                                      tl.range option) against the default config, window
#                                      and BigBird
#   bash benchmarks/gpu_session.sh g   the partial-tile loads (config.PARTIAL_LOADS) against
#                                      .base/ and each other; with the fastest: the GPU
#                                      non-finite tests, the decode step, the frontier on the
#                                      window and documents, then the GPU kernel tests
#   bash benchmarks/gpu_session.sh h   the window layout build's steps stamped; the GPU window,
#                                      varlen, decode and non-finite tests; the loads against
#                                      .base/; the decode merges against each other
#                                      (ab_decode.py), the fastest written to .gpu_choice;
#                                      bench_varlen.py; the GPU kernel tests
#   bash benchmarks/gpu_session.sh f   the final kernels (with .gpu_choice's modes where a
#                                      stage h left one): every pattern against the frontier,
#                                      the A/B against .base/, the decode launch sweep at B=8
#   bash benchmarks/gpu_session.sh d   one call: the GPU window, varlen, decode and non-finite
#                                      tests; bench_decode at 32k (the ticket merge where those
#                                      tests passed, written to .gpu_choice); bench_varlen.py;
#                                      the frontier on the window and documents
#   bash benchmarks/gpu_session.sh t   GPU tests; the frontier on BigBird, NSA, dilated and
#                                      top-k; forward and dK/dV config sweeps on the window
#   bash benchmarks/gpu_session.sh v   after a kernel change: the A/B, the GPU kernel tests,
#                                      FA4 against ours on window and documents
# FA4 comes from .fa4x/fa4.tar.xz (benchmarks/fa4_pack.sh; fits one call), or from
# ../shared/tools/fa4-wheels' two folders (.fa4a sent with stage a, .fa4b with stage b);
# .base/ (and optionally .head/) hold older checkouts' blocksparse_fsa for the A/B.
# ONLY=REGEX runs only the steps whose names match (ONLY=varlen finishes a stage a that the
# deadline cut short).
set -uo pipefail
stage=${1:?usage: gpu_session.sh a|b|c|d|f|g|h|t|v}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT/$stage"
log() { echo "== $*" | tee -a "$OUT/$stage/session.log"; }
export PYTHONUNBUFFERED=1
# wheels the image may lack, installed only where the import fails: .fa4a/test (pytest-xdist,
# hypothesis) for the tests, .fa4a/extra or .fa4x (einops, cuda-bindings) for FA4
# need MODULE WHEEL DIR: copy the wheel WHEEL-*.whl into DIR unless MODULE imports
need() { python3 -c "import $1" 2>/dev/null || cp "$2"-*.whl "$3"/; }
if [ -d .fa4a/test ] && [ ! -d .testsite ]; then
  mkdir -p .testwhl
  need xdist .fa4a/test/pytest_xdist .testwhl; need execnet .fa4a/test/execnet .testwhl
  need hypothesis .fa4a/test/hypothesis .testwhl
  need sortedcontainers .fa4a/test/sortedcontainers .testwhl
  ls .testwhl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps \
    --target .testsite .testwhl/*.whl > "$OUT/$stage/test_wheels.log" 2>&1
fi
# FA4: one archive (.fa4x/fa4.tar.xz, benchmarks/fa4_pack.sh) or the two wheel folders, whose
# first half a stage-a call leaves in /tmp (the device drops carried folders a call does not
# name, so .fa4a does not outlive its call)
[ -d .fa4a ] && [ ! -d /tmp/fa4a ] && cp -r .fa4a /tmp/fa4a
FA4A=.fa4a; [ -d "$FA4A" ] || FA4A=/tmp/fa4a
# (a folder left by an earlier call on a warm machine may be incomplete: test the import)
fa4_ok() { PYTHONPATH=$PWD/.fa4site/nvidia_cutlass_dsl/dsl_packages:$PWD/.fa4site \
             python3 -c "import flash_attn.cute" 2>/dev/null; }
if [ "$stage" != a ] && ! fa4_ok; then
  rm -rf .fa4site
  if [ -f .fa4x/fa4.tar.xz ]; then
    python3 -c "import tarfile; tarfile.open('.fa4x/fa4.tar.xz').extractall('.fa4site')" \
      > "$OUT/$stage/fa4_install.log" 2>&1
    if ! python3 -c "import einops" 2>/dev/null; then  # a small need the image may lack
      python3 -m pip install -q --no-index --no-deps --target .fa4site .fa4x/einops-*.whl \
        >> "$OUT/$stage/fa4_install.log" 2>&1
    fi
    python3 -c "import cuda.bindings" >> "$OUT/$stage/fa4_install.log" 2>&1 ||
      echo "the image lacks cuda-bindings, which the CuTe DSL needs" >> "$OUT/$stage/fa4_install.log"
  elif [ -d .fa4b ] && [ -d "$FA4A" ]; then
    need einops "$FA4A"/extra/einops .fa4b; need cuda.bindings "$FA4A"/extra/cuda_bindings .fa4b
    need cuda.pathfinder "$FA4A"/extra/cuda_pathfinder .fa4b
    cat "$FA4A"/libs.part.* .fa4b/libs.part.* \
      > .fa4b/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl &&
    python3 -m pip install -q --no-index --no-deps --target .fa4site .fa4b/*.whl \
      > "$OUT/$stage/fa4_install.log" 2>&1
  else
    echo "no FA4 wheels here (.fa4x/fa4.tar.xz, or .fa4b with .fa4a or /tmp/fa4a)" \
      > "$OUT/$stage/fa4_install.log"
  fi
fi
# pip --target skips .pth files: cutlass-dsl's adds its dsl_packages folder to sys.path
export PYTHONPATH=$PWD/.fa4site/nvidia_cutlass_dsl/dsl_packages:$PWD/.fa4site:$PWD:$PWD/benchmarks:$PWD/.testsite
DEADLINE=${DEADLINE:-540}
pack() { tar -czf "$OUT/stage_$stage.tar.gz" -C "$OUT" "$stage"; }
# step NAME SECONDS CMD...: CMD under a timeout of SECONDS, less if the deadline is nearer
step() {
  local name=$1 want=$2; shift 2
  if [ -n "${ONLY:-}" ] && ! [[ $name =~ $ONLY ]]; then return; fi
  local left=$((DEADLINE - SECONDS - 10))
  if [ "$left" -lt 30 ]; then log "$name: skipped, ${left} s left"; return; fi
  log "$name (limit $(( want < left ? want : left )) s)"
  timeout "$(( want < left ? want : left ))" "$@"
  log "$name: exit $? at ${SECONDS} s"; pack
}
bench() { python3 -m blocksparse_fsa_bench --seq-len 32768 --quick --no-plot \
            --out "$OUT/$stage/$1" "${@:2}" 2>"$OUT/$stage/$1.progress" | tee "$OUT/$stage/$1.log"; }
export -f bench

# the GPU window, varlen, decode and non-finite tests under a limit of $1 seconds, their log
# where gpu_choice.py reads it
window_decode_tests() {
  step "GPU window, varlen, decode and non-finite tests" "$1" bash -c "python3 -m pytest -m gpu \
    -q -p no:cacheprovider $XDIST -rf tests/api/test_window_layout.py tests/api/test_varlen.py \
    tests/kernels/test_decode.py tests/api/test_kvcache.py tests/kernels/test_nonfinite.py \
    > '$OUT/$stage/gpu_window_decode_tests.log' 2>&1"
  tail -4 "$OUT/$stage/gpu_window_decode_tests.log" | tee -a "$OUT/$stage/session.log"
}
# the kernels of .base/ against this tree's three ways of loading partial tiles
partial_loads_ab() {
  [ -d .base/blocksparse_fsa ] && step "kernel A/B: before" 60 env PYTHONPATH="$PWD/.base" \
    python3 benchmarks/ab_kernels.py --label before --out "$OUT/$stage"
  for mode in pointer branch select; do
    step "kernel A/B: $mode" 60 python3 benchmarks/ab_kernels.py --label "$mode" \
      --out "$OUT/$stage" --config "PARTIAL_LOADS='$mode'"
  done
}

log "environment"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee -a "$OUT/$stage/session.log"
python3 -c "import xdist" 2>/dev/null && XDIST="-n 4" || XDIST=""
export OUT stage XDIST
if [ "$stage" = a ]; then
  step "GPU tests" 220 bash -c 'python3 -m pytest -m gpu -q -p no:cacheprovider $XDIST \
    --maxfail=30 -rf tests > "$OUT/$stage/gpu_tests.log" 2>&1'
  tail -25 "$OUT/$stage/gpu_tests.log" | tee -a "$OUT/$stage/session.log"
  # before = .base/ (an older checkout), after = this tree: same GPU, back to back
  if [ -d .base/blocksparse_fsa ]; then
    step "kernel A/B: before" 110 env PYTHONPATH="$PWD/.base" \
      python3 benchmarks/ab_kernels.py --label before --out "$OUT/$stage"
  fi
  if [ -d .head/blocksparse_fsa ]; then  # optional: a second checkout between the two
    step "kernel A/B: head" 110 env PYTHONPATH="$PWD/.head" \
      python3 benchmarks/ab_kernels.py --label head --out "$OUT/$stage"
  fi
  step "kernel A/B: after" 110 env PYTHONPATH="$PWD" \
    python3 benchmarks/ab_kernels.py --label after --out "$OUT/$stage"
  step "varlen" 150 bash -c 'python3 benchmarks/bench_varlen.py --out "$OUT/$stage/varlen" 2>&1 \
    | tail -40 | tee -a "$OUT/$stage/session.log"'
elif [ "$stage" = c ]; then
  # the forward with Triton's warp specialization against the default config, same run
  ws() { python3 benchmarks/tune_configs.py --pattern "$1" --blocks 64x64 --passes fwd \
           --warps 4 8 --stages 2 3 --warp-specialize 0 1 --out "$OUT/$stage/ws_$1"; }
  export -f ws
  step "warp specialization: sliding_window" 100 bash -c 'ws sliding_window'
  step "decode" 200 bash -c 'python3 benchmarks/bench_decode.py --out "$OUT/$stage/decode" \
    --lengths 8192 32768 131072 --batches 1 8 64 2>&1 | tail -60 | tee -a "$OUT/$stage/session.log"'
  step "warp specialization: bigbird" 100 bash -c 'ws bigbird'
elif [ "$stage" = t ]; then
  # the GPU test tier (8 workers: compiling is the bottleneck), the frontier on the patterns
  # stage v leaves out (Triton flex: stage b), then forward and dK/dV configs on the window
  python3 -c "import xdist" 2>/dev/null && XDIST="-n 8"
  step "GPU tests" 200 bash -c "python3 -m pytest -m gpu -q -p no:cacheprovider $XDIST \
    --maxfail=30 -rf tests > '$OUT/$stage/gpu_tests.log' 2>&1"
  tail -25 "$OUT/$stage/gpu_tests.log" | tee -a "$OUT/$stage/session.log"
  step "harness: the rest of the frontier" 150 bash -c 'bench bench_rest --pattern bigbird \
    nsa_blocks dilated_reordered topk_random --systems ours flex_flash fa4_dense_causal'
  tune() { python3 benchmarks/tune_configs.py --pattern sliding_window --out "$OUT/$stage/tune_$1" \
             --blocks "${@:2}" 2>&1 | tee "$OUT/$stage/tune_$1.log" | tail -30; }
  export -f tune
  step "tune: forward 64x128" 80 bash -c 'tune 128 64x128 --passes fwd --stack 2 1 \
    --warps 8 4 --stages 2 3'
  step "tune: dK/dV" 60 bash -c 'tune dkdv 64x64 --passes dkdv --warps 8 4 --stages 2 3'
  step "tune: forward 64x64" 90 bash -c 'tune 64 64x64 --passes fwd --stack 4 2 --warps 8 4 \
    --stages 2 3'
elif [ "$stage" = f ]; then
  # the final kernels, with the modes a stage h on this machine chose (.gpu_choice, written
  # into this copy's config.py): every pattern against the frontier, the A/B against .base/,
  # the decode launch sweep where one step is latency-bound (B = 8)
  if [ -f .gpu_choice ]; then
    while IFS== read -r name value; do
      sed -i "s/^$name = .*/$name = \"$value\"/" blocksparse_fsa/kernels/config.py
    done < .gpu_choice
    grep -E '^(PARTIAL_LOADS|DECODE_MERGE) =' blocksparse_fsa/kernels/config.py \
      | tee -a "$OUT/$stage/session.log"
  fi
  step "harness: every pattern against the frontier" 300 bash -c 'bench bench_all --pattern \
    sliding_window documents bigbird nsa_blocks dilated_reordered topk_random --systems ours \
    flex flex_flash fa4_window fa4_varlen fa4_dense_causal sdpa_causal'
  for label in before after; do
    dir=$PWD; [ $label = before ] && dir=$PWD/.base
    [ -d "$dir/blocksparse_fsa" ] && step "kernel A/B: $label" 60 env PYTHONPATH="$dir" \
      python3 benchmarks/ab_kernels.py --label $label --out "$OUT/$stage"
  done
  step "decode sweep" 150 bash -c 'python3 benchmarks/bench_decode.py --out "$OUT/$stage/decode" \
    --lengths 32768 --batches 8 64 --sweep quick 2>&1 | tail -70 | tee -a "$OUT/$stage/session.log"'
elif [ "$stage" = g ]; then
  partial_loads_ab
  # the mode with the smallest total time over the A/B's rows
  best=$(python3 -c "
import json, collections
tot = collections.Counter(); n = collections.Counter()
for line in open('$OUT/$stage/ab_kernels.jsonl'):
    r = json.loads(line)
    if r['label'] != 'before': tot[r['label']] += r['ms']; n[r['label']] += 1
full = [m for m in tot if n[m] == max(n.values())]
print(min(full, key=tot.get) if full else 'pointer')" 2>/dev/null || echo pointer)
  log "fastest PARTIAL_LOADS: $best"
  # a pytest plugin and a runner that set the mode in every process (xdist workers too)
  mkdir -p /tmp/bsamode
  printf 'import os\nimport blocksparse_fsa.kernels.config as c\nc.PARTIAL_LOADS = os.environ["BSA_PARTIAL_LOADS"]\n' \
    > /tmp/bsamode/bsa_mode.py
  export BSA_PARTIAL_LOADS=$best PYTHONPATH=/tmp/bsamode:$PYTHONPATH
  step "GPU non-finite tests" 90 bash -c "python3 -m pytest -m gpu -q -p no:cacheprovider \
    -p bsa_mode $XDIST -rf tests/kernels/test_nonfinite.py tests/api/test_nonfinite.py \
    > '$OUT/$stage/gpu_nonfinite.log' 2>&1"
  tail -4 "$OUT/$stage/gpu_nonfinite.log" | tee -a "$OUT/$stage/session.log"
  step "decode" 90 bash -c 'python3 benchmarks/bench_decode.py --out "$OUT/$stage/decode" \
    --lengths 32768 --batches 8 64 2>&1 | tail -40 | tee -a "$OUT/$stage/session.log"'
  step "harness: the frontier" 200 bash -c 'python3 -c "import bsa_mode, runpy, sys
sys.argv[0] = \"blocksparse_fsa_bench\"
runpy.run_module(\"blocksparse_fsa_bench\", run_name=\"__main__\")" --seq-len 32768 --quick \
    --no-plot --out "$OUT/$stage/bench_frontier" --pattern sliding_window documents bigbird \
    --systems ours flex_flash fa4_window fa4_varlen fa4_dense_causal \
    2>"$OUT/$stage/bench_frontier.progress" | tee "$OUT/$stage/bench_frontier.log"'
  left=$((DEADLINE - SECONDS - 15)); [ "$left" -gt 200 ] && left=200
  step "GPU kernel tests" $((left + 10)) bash -c "timeout -s INT $left python3 -m pytest -m gpu \
    -q -p no:cacheprovider -p bsa_mode $XDIST -rf tests/test_gpu.py tests/kernels \
    > '$OUT/$stage/gpu_tests.log' 2>&1"
  tail -12 "$OUT/$stage/gpu_tests.log" | tee -a "$OUT/$stage/session.log"
elif [ "$stage" = h ]; then
  # the window layout's host steps; the GPU window, varlen, decode and non-finite tests (every
  # PARTIAL_LOADS mode, both decode merges); the partial-tile loads against .base/; the two
  # ways of merging decode splits (config.DECODE_MERGE); bench_varlen
  step "window build stamps" 60 bash -c 'python3 benchmarks/window_build_stamps.py 2>&1 \
    | tee -a "$OUT/$stage/session.log"; python3 benchmarks/window_build_stamps.py --sinks 4 \
    2>&1 | tail -1 | tee -a "$OUT/$stage/session.log"'
  window_decode_tests 240
  partial_loads_ab  # issue 21's last item first
  for merge in kernel ticket; do
    step "decode A/B: $merge" 90 python3 benchmarks/ab_decode.py --label "$merge" \
      --out "$OUT/$stage" --config "DECODE_MERGE='$merge'"
  done
  # the modes measured fastest (tests passing), for a stage f that follows on this machine
  python3 benchmarks/gpu_choice.py "$OUT/$stage" --write .gpu_choice 2>&1 \
    | tee -a "$OUT/$stage/session.log"
  step "varlen" 150 bash -c 'python3 benchmarks/bench_varlen.py --out "$OUT/$stage/varlen" \
    2>&1 | tail -30 | tee -a "$OUT/$stage/session.log"'
  left=$((DEADLINE - SECONDS - 15)); [ "$left" -gt 200 ] && left=200
  step "GPU kernel tests" $((left + 10)) bash -c "timeout -s INT $left python3 -m pytest -m gpu \
    -q -p no:cacheprovider $XDIST -rf tests/test_gpu.py tests/kernels \
    > '$OUT/$stage/gpu_tests.log' 2>&1"
  tail -12 "$OUT/$stage/gpu_tests.log" | tee -a "$OUT/$stage/session.log"
elif [ "$stage" = d ]; then
  window_decode_tests 180
  # the ticket merge measured faster eager and equal under a graph (ab_decode, H100): taken
  # once its GPU tests have passed
  merge=kernel
  python3 -c "import gpu_choice, sys
sys.exit(not gpu_choice.passed('$OUT/$stage/gpu_window_decode_tests.log'))" && merge=ticket
  log "DECODE_MERGE: $merge"; echo "DECODE_MERGE=$merge" > .gpu_choice
  step "decode" 200 bash -c "python3 benchmarks/bench_decode.py --out '$OUT/$stage/decode' \
    --lengths 32768 --batches 8 64 --config \"DECODE_MERGE='$merge'\" 2>&1 | tail -60 \
    | tee -a '$OUT/$stage/session.log'"
  step "varlen" 150 bash -c 'python3 benchmarks/bench_varlen.py --out "$OUT/$stage/varlen" \
    2>&1 | tail -30 | tee -a "$OUT/$stage/session.log"'
  step "harness: the frontier" 200 bash -c 'bench bench_frontier --pattern sliding_window \
    documents --systems ours flex flex_flash fa4_window fa4_varlen fa4_dense_causal'
elif [ "$stage" = v ]; then
  # after a kernel change: the A/B against .base/ (and .head/), the GPU kernel tests, then FA4
  for label in before head after; do
    dir=$PWD; [ $label = before ] && dir=$PWD/.base; [ $label = head ] && dir=$PWD/.head
    [ -d "$dir/blocksparse_fsa" ] && step "kernel A/B: $label" 60 env PYTHONPATH="$dir" \
      python3 benchmarks/ab_kernels.py --label $label --out "$OUT/$stage"
  done
  # SIGINT at the limit: pytest still prints its summary of what ran
  left=$((DEADLINE - SECONDS - 15)); [ "$left" -gt 140 ] && left=140
  step "GPU kernel tests" $((left + 10)) bash -c "timeout -s INT $left python3 -m pytest -m gpu \
    -q -p no:cacheprovider $XDIST -rf tests/test_gpu.py tests/kernels \
    > '$OUT/$stage/gpu_tests.log' 2>&1"
  tail -12 "$OUT/$stage/gpu_tests.log" | tee -a "$OUT/$stage/session.log"
  log "FA4 import"
  python3 -c "import flash_attn.cute as m; print('flash_attn.cute', m.__version__)" \
    2>&1 | tail -15 | tee -a "$OUT/$stage/session.log"
  step "harness: the frontier" 200 bash -c 'bench bench_frontier --pattern sliding_window \
    documents --systems ours flex_flash fa4_window fa4_varlen fa4_dense_causal'
else
  log "FA4 import"
  python3 -c "import flash_attn.cute as m; print('flash_attn.cute', m.__version__)" \
    2>&1 | tail -15 | tee -a "$OUT/$stage/session.log"
  step "harness: the frontier" 250 bash -c 'bench bench_frontier --pattern sliding_window \
    documents bigbird --systems ours flex_flash fa4_window fa4_varlen fa4_dense_causal sdpa_causal'
  step "harness: scattered patterns" 200 bash -c 'bench bench_scattered --pattern nsa_blocks \
    dilated_reordered topk_random --systems ours flex flex_flash fa4_dense_causal sdpa_causal'
fi
log "done at ${SECONDS} s"
pack && rm -rf "${OUT:?}/$stage"
