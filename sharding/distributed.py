"""Multi-process start-up: a thin wrapper around `jax.distributed.initialize`."""

from __future__ import annotations

import jax


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_count: int | None = None,
) -> None:
    """Join a multi-process JAX runtime; a no-op for a single process.

    On TPU pods and SLURM all arguments may be None (JAX detects them). On CPU
    (several processes on 127.0.0.1 standing in for a pod) pass all three.
    Must run before any other JAX call touches a device.
    """
    if num_processes is not None and num_processes <= 1 and coordinator_address is None:
        return
    if jax.distributed.is_initialized():
        return
    kwargs = {}
    if local_device_count is not None:
        kwargs["local_device_ids"] = list(range(local_device_count))
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        **kwargs,
    )


def is_primary() -> bool:
    """True on process 0, which writes logs, metrics and plots."""
    return jax.process_index() == 0
