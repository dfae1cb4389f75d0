"""Offloaded inference (FlexGen's idea): per-layer weights and/or the KV cache kept in host memory and streamed to the
device one layer per scan iteration.

`place(model, "weights" | "kv" | "weights,kv")` returns the model with its stacked blocks [layers, ...] in the host
memory kind (`pinned_host`, JAX memory kinds) and `spec.offload` set. Offloaded models stay stacked and scanned
(`unstacked()` returns them as they are, `init_cache` builds a stacked cache, on the host for "kv"): each iteration
of the layer scan (`Transformer.scan_units`) copies its layer's slice to the device, so one layer is in flight by
construction (an unrolled list of per-layer copies let XLA's TPU compiler schedule about half of them at once).
Overlap, as XLA's TPU compiler schedules it (GPT-2, v5e): every slice of a layer starts copying at the top of its
iteration and each matmul waits only for its own weights, so the MLP's (two thirds of a layer's bytes) arrive while
attention computes; the copies do not run ahead into the next layer (one-layer-ahead variants, tried, held more
temporaries or were scheduled after the compute: `docs/performance.md`).
The embedding, the head and the final norm stay resident: they are used once per step, at either end. With "kv"
each layer's updated cache goes back to the host stack inside its iteration. On a CPU, host and device
memory are the same RAM: the copies compile to nothing, so outputs equal the resident run's and only accelerators
(GPU, TPU) move bytes."""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

OFFLOADS = ("none", "weights", "kv", "weights,kv")
HOST_KIND = "pinned_host"


def parts(offload: str) -> frozenset[str]:
  """'weights,kv' -> {'weights', 'kv'}; 'none' -> {}."""
  return frozenset() if offload == "none" else frozenset(offload.split(","))


def check(offload: str, device=None) -> None:
  """ValueError naming the bad value unless `offload` is one of OFFLOADS and the device has a host memory kind."""
  if offload not in OFFLOADS:
    raise ValueError(f"offload={offload!r} must be one of {list(OFFLOADS)}")
  if offload == "none":
    return
  device = device or jax.devices()[0]
  kinds = [m.kind for m in device.addressable_memories()]
  if HOST_KIND not in kinds:
    raise ValueError(f"offload={offload!r} needs the {HOST_KIND!r} memory kind, but {device.platform} device "
                     f"{device} has only {kinds}")


def to_device(tree):
  """Inside jit: every array of `tree` copied to device memory (a no-op for arrays already there)."""
  return jax.tree.map(lambda a: jax.device_put(a, jax.memory.Space.Device), tree)


def to_host(tree):
  """Inside jit: every array of `tree` copied to host memory."""
  return jax.tree.map(lambda a: jax.device_put(a, jax.memory.Space.Host), tree)


def place(model, offload: str):
  """The model with `offload` applied (see the module docstring): a stacked, scanned copy whose blocks' arrays are in
  host memory when weights are offloaded, and `spec.offload` set (the KV cache goes to host memory when
  `init_cache` builds it). ValueError for an unstacked model (load it stacked: every loader does)."""
  check(offload)
  if offload == "none":
    return model
  if isinstance(model.blocks, nnx.List):
    raise ValueError("offload needs the model's stacked blocks (as loaded), not an unstacked() copy")
  graphdef, state = nnx.split(model)
  if "weights" in parts(offload):
    host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind=HOST_KIND)
    state = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.device_put(x, host) if jax.tree_util.keystr(path).startswith("['blocks']") else x, state)
  model = nnx.merge(graphdef, state)  # new arrays where placed: the caller's model keeps its placement
  model.spec = dataclasses.replace(model.spec, offload=offload, scan_layers=True)
  return model


def resident_bytes(model) -> dict[str, int]:
  """Bytes of the model's arrays by memory kind: {'device': ..., 'pinned_host': ...}."""
  out: dict[str, int] = {}
  for leaf in jax.tree.leaves(nnx.state(model)):
    kind = getattr(getattr(leaf, "sharding", None), "memory_kind", None) or "device"
    out[kind] = out.get(kind, 0) + leaf.nbytes
  return out
