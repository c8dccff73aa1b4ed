#!/usr/bin/env bash
# Print the path of a llama-cpp-python wheel built for this machine's CPU (scripts/llama_cmake_args.sh), building it
# first unless an earlier run left one in the cache: $GEMMATUNE_WHEELS, default ~/.cache/gemmatune/wheels, one folder
# per version and CMake arguments. The build (from source, about 7 minutes on 2 cores) happens in a temporary folder
# in the cache that is removed however the script ends; the wheel moves into place only once whole. On failure the
# build log goes to stderr.
set -euo pipefail
version=0.3.36
args=$(bash "$(dirname "$0")/llama_cmake_args.sh")
key=$(printf '%s\n%s\n' "$version" "$args" | sha256sum | cut -c1-16)
root=${GEMMATUNE_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/gemmatune/wheels}
dir="$root/llama-cpp-python-$version-$key"
if ! compgen -G "$dir/llama_cpp_python-*.whl" > /dev/null; then
  mkdir -p "$root"
  tmp=$(mktemp -d "$root/.build.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  trap 'exit 130' INT TERM
  if ! CMAKE_ARGS="$args" nice pip wheel -q --no-deps -w "$tmp/wheel" "llama-cpp-python==$version" \
      > "$tmp/build.log" 2>&1; then
    cat "$tmp/build.log" >&2
    echo "building llama-cpp-python $version failed (CMAKE_ARGS: $args)" >&2
    exit 1
  fi
  printf '%s\n' "$args" > "$tmp/wheel/cmake-args.txt"
  # Another run may have finished the same build meanwhile; either copy will do.
  mv -T "$tmp/wheel" "$dir" 2> /dev/null || true
fi
compgen -G "$dir/llama_cpp_python-*.whl" | head -n 1
