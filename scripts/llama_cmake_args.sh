#!/usr/bin/env bash
# Print the CMake arguments scripts/test.sh builds llama-cpp-python with (argument: a cpuinfo file, default
# /proc/cpuinfo).
#
# The build is portable rather than native: GGML_NATIVE compiles for -march=native, which on Intel Xeons with AMX
# turns on ggml's AMX kernels, and those crash (segfault) on quantized tensors (Q8_0, K-quants). With GGML_NATIVE off
# ggml enables SSE4.2, AVX, AVX2, BMI2, FMA and F16C itself; AVX512 is added only where the CPU has every part of it
# ggml compiles for (-mavx512f/cd/vl/dq/bw), so the same script serves AMD EPYCs without AVX512 and Xeons with it.
set -euo pipefail
cpuinfo=${1:-/proc/cpuinfo}
flags=" $(grep -m1 '^flags' "$cpuinfo" | cut -d: -f2) "
args="-DLLAVA_BUILD=OFF -DMTMD_BUILD=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
args+=" -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
args+=" -DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
avx512=ON
for part in avx512f avx512cd avx512vl avx512dq avx512bw; do
  [[ $flags == *" $part "* ]] || avx512=OFF
done
args+=" -DGGML_AVX512=$avx512"
echo "$args"
