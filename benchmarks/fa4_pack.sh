#!/usr/bin/env bash
# Packs FlashAttention-4 for the GPU machine into one archive that fits one device call:
# the wheels of ../shared/tools/fa4-wheels (run it first: .fa4a/ and .fa4b/), unpacked and
# compressed with xz's x86 filter (about 58 MB against 99 MB of wheels), plus einops.
#     bash benchmarks/fa4_pack.sh        # -> .fa4x/fa4.tar.xz, then carry [".fa4x"]
# benchmarks/gpu_session.sh unpacks it into .fa4site on the device (b and v stages).
set -euo pipefail
tmp=$(mktemp -d)
cat .fa4a/libs.part.* .fa4b/libs.part.* > "$tmp/nvidia_cutlass_dsl_libs_cu13.whl"
mkdir "$tmp/site"
for w in "$tmp"/*.whl .fa4b/*.whl; do python3 -m zipfile -e "$w" "$tmp/site"; done
mkdir -p .fa4x
tar -cf - -C "$tmp/site" . | xz -T0 --x86 --lzma2=preset=9e,dict=256MiB > .fa4x/fa4.tar.xz
python3 -m pip download -q --no-deps -d .fa4x einops
grep -qx '/.fa4x/' .git/info/exclude 2>/dev/null || echo '/.fa4x/' >> .git/info/exclude
rm -rf "$tmp"
du -sh .fa4x
