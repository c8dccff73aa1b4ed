"""Which platforms JAX may start: off a TPU VM, JAX stays away from libtpu; elsewhere JAX chooses."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gemmatune import platforms


@pytest.fixture
def off_tpu(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A machine without a TPU, JAX_PLATFORMS unset and no JAX plugins; tests add what they need."""
    for name in ("JAX_PLATFORMS", "JAX_FORCE_TPU_INIT"):  # set first, so that teardown restores what was there
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setattr(platforms, "tpu_present", lambda: False)
    monkeypatch.setattr(platforms, "installed_plugins", lambda: set())
    return monkeypatch


def test_off_a_tpu_vm_jax_gets_the_gpu_plugins_and_the_cpu(off_tpu: pytest.MonkeyPatch) -> None:
    assert platforms.jax_platforms() == "cpu"
    # JAX itself skips "cuda" where no NVIDIA GPU is visible, so it is named whenever its plugin is installed.
    off_tpu.setattr(platforms, "installed_plugins", lambda: {"xla_cuda12", "xla_cuda13"})
    assert platforms.jax_platforms() == "cuda,cpu"
    # JAX would fail loudly on a named "rocm" without a ROCm GPU (/dev/kfd).
    off_tpu.setattr(platforms, "installed_plugins", lambda: {"xla_rocm7"})
    off_tpu.setattr(os.path, "exists", lambda p: False)
    assert platforms.jax_platforms() == "cpu"
    off_tpu.setattr(os.path, "exists", lambda p: p == "/dev/kfd")
    assert platforms.jax_platforms() == "rocm,cpu"


def test_jax_chooses_on_a_tpu_vm_when_told_or_with_an_unknown_plugin(off_tpu: pytest.MonkeyPatch) -> None:
    off_tpu.setattr(platforms, "installed_plugins", lambda: {"xla_cuda12", "metal_plugin"})
    assert platforms.jax_platforms() is None  # naming cuda and cpu would leave the other plugin out
    off_tpu.setattr(platforms, "installed_plugins", lambda: set())
    for name, value in [("JAX_PLATFORMS", "cuda"), ("JAX_PLATFORMS", ""), ("JAX_FORCE_TPU_INIT", "1")]:
        off_tpu.setenv(name, value)
        assert platforms.jax_platforms() is None
        off_tpu.delenv(name)
    off_tpu.setattr(platforms, "tpu_present", lambda: True)
    assert platforms.jax_platforms() is None
    platforms.configure_jax()
    assert "JAX_PLATFORMS" not in os.environ
    off_tpu.setattr(platforms, "tpu_present", lambda: False)
    platforms.configure_jax()
    assert os.environ["JAX_PLATFORMS"] == "cpu"


def test_a_tpu_is_found_by_its_device_files_or_on_the_pci_bus(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    vendor = tmp_path / "vendor"
    vendor.write_text("0x10de\n")  # an NVIDIA GPU
    found = {"/sys/bus/pci/devices/*/vendor": [str(vendor), str(tmp_path / "gone")]}
    monkeypatch.setattr(platforms.glob, "glob", lambda pattern: found.get(pattern, []))
    assert not platforms.tpu_present()
    vendor.write_text("0x1ae0\n")  # Google
    assert platforms.tpu_present()
    vendor.write_text("0x10de\n")
    found["/dev/vfio/[0-9]*"] = ["/dev/vfio/0"]  # a v5e's chips
    assert platforms.tpu_present()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (gemmatune[tpu])")
@pytest.mark.skipif(platforms.tpu_present(), reason="on a TPU VM JAX rightly starts libtpu")
def test_a_command_off_a_tpu_vm_says_nothing_about_tpus() -> None:
    """With libtpu installed and JAX_PLATFORMS unset, JAX alone would load libtpu, which prints warnings about the
    TPU it cannot find and takes /tmp/libtpu_lockfile."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(platforms.__file__).parents[1]), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-m", "gemmatune.cli", "generate", "--max-new-tokens", "1"], env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tpu" not in r.stderr.lower(), r.stderr[-3000:]
