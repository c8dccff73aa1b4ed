"""`gemmatune plan`: whether a training run fits a device, before renting it.

The real train step (step.abstract_step: the same function, shardings and settings `gemmatune train` compiles)
is compiled ahead of time from abstract shapes, with no weights and no accelerator, and XLA's own buffer figures
are read back per device:

- TPUs: XLA's TPU compiler for the slice's real topology (libtpu compiles without a TPU; `pip install
  'gemmatune[tpu]'`). A program over the core's memory fails to compile with the bytes it needed, read from the
  error.
- GPUs: XLA's GPU compiler needs a GPU, so the step is compiled by the TPU compiler for a v5p slice of as many
  chips (one device per chip, 95 GiB each, bfloat16 native like a GPU) and its figures are compared with the GPU's
  memory. Weights, adapters and optimizer state are exact whatever the compiler; the activations figure is an
  estimate (BENCHMARKS.md compares the plan with measured peaks).
- CPU: XLA's CPU compiler, on as many simulated host devices.
- gpu (this machine's GPUs): XLA's GPU compiler on the local CUDA backend, with the attention kernel the GPU would
  get; capacity is JAX's memory limit on the first GPU (its memory times XLA_PYTHON_CLIENT_MEM_FRACTION). The
  figures are the same compiler's as a training run's on that GPU.

The figures are what the compiled program holds, so they include whatever XLA copies (tests/test_plan.py checks that
a Gemma 3 stack ending in a partial repeat of its pattern holds no copy of the layer weights).

Each plan compiles in a child process, because the device kind and count are fixed when JAX starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from typing import Any

from gemmatune.config import ModelConfig, TrainConfig, from_hf_dict
from gemmatune.errors import GemmatuneError

GiB = 2**30
MiB = 2**20


@dataclasses.dataclass(frozen=True)
class Device:
    label: str
    platform: str  # what runs the step: cpu, gpu or tpu
    memory: int  # bytes one JAX device can use
    devices: int  # the usual count: one GPU, the cores or chips of the smallest slice
    compiler: str  # "tpu" (the TPU compiler for `topologies`), "cpu", "gpu" (this machine's GPU backend)
    topologies: dict[int, str]  # device count -> TPU topology the step is compiled for


_V5P = {1: "v5p:1x1x1", 2: "v5p:1x2x1", 4: "v5p:2x2x1", 8: "v5p:2x2x2", 16: "v5p:2x2x4"}  # the GPU/v4 stand-in


def _gpu(label: str, mib: int) -> Device:
    # nvidia-smi's total memory; JAX takes XLA_PYTHON_CLIENT_MEM_FRACTION of it (gemmatune sets 0.95 when unset).
    return Device(label, "gpu", int(mib * MiB * 0.95), 1, "tpu", _V5P)


DEVICES: dict[str, Device] = {
    "t4": _gpu("NVIDIA T4 16 GB", 15360),
    "l4": _gpu("NVIDIA L4 24 GB", 23034),
    "a10": _gpu("NVIDIA A10 24 GB", 23028),
    "a100-40gb": _gpu("NVIDIA A100 40 GB", 40960),
    "a100-80gb": _gpu("NVIDIA A100 80 GB", 81920),
    "h100": _gpu("NVIDIA H100 80 GB", 81559),
    # TPUs: JAX devices are v3 cores (two per chip) and the chips of the later generations.
    "tpu-v3": Device("TPU v3 (16 GiB per core)", "tpu", 16 * GiB, 8, "tpu",
                     {2: "v3:1x1", 8: "v3:2x2", 32: "v3:4x4"}),
    "tpu-v4": Device("TPU v4 (32 GiB per chip)", "tpu", 32 * GiB, 4, "tpu", _V5P),  # megacore chips; v5p stands in
    "tpu-v5e": Device("TPU v5e (16 GiB per chip)", "tpu", 16 * GiB, 8, "tpu",
                      {1: "v5e:1x1", 4: "v5e:2x2", 8: "v5e:2x4", 16: "v5e:4x4"}),
    "tpu-v5p": Device("TPU v5p (95 GiB per chip)", "tpu", 95 * GiB, 4, "tpu", _V5P),
    "tpu-v6e": Device("TPU v6e (32 GiB per chip)", "tpu", 32 * GiB, 8, "tpu",
                      {1: "v6e:1x1", 4: "v6e:2x2", 8: "v6e:2x4", 16: "v6e:4x4"}),
    "cpu": Device("this machine's CPU", "cpu", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), 1, "cpu",
                  {}),
    # The memory is read from the GPU when planning (0: not known before).
    "gpu": Device("this machine's GPU", "gpu", 0, 1, "gpu", {}),
}
PARTS = ("weights", "adapters", "optimizer", "activations", "other")


@dataclasses.dataclass(frozen=True)
class Plan:
    """One configuration on one device kind, and what it needs per device."""

    changes: str  # what differs from the plan asked for ("" for that plan), as the flags that would set it
    mesh: dict[str, int]
    bytes: dict[str, int]  # PARTS and "total", per device
    capacity: int
    fits: bool
    note: str = ""  # e.g. the compiler's message when it ran out of memory; what "activations" includes

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def plan(cfg: ModelConfig, tcfg: TrainConfig, device: str, *, devices: int | None = None, mesh: str = "",
         memory: int | None = None, suggest: bool = True, teacher: ModelConfig | None = None) -> list[Plan]:
    """The plan for `tcfg` (its batch_size, grad_accum, data.max_seq_len, lora, remat, dtype, tune, method) on
    `devices` of kind `device` (memory overrides the table's bytes per device). `teacher`: the config of method
    distill's teacher, run in the step (its weights count among the weights; with a teacher cache, pass None).
    When it does not fit and `suggest`, the plans tried to make it fit follow it, cheapest change first, up to the
    first that fits."""
    if device not in DEVICES:
        raise GemmatuneError(f"--device {device!r} is not one of {', '.join(DEVICES)}; or pass the closest one with "
                             "--memory-gib set to your device's memory.")
    kind = DEVICES[device]
    n = devices or kind.devices
    if kind.compiler == "tpu" and kind.platform == "gpu" and tcfg.attention in ("flash", "cudnn"):
        raise GemmatuneError(f"--attention {tcfg.attention}: a GPU kernel is planned only on the GPU itself "
                             f"(--device gpu); {device} is compiled for a TPU stand-in. Use --attention auto or xla.")
    if kind.compiler == "tpu":
        if n not in kind.topologies:
            raise GemmatuneError(f"--devices {n}: plans for {device} cover {', '.join(map(str, kind.topologies))} "
                                 "devices.")
        _require_libtpu(device)
    if kind.compiler == "gpu":
        _require_cuda()
    with _Compiler(kind, n, memory or kind.memory or None) as compiler:
        out = [compiler.plan(_request(cfg, tcfg, mesh, "", teacher))]
        for request in _candidates(tcfg, mesh, n, cfg, teacher) if suggest and not out[0].fits else []:
            out.append(compiler.plan(request))
            if out[-1].fits:
                break
    return out


def _candidates(tcfg: TrainConfig, mesh: str, n: int, cfg: ModelConfig, teacher: ModelConfig | None = None
                ) -> list[dict[str, Any]]:
    """Changes that lower the memory per device, cheapest in speed first: recompute each layer in the backward pass,
    then halve the micro-batch (doubling accumulation: the same effective batch), then split the weights further."""
    out, remat = [], tcfg.remat
    if remat != "full":
        remat = "full"
        out.append(_request(cfg, dataclasses.replace(tcfg, remat=remat), mesh, "--remat full", teacher))
    t = dataclasses.replace(tcfg, remat=remat)
    while t.batch_size > 1 and t.batch_size % 2 == 0:
        t = dataclasses.replace(t, batch_size=t.batch_size // 2, grad_accum=t.grad_accum * 2)
        out.append(_request(cfg, t, mesh, f"--remat {remat} --batch-size {t.batch_size} --grad-accum {t.grad_accum}",
                            teacher))
    # Weights split over every device: fsdp shards what the model axis cannot. fsdp groups take whole rows, so as
    # many as divide the batch; the model axis takes the rest.
    fsdp = math.gcd(n, tcfg.batch_size)
    if fsdp > 1:
        split = f"fsdp={fsdp}" + (f",model={n // fsdp}" if fsdp < n else "")
        out.append(_request(cfg, dataclasses.replace(tcfg, remat=remat), split, f"--remat {remat} --mesh {split}",
                            teacher))
    return out


def _request(cfg: ModelConfig, tcfg: TrainConfig, mesh: str, changes: str, teacher: ModelConfig | None = None
             ) -> dict[str, Any]:
    from gemmatune.settings import to_dict

    return {"model": cfg.to_hf_dict(), "train": to_dict(tcfg), "mesh": mesh, "changes": changes,
            "teacher": teacher.to_hf_dict() if teacher else None}


def plan_here(cfg: ModelConfig, tcfg: TrainConfig, *, devices: int = 1, mesh: str = "",
              memory: int | None = None, teacher: ModelConfig | None = None) -> Plan:
    """The plan for `tcfg` on the first `devices` of this process's own JAX devices, compiled in this process: what
    `plan --device cpu` or `--device gpu` computes in its child. For a process that already runs on the device (a
    benchmark that measures the same step: benchmarks/gpu.py). memory: the capacity (default: the device's)."""
    import jax

    job = {"compiler": jax.default_backend(), "devices": devices, "topology": "", "capacity": memory,
           **_request(cfg, tcfg, mesh, "", teacher)}
    return Plan(**_child(job, jax.devices()))


def _require_cuda() -> None:
    from gemmatune.platforms import installed_plugins

    if not any("cuda" in name for name in installed_plugins()):
        kinds = ", ".join(k for k, d in DEVICES.items() if d.platform == "gpu" and d.compiler == "tpu")
        raise GemmatuneError("--device gpu plans on this machine's GPU with JAX's CUDA backend, which is not "
                             "installed here (no NVIDIA GPU, or no 'jax[cuda12]'); plan for a GPU kind from the "
                             f"table instead ({kinds}), with --memory-gib for another size.")


def _require_libtpu(device: str) -> None:
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        raise GemmatuneError(f"planning for {device} compiles with XLA's TPU compiler (no TPU needed), which is not "
                             "installed: pip install 'gemmatune[tpu]'.")


class _Compiler:
    """A child process that compiles plans for `n` devices of `kind`, one request per line on its stdin."""

    def __init__(self, kind: Device, n: int, capacity: int | None) -> None:
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        if kind.compiler == "gpu":
            # The CUDA backend, the default one (the step then picks the GPU's attention kernel); no preallocation,
            # so that a plan beside a training run on the same GPU neither fails nor takes its memory (JAX's limit,
            # the capacity, is the GPU's memory times XLA_PYTHON_CLIENT_MEM_FRACTION either way).
            env.update(JAX_PLATFORMS="cuda,cpu", XLA_PYTHON_CLIENT_PREALLOCATE="false")
        elif kind.compiler == "cpu":
            if n > 1:  # one CPU device is JAX's default: XLA_FLAGS (a cache key) left unchanged
                env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
        else:  # libtpu, off a TPU VM: no metadata server to ask, and no warnings about it
            env.update(TPU_SKIP_MDS_QUERY="1", TPU_ACCELERATOR_TYPE="v3-8", TPU_WORKER_HOSTNAMES="localhost")
            # Compiling needs no TPU device: without this, libtpu refuses to load while another process holds
            # /tmp/libtpu_lockfile (a training run on this TPU VM, another plan), and once loaded here it holds the
            # lock against them. With it, libtpu loads without checking or taking the lock.
            env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
        self._job = {"compiler": kind.compiler, "devices": n, "topology": kind.topologies.get(n, ""),
                     "capacity": capacity}
        self._proc = subprocess.Popen([sys.executable, "-m", "gemmatune.plan"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def plan(self, request: dict[str, Any]) -> Plan:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        try:
            self._proc.stdin.write(json.dumps({**self._job, **request}) + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            pass  # the child died: its stderr says why, below
        line = self._proc.stdout.readline()
        if not line:
            assert self._proc.stderr is not None
            lines = [ln for ln in self._proc.stderr.read().splitlines()
                     if ln.strip() and not re.match(r"^[WIE]\d{4} ", ln)]
            raise GemmatuneError("planning failed while compiling the train step: " + " | ".join(lines[-3:]))
        result = json.loads(line)
        if "error" in result:  # a setting the mesh cannot take (e.g. a batch that does not divide): the user's to fix
            raise GemmatuneError(result["error"])
        return Plan(**result)

    def __enter__(self) -> _Compiler:
        return self

    def __exit__(self, *exc: object) -> None:
        self._proc.kill()
        self._proc.wait()


# --- the child process ------------------------------------------------------------------------------------------

_OOM = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT])")


def _per_device(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded jax.ShapeDtypeStructs."""
    import jax
    import numpy as np

    def nbytes(a: Any) -> int:
        shape = a.sharding.shard_shape(a.shape) if a.sharding is not None else a.shape
        itemsize = 8 if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else np.dtype(a.dtype).itemsize
        return math.prod(shape) * itemsize

    return sum(nbytes(a) for a in jax.tree.leaves(tree))


def _devices(job: dict[str, Any]) -> list[Any]:
    """The devices a plan compiles for: a TPU topology's (no TPU needed), this process's GPUs, or its CPU devices."""
    import jax

    if job["compiler"] == "gpu":
        try:
            return jax.devices("gpu")
        except Exception as e:  # no GPU, no driver, a CUDA that does not start: JAX's own words, first line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GemmatuneError(f"--device gpu plans on this machine's GPU, and JAX found none it can use "
                                 f"({first[:200]}).") from None
    if job["compiler"] != "tpu":
        return jax.devices()
    from jax.experimental import topologies

    # A single chip is its own host; larger slices use libtpu's default host bounds.
    one_host = {"chips_per_host_bounds": (1, 1, 1)} if job["topology"] in ("v3:1x1", "v5e:1x1", "v6e:1x1",
                                                                            "v5p:1x1x1") else {}
    return topologies.get_topology_desc(topology_name=job["topology"], platform="tpu", **one_host).devices


def _child(job: dict[str, Any], devices: list[Any]) -> dict[str, Any]:
    """One plan: job holds the device (compiler, devices, topology, capacity) and the request."""
    from gemmatune import sharding
    from gemmatune.settings import config_from_dict
    from gemmatune.step import Shapes, abstract_step

    cfg = from_hf_dict(job["model"])
    tcfg = config_from_dict(job["train"])
    teacher = from_hf_dict(job["teacher"]) if job.get("teacher") else None
    if job["devices"] > len(devices):
        raise GemmatuneError(f"--devices {job['devices']}: this machine has {len(devices)} "
                             f"{devices[0].platform.upper()} device{'s' if len(devices) > 1 else ''}.")
    capacity = job["capacity"] or _capacity(devices[0])
    if job["compiler"] == "gpu":  # a forced kernel this GPU cannot run is refused as `train` refuses it
        from gemmatune.attention import check_forced

        check_forced(tcfg.attention, "gpu", cfg, tcfg.data.max_seq_len)
    mesh = sharding.make_mesh(job["mesh"] or None, devices[:job["devices"]], cfg, tcfg.batch_size)
    sharding.check_batch(mesh, tcfg.batch_size)
    step, (state, frozen, batches) = abstract_step(cfg, tcfg, mesh, Shapes(tcfg.grad_accum, tcfg.batch_size,
                                                                             tcfg.data.max_seq_len), teacher)
    parts = {"weights": _per_device(frozen), "adapters": _per_device(state["params"]),
             "optimizer": _per_device(state["opt_state"]), "other": _per_device(batches)}
    notes, refused = [], False
    if job["compiler"] == "gpu":
        fraction = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75, JAX's default")
        notes.append(f"compiled for this machine's {devices[0].device_kind}; capacity: JAX's memory limit on it "
                     f"(XLA_PYTHON_CLIENT_MEM_FRACTION {fraction})" if not job["capacity"] else
                     f"compiled for this machine's {devices[0].device_kind}")
    if teacher is not None:
        notes.append(f"weights: {_per_device(frozen['teacher']) / GiB:.2f} GiB of them the teacher's")
    quant = tcfg.quantization()
    if quant is not None:  # the one place, text and JSON, that says what "weights" are
        notes.append(f"weights: the base's projections quantized ({quant.describe()}), embedding and norms "
                     f"{tcfg.dtype}")
    try:
        stats = step.lower(state, frozen, batches).compile().memory_analysis()
        parts["activations"] = stats.temp_size_in_bytes
        parts["other"] += max(stats.output_size_in_bytes - stats.alias_size_in_bytes, 0)
    except Exception as e:  # the TPU compiler refuses a program larger than the core's memory, saying how large
        found = _OOM.search(str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not found:
            raise
        parts["activations"] = int(float(found[1]) * 1024 ** "KMGT".index(found[2]) * 1024)
        refused = True
        notes.append("over the device's memory at compile time: " + str(e).split("\n")[0][:200])
    total = sum(parts.values())
    return Plan(job["changes"], dict(mesh.shape), {**{p: parts[p] for p in PARTS}, "total": total},
                capacity, total <= capacity and not refused, "; ".join(notes)).to_json()


def _capacity(device: Any) -> int:
    """Bytes the device's allocator may hand out (a GPU: its memory times XLA_PYTHON_CLIENT_MEM_FRACTION); a CPU
    device reports none: the machine's memory."""
    stats = device.memory_stats() or {}
    return int(stats["bytes_limit"]) if "bytes_limit" in stats else DEVICES["cpu"].memory


if __name__ == "__main__":
    _found: list[Any] = []
    for line in sys.stdin:
        job = json.loads(line)
        try:
            _found = _found or _devices(job)
            answer = _child(job, _found)
        except GemmatuneError as e:
            answer = {"error": str(e)}
        print(json.dumps(answer), flush=True)
