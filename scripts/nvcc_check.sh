#!/usr/bin/env bash
# Compile-checks every csrc/**/*.cu (csrc/gemv/gemv.cu, ...) alone with nvcc for sm_90, with
# the macros PyTorch passes to nvcc, and prints ptxas's register / spill report (-Xptxas -v). Needs no GPU and no torch.
# Exits non-zero if a file fails to compile; skips (exit 0) when nvcc is absent.
#
#   bash scripts/nvcc_check.sh            # uses nvcc from PATH, else $CUDA_HOME/bin/nvcc
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="$(command -v nvcc || true)"
if [[ -z "${NVCC}" && -n "${CUDA_HOME:-}" && -x "${CUDA_HOME}/bin/nvcc" ]]; then
    NVCC="${CUDA_HOME}/bin/nvcc"
fi
if [[ -z "${NVCC}" && -x /usr/local/cuda/bin/nvcc ]]; then
    NVCC=/usr/local/cuda/bin/nvcc
fi
if [[ -z "${NVCC}" ]]; then
    echo "nvcc_check: nvcc not found (PATH, \$CUDA_HOME, /usr/local/cuda): skipped"
    exit 0
fi

OUT="$(mktemp -d)"
trap 'rm -rf "${OUT}"' EXIT

FLAGS=(
    -gencode arch=compute_90,code=sm_90
    -std=c++17 -O3 --expt-relaxed-constexpr
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
    -Xptxas -v -Xcompiler -Wall
    -I "${ROOT}/csrc"  # sources include each other by their path under csrc/, as setup.py says
)

"${NVCC}" --version | tail -n 1
status=0
shopt -s nullglob globstar
for cu in "${ROOT}"/csrc/**/*.cu; do
    rel="${cu#"${ROOT}/csrc/"}"  # gemv/gemv.cu
    name="${rel%.cu}"
    name="${name//\//_}"  # one flat log/object name per source: gemv_gemv
    echo "== ${rel}"
    if ! "${NVCC}" "${FLAGS[@]}" -c "${cu}" -o "${OUT}/${name}.o" 2> "${OUT}/${name}.log"; then
        cat "${OUT}/${name}.log"
        echo "nvcc_check: FAILED to compile ${rel}"
        status=1
        continue
    fi
    # One line per kernel: demangled name, registers, spills.
    awk '
        /Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); fn = substr($0, RSTART + 1, RLENGTH - 2) }
        /spill stores/ { spills = $0; sub(/^[ \t]+/, "", spills) }
        /Used [0-9]+ registers/ { match($0, /Used [0-9]+ registers/); print fn "\n    " substr($0, RSTART, RLENGTH) ", " spills }
    ' "${OUT}/${name}.log" | (command -v c++filt > /dev/null && c++filt || cat)
    if grep -q "warning" "${OUT}/${name}.log"; then
        grep "warning" "${OUT}/${name}.log"
    fi
    if grep -Eq "[1-9][0-9]* bytes spill (stores|loads)" "${OUT}/${name}.log"; then
        echo "nvcc_check: note: ${rel} spills registers (see above)"
    fi
done
exit "${status}"
