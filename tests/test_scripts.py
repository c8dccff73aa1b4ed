"""scripts/: the llama.cpp build flags chosen from the CPU, the cached llama-cpp-python wheel, and test.sh leaving
nothing behind. `pip` and `python` are stand-ins on PATH here (the real build takes minutes; test.sh runs it)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parents[1] / "scripts"
# /proc/cpuinfo's flags of the two kinds of CI machine: an Intel Xeon with AVX512 and AMX, an AMD EPYC without AVX512.
XEON = ("fpu sse sse2 ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt avx f16c bmi1 avx2 bmi2 avx512f avx512dq avx512cd "
        "avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8")
EPYC = "fpu sse sse2 ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt avx f16c bmi1 avx2 bmi2 sha_ni"
# A stand-in pip: `pip wheel -w DIR ...` writes a wheel into DIR (or fails, or hangs, as $FAKE_PIP says) and every
# call is logged with the CMAKE_ARGS it saw.
FAKE_PIP = """#!/usr/bin/env bash
echo "$* | $CMAKE_ARGS" >> "$FAKE_LOG"
if [[ $1 == wheel ]]; then
  case ${FAKE_PIP:-} in
    fail) echo "compiler exploded"; exit 1 ;;
    hang) sleep 60 ;;
  esac
  while [[ $1 != -w ]]; do shift; done
  mkdir -p "$2" && touch "$2/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
fi
"""


def _args(tmp: Path, flags: str) -> list[str]:
    cpuinfo = tmp / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: some cpu\nflags\t\t: {flags}\n\nprocessor\t: 1\n"
                       f"flags\t\t: {flags}\n")
    out = subprocess.run(["bash", str(SCRIPTS / "llama_cmake_args.sh"), str(cpuinfo)], capture_output=True,
                         text=True, check=True).stdout
    return out.split()


def test_llama_builds_portably_with_avx512_only_where_the_cpu_has_it(tmp_path: Path) -> None:
    """-march=native would turn on the AMX kernels that crash on quantized tensors on Xeons."""
    for flags, avx512 in [(XEON, "ON"), (EPYC, "OFF")]:
        args = _args(tmp_path, flags)
        assert "-DGGML_NATIVE=OFF" in args and f"-DGGML_AVX512={avx512}" in args
        assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(args)
        assert not [a for a in args if a.startswith("-DGGML_AMX") and a.endswith("=ON")]
    assert "-DGGML_AVX512=OFF" in _args(tmp_path, XEON.replace("avx512bw ", ""))  # ggml needs every part


@pytest.fixture
def fake(tmp_path: Path) -> dict[str, str]:
    """An environment whose pip (and python) are stand-ins, with the wheel cache and TMPDIR under tmp_path."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "pip").write_text(FAKE_PIP)
    (bin_ / "python").write_text('#!/usr/bin/env bash\necho "python $*" >> "$FAKE_LOG"\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    (tmp_path / "tmp").mkdir()
    return {**os.environ, "PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "log"),
            "GEMMATUNE_WHEELS": str(tmp_path / "wheels"), "TMPDIR": str(tmp_path / "tmp")}


def _wheel(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPTS / "llama_wheel.sh")], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def _log(env: dict[str, str]) -> list[str]:
    path = Path(env["FAKE_LOG"])
    return path.read_text().splitlines() if path.exists() else []


def test_the_wheel_is_built_once_then_reused(fake: dict[str, str]) -> None:
    first = _wheel(fake)
    assert first.returncode == 0, first.stderr
    wheel = Path(first.stdout.strip())
    assert wheel.is_file() and wheel.parent.parent == Path(fake["GEMMATUNE_WHEELS"])
    [call] = _log(fake)
    assert call.startswith("wheel ") and "llama-cpp-python==0.3.36" in call and "-DGGML_NATIVE=OFF" in call
    second = _wheel(fake)
    assert second.returncode == 0 and second.stdout == first.stdout
    assert len(_log(fake)) == 1  # no second build
    assert sorted(p.name for p in wheel.parent.parent.iterdir()) == [wheel.parent.name]  # no temporary folder left


def test_a_failed_or_stopped_build_leaves_nothing(fake: dict[str, str]) -> None:
    wheels = Path(fake["GEMMATUNE_WHEELS"])
    failed = _wheel({**fake, "FAKE_PIP": "fail"})
    assert failed.returncode == 1 and "compiler exploded" in failed.stderr and "failed" in failed.stderr
    assert list(wheels.iterdir()) == []
    proc = subprocess.Popen(["bash", str(SCRIPTS / "llama_wheel.sh")], env={**fake, "FAKE_PIP": "hang"},
                            start_new_session=True)
    deadline = time.monotonic() + 30
    while not list(wheels.glob(".build.*/build.log")) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) != 0
    assert list(wheels.iterdir()) == []


def test_test_sh_installs_the_cached_wheel_and_leaves_no_temporary_folder(fake: dict[str, str]) -> None:
    r = subprocess.run(["bash", str(SCRIPTS / "test.sh")], env=fake, capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stderr
    [wheel] = Path(fake["GEMMATUNE_WHEELS"]).glob("*/*.whl")
    # The llama-cpp-python already installed may be another build of the same version: it is replaced.
    assert f"install -q --no-deps --force-reinstall {wheel} | " in _log(fake)
    # Last, every test file that loads llama.cpp (tests/test_gguf*.py, which the first pytest run leaves out).
    llama_tests = sorted(str(f.relative_to(SCRIPTS.parent)) for f in (SCRIPTS.parent / "tests").glob("test_gguf*.py"))
    assert _log(fake)[-1] == "python -m pytest -q " + " ".join(llama_tests)
    assert any("--ignore-glob=tests/test_gguf*.py" in line for line in _log(fake))
    assert list(Path(fake["TMPDIR"]).iterdir()) == []
