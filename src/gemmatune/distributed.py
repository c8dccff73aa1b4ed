"""Several processes (one per host) training one model: joining them, who writes, and waiting for each other.

Every process runs the same command. After `initialize`, jax.devices() lists every process's devices and the mesh
spans them all; each process reads only its own rows of each batch (data/loader.py `take`), and process 0 alone
writes the run directory (checkpoints, adapter, logs), between barriers so that no process runs ahead of a write.
"""

from __future__ import annotations

import jax

from gemmatune.config import TrainConfig
from gemmatune.errors import GemmatuneError


def initialize(tcfg: TrainConfig) -> None:
    """jax.distributed.initialize from the settings: explicit (coordinator_address, num_processes, process_id), or
    with `distributed` alone JAX's detection of the cluster (TPU pod slice, SLURM, Open MPI, Kubernetes). Without
    either, nothing: one process. Must run before anything else touches the devices."""
    explicit = bool(tcfg.coordinator_address) or tcfg.num_processes is not None or tcfg.process_id is not None
    if not (explicit or tcfg.distributed) or jax.distributed.is_initialized():
        return
    try:
        jax.distributed.initialize(coordinator_address=tcfg.coordinator_address or None,
                                   num_processes=tcfg.num_processes, process_id=tcfg.process_id)
    except (ValueError, RuntimeError, TypeError) as e:
        raise GemmatuneError(
            f"could not start the processes ({e}). Give every process --coordinator-address HOST:PORT (process 0's "
            "address), --num-processes N and its own --process-id, or launch with --distributed where JAX finds the "
            "cluster itself (every worker of a TPU pod slice, or srun under SLURM).") from None


def is_main() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier of this name (nothing to wait for in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
