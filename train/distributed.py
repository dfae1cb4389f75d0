"""Multi-process runs on JAX's own distributed runtime (`jax.distributed`), plus the helpers the loop needs.

Cloud TPU VMs and SLURM/Open MPI clusters detect their coordinator, process count and id themselves
(`--config.distributed.initialize=True` alone); elsewhere pass them (`coordinator_address`, `num_processes`,
`process_id`). On CPU, collectives between processes go through gloo.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize(d) -> None:
  """Starts the distributed runtime per `config.distributed` (a no-op unless d.initialize). Call it before any JAX
  computation in the process."""
  if not d.initialize:
    return
  jax.config.update("jax_cpu_collectives_implementation", d.cpu_collectives)
  kwargs: dict[str, Any] = {}
  if d.coordinator_address:
    kwargs["coordinator_address"] = d.coordinator_address
  if d.num_processes:
    kwargs["num_processes"] = d.num_processes
  if d.process_id >= 0:
    kwargs["process_id"] = d.process_id
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # the runtime raises several types for bad addresses, timeouts or missing settings
    raise ValueError(f"jax.distributed.initialize({kwargs}) failed: {e}; check config.distributed "
                     "(coordinator_address host:port reachable from every process, num_processes, process_id)") from e


def barrier(name: str) -> None:
  """Waits until every process gets here (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def global_batch(batch: dict[str, np.ndarray], sharding) -> dict:
  """This process's rows of a batch -> global arrays laid out by `sharding` (the numpy batch itself with one
  process, where jit places it)."""
  if jax.process_count() == 1:
    return batch
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
