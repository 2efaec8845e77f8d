#!/usr/bin/env bash
# sdist -> wheel: the source distribution alone (no git checkout) builds a wheel that pins the
# torch it was built against, installs into an empty folder and imports.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m build --sdist --outdir "$work/dist" . >"$work/sdist.log" 2>&1 || { tail -30 "$work/sdist.log"; exit 1; }
sdist=$(ls "$work"/dist/r1x-*.tar.gz)
listing=$(tar tzf "$sdist")
echo "sdist: $(basename "$sdist"), $(du -k "$sdist" | cut -f1) KiB, $(echo "$listing" | wc -l) files"
for f in CMakeLists.txt pyproject.toml third_party/cutlass.cmake build_tools/r1x_metadata.py \
         build_tools/build_info.py.in csrc/r1x.cpp csrc/check.h csrc/cpu/isa.cpp csrc/cuda/fp8_gemm.cu \
         python/r1x/__init__.py python/r1x/_torch_check.py README.md; do
  grep -qx "r1x-[0-9.]*/$f" <<<"$listing" || { echo "sdist lacks $f" >&2; exit 1; }
done
if grep -qE "/benchmarks/results/|\.png$" <<<"$listing"; then
  echo "sdist carries benchmark results" >&2; exit 1
fi

mkdir "$work/src"
tar xzf "$sdist" -C "$work/src"
(cd "$work"/src/r1x-* && R1X_CUDA=OFF python3 -m pip wheel -q --no-build-isolation --no-deps -w "$work/wheel" . \
  >"$work/wheel.log" 2>&1) || { tail -30 "$work/wheel.log"; exit 1; }
wheel=$(ls "$work"/wheel/r1x-*.whl)
echo "wheel: $(basename "$wheel")"
pin=$(unzip -p "$wheel" '*.dist-info/METADATA' | grep "^Requires-Dist: torch")
want="torch==$(python3 -c "import torch, re; print('.'.join(re.match(r'(\d+)\.(\d+)', torch.__version__).groups()))").*"
[ "$pin" = "Requires-Dist: $want" ] || { echo "wheel metadata: '$pin', expected '$want'" >&2; exit 1; }
echo "wheel metadata: $pin"
python3 -m pip install -q --no-deps --target "$work/site" "$wheel"
# -S: no site hooks, so a development (editable) install of r1x cannot shadow the wheel; torch
# and the other requirements come from site-packages, put on the path without its .pth files
site=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
(cd "$work" && PYTHONPATH="$work/site:$site" python3 -S -c "
import r1x, torch
assert r1x.__file__.startswith('$work/site'), r1x.__file__
x = torch.randn(3, 256)
q, s = r1x.quant_fp8_per_token_group(x)
assert (r1x.dequant_fp8(q, s, [1, 128]) - x).abs().max() < 0.1 * x.abs().max()
print('wheel from the sdist imports:', r1x.info()['built_with'])
")
