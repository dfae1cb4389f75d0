"""Offloaded inference (FlexGen's idea): per-layer weights and/or the KV cache kept in host memory and streamed to the
device layer by layer, each layer's copy issued before the previous layer's compute so the two overlap.

`place(model, "weights" | "kv" | "weights,kv")` returns the model with its per-layer blocks (unstacked) in the host
memory kind (`pinned_host`, JAX memory kinds) and `spec.offload` set; the forward pass (`Transformer._run_unit_list`)
then moves layer i + 1's weights (and cache) to device memory while layer i runs, and writes each layer's updated
cache back to host memory. The embedding, the head and the final norm stay resident: they are used once per step,
at either end. The aim is two layers in flight on the device instead of all of them; XLA's TPU compiler keeps
about half of GPT-2's layers live (README, "Offloaded inference"). On a CPU, host and device
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
  """The model with `offload` applied (see the module docstring): an `unstacked()` copy whose blocks' arrays are in
  host memory when weights are offloaded, and `spec.offload` set (the KV cache goes to host memory when
  `init_cache(per_layer=True)` builds it)."""
  check(offload)
  if offload == "none":
    return model
  model = model.unstacked()
  graphdef, state = nnx.split(model)
  model = nnx.merge(graphdef, state)  # a copy: the caller's model keeps its placement
  model.spec = dataclasses.replace(model.spec, offload=offload)
  if "weights" in parts(offload):
    device = jax.devices()[0]
    host = jax.sharding.SingleDeviceSharding(device, memory_kind=HOST_KIND)
    for block in model.blocks:
      block_graphdef, block_state = nnx.split(block)
      nnx.update(block, jax.device_put(block_state, host))
  return model


def resident_bytes(model) -> dict[str, int]:
  """Bytes of the model's arrays by memory kind: {'device': ..., 'pinned_host': ...}."""
  out: dict[str, int] = {}
  for leaf in jax.tree.leaves(nnx.state(model)):
    kind = getattr(getattr(leaf, "sharding", None), "memory_kind", None) or "device"
    out[kind] = out.get(kind, 0) + leaf.nbytes
  return out
