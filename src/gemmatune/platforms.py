"""Which platforms JAX may start, chosen before JAX is imported.

With libtpu installed (`gemmatune[tpu]`, which `gemmatune plan` compiles with) and JAX_PLATFORMS unset, JAX tries
the TPU first on every machine: libtpu loads (seconds), prints warnings about the TPU it cannot find, and takes
/tmp/libtpu_lockfile for as long as the process runs. Off a TPU VM, gemmatune names the platforms instead: the GPU
plugins installed (a CUDA plugin is skipped by JAX itself where no NVIDIA GPU is visible; a ROCm one is named only
where /dev/kfd exists), then the CPU. On a TPU VM, with JAX_PLATFORMS set (even empty: JAX's own choice), with
JAX_FORCE_TPU_INIT, or with a JAX plugin this module does not know, JAX chooses as it always does.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import pkgutil
from pathlib import Path

_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips on the PCI bus, as JAX's own hardware check finds them


def tpu_present() -> bool:
    """Whether this machine has TPU chips: the device files libtpu opens (/dev/accel* on v4 and v6e, VFIO groups
    on v5e and v5p) or a Google device on the PCI bus. Errs towards yes: a false yes only leaves JAX's choice."""
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if Path(vendor).read_text().strip() == _GOOGLE_PCI_VENDOR:
                return True
        except OSError:  # a device that went away, or an unreadable sysfs: not a TPU we can use
            continue
    return False


def installed_plugins() -> set[str]:
    """The names of the JAX plugins JAX would load (modules under the jax_plugins namespace and the jax_plugins
    entry points), e.g. {"xla_cuda12"}."""
    names = {ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")}
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        names |= {m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)}
    return names


def jax_platforms() -> str | None:
    """The JAX_PLATFORMS value that keeps JAX off the TPU plugin, or None where JAX should choose itself."""
    if "JAX_PLATFORMS" in os.environ or "JAX_FORCE_TPU_INIT" in os.environ or tpu_present():
        return None
    platforms = []
    for name in sorted(installed_plugins()):
        if "cuda" in name:
            platforms.append("cuda")
        elif "rocm" in name:
            if os.path.exists("/dev/kfd"):
                platforms.append("rocm")
        else:  # a plugin this module cannot name the platform of: naming the others would leave it out
            return None
    return ",".join(dict.fromkeys([*platforms, "cpu"]))


def configure_jax() -> None:
    """Set JAX_PLATFORMS (see `jax_platforms`). Call before JAX is imported: JAX reads it at import."""
    platforms = jax_platforms()
    if platforms is not None:
        os.environ["JAX_PLATFORMS"] = platforms
