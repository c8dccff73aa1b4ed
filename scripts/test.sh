#!/usr/bin/env bash
# Install the test dependencies and run every test (the README's test command; .ci/run calls it).
#
# llama-cpp-python, the real llama.cpp client the GGUF export tests load, builds from source for this machine's CPU
# (scripts/llama_wheel.sh: about 7 minutes on 2 cores, then kept in ~/.cache/gemmatune/wheels for later runs). It
# builds in the background while the other tests run, then is installed and its tests run last.
set -euo pipefail
# The tests run on the CPU (their tolerances are float32 on a CPU), also where there is an accelerator; and pytest
# does not pass through gemmatune's CLI, which would keep JAX off libtpu on a machine without a TPU.
export JAX_PLATFORMS=cpu
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
# One persistent compilation cache for the run (gone with $tmp): the many tests that compile the same program (the
# tiny model's train step in each `gemmatune train` they run, plan children, subprocesses) compile it once.
export JAX_COMPILATION_CACHE_DIR="$tmp/jax-cache"
build=
# However this script ends, the build stops (it runs in its own process group, so the compilers stop with it) and
# the temporary folder goes.
trap '[[ -z $build ]] || kill -- -"$build" 2> /dev/null || true; rm -rf "$tmp"' EXIT
trap 'exit 130' INT TERM
setsid bash scripts/llama_wheel.sh > "$tmp/wheel" &
build=$!
pip install -q -e '.[test,tpu]'
# keras-hub (the KerasHub reference) declares tensorflow-text as a dependency on Linux; with Keras on JAX its Gemma
# models need none of TensorFlow, so it goes in without its dependencies.
pip install -q --no-deps keras-hub==0.32.0
status=0
python -m pytest -q --durations=15 --ignore-glob="tests/test_gguf*.py" || status=$?
built=0
wait "$build" || built=$?
build=
if ((built)); then
  echo "building llama-cpp-python failed (its log is above)" >&2
  exit 1
fi
pip install -q --no-deps --force-reinstall "$(cat "$tmp/wheel")"
python -m pytest -q tests/test_gguf*.py || status=$?
exit "$status"
