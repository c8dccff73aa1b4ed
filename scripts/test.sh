#!/usr/bin/env bash
# Install the test dependencies and run every test (the README's test command; .ci/run calls it).
#
# llama-cpp-python, the real llama.cpp client the GGUF export tests load, builds from source (about 7 minutes on
# 2 cores even without its multimodal and server parts). It builds into a wheel in the background while the other
# tests run, then is installed and its tests run last.
set -euo pipefail
# libtpu (extra tpu, for `gemmatune plan`) is installed; this machine has no TPU, so JAX should not look for one.
export JAX_PLATFORMS=cpu
cd "$(dirname "$0")/.."
wheels=$(mktemp -d)
CMAKE_ARGS="-DLLAVA_BUILD=OFF -DMTMD_BUILD=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
  pip wheel -q --no-deps -w "$wheels" llama-cpp-python==0.3.36 > "$wheels/build.log" 2>&1 &
build=$!
pip install -q -e '.[test,tpu]'
# keras-hub (the KerasHub reference) declares tensorflow-text as a dependency on Linux; with Keras on JAX its Gemma
# models need none of TensorFlow, so it goes in without its dependencies.
pip install -q --no-deps keras-hub==0.32.0
status=0
python -m pytest -q --ignore=tests/test_gguf.py || status=$?
if ! wait "$build"; then
  cat "$wheels/build.log"
  echo "building llama-cpp-python failed" >&2
  exit 1
fi
pip install -q --no-deps "$wheels"/llama_cpp_python-*.whl
python -m pytest -q tests/test_gguf.py || status=$?
exit "$status"
