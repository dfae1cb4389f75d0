"""Offloaded inference (FlexGen's idea): per-layer weights and/or the KV cache kept in host memory and streamed to the
device one layer at a time, each layer's weights copied in while the previous layer computes.

`place(model, "weights" | "kv" | "weights,kv")` returns the model with its stacked blocks [layers, ...] in the host
memory kind (`pinned_host`, JAX memory kinds) and `spec.offload` set. Offloaded models stay stacked and scanned
(`unstacked()` returns them as they are, `init_cache` builds a stacked cache, on the host for "kv"). With weights
offloaded the scan runs one layer ahead (`Transformer._scan_offloaded`): iteration i computes layer i with weights
already on the device and copies layer i + 1 in meanwhile (the host stack is stored rolled by one, `roll_layers`, so
the scan's own slice i is layer i + 1); the copy is awaited between layer i's attention and its MLP, which is what
makes XLA's TPU compiler issue it at the top of the iteration, beside the attention (left to the end of the
iteration, it was issued after the layer: `docs/performance.md`). The last iteration copies layer 0 in for the next
call, which `extend` keeps in the cache ("next_layer"), so a decode step copies each layer once. The price is
device memory: the layer computing, the one arriving and the carried copy (GPT-2 float32 compiled for a v5e chip:
temporaries 79 -> 100 MB at batch 8 x 32-token prompts, 155 -> 353 MB at 8 x 160 slots with 40-token prompts, more
than the layers themselves: where XLA spends it is not pinned down). `place(..., ahead=False)`
(`--offload_ahead=false`) keeps one layer in flight instead, copied in by its own iteration, whose MLP weights (two
thirds of its bytes) still arrive while its attention computes.
The embedding, the head and the final norm stay resident: they are used once per step, at either end. With "kv"
each layer's updated cache goes back to the host stack inside its iteration. 8-bit weights (int8 of
`quant=int8_weight|w8a8`, the uint8 code streams of `quant=packed`) are held on the host as 32-bit words of the same
bytes (`pack`) and widened back per layer on the device (`unpack`): XLA's TPU compiler cannot slice one layer out
of an 8-bit host stack in its tiling, so it relayouted the whole stack through device memory on every call (W8A16
GPT-2 decode, v5e: 132 MB of device temporaries and an 85 MB host copy; as 32-bit words, 54 MB and no copy). On a
CPU, host and device memory are the same RAM: the copies compile to nothing, so outputs equal the resident run's
and only accelerators (GPU, TPU) move bytes."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
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


_WIDE = {jnp.dtype(jnp.int8): jnp.int32, jnp.dtype(jnp.uint8): jnp.uint32}


def packable(x) -> bool:
  """Whether `x` (an array or ShapeDtypeStruct of a host stack [layers, ..., n]) is 8-bit with n a multiple of 4."""
  return jnp.dtype(x.dtype) in _WIDE and len(x.shape) >= 2 and x.shape[-1] % 4 == 0


def pack(x):
  """8-bit x [..., n] -> the same bytes as 32-bit words [..., n // 4] (int8 -> int32, uint8 -> uint32)."""
  words = x.reshape(*x.shape[:-1], x.shape[-1] // 4, 4)
  return jax.lax.bitcast_convert_type(words, _WIDE[jnp.dtype(x.dtype)])


def unpack(x, dtype):
  """The inverse of `pack`: 32-bit words [..., m] -> `dtype` (int8 or uint8) [..., 4 * m]."""
  narrow = jax.lax.bitcast_convert_type(x, dtype)
  return narrow.reshape(*x.shape[:-1], x.shape[-1] * 4)


def pack_blocks(model):
  """The model with its stacked blocks' 8-bit leaves packed into 32-bit words (`pack`) and the packed leaves recorded
  in `model.offload_packed` ((key path in the blocks' state, 8-bit dtype name) pairs) for the layer scan to unpack.
  Works on concrete and on abstract (`nnx.eval_shape`) models."""
  graphdef, state = nnx.split(model.blocks)
  packed = []

  def one(path, x):
    if not packable(x):
      return x
    packed.append((jax.tree_util.keystr(path), jnp.dtype(x.dtype).name))
    return pack(x) if isinstance(x, jax.Array) else jax.ShapeDtypeStruct(
        (*x.shape[:-1], x.shape[-1] // 4), _WIDE[jnp.dtype(x.dtype)])

  state = jax.tree_util.tree_map_with_path(one, state)
  model.blocks = nnx.merge(graphdef, state)
  model.offload_packed = tuple(packed)
  return model


def unpack_layer(layer_params, packed: tuple):
  """One layer's slice of a `pack_blocks` stack, on the device: its packed leaves widened back to 8 bits."""
  dtypes = dict(packed)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: unpack(x, dtypes[key]) if (key := jax.tree_util.keystr(path)) in dtypes else x, layer_params)


def roll_layers(tree):
  """Stacked arrays [layers, ...] rolled by one: slot i holds layer i + 1 and the last slot layer 0 (how an
  offloaded model's host stack is stored, so that the layer scan's own slice i is the layer it copies ahead)."""
  return jax.tree.map(lambda a: jnp.roll(a, -1, axis=0), tree)


def first_layer(host_stack):
  """Inside jit: layer 0 of a `roll_layers` host stack (its last slot), copied to device memory."""
  return to_device(jax.tree.map(lambda a: a[-1], host_stack))


def place(model, offload: str, ahead: bool = True):
  """The model with `offload` applied (see the module docstring): a stacked, scanned copy whose blocks' arrays are in
  host memory when weights are offloaded, and `spec.offload` set (the KV cache goes to host memory when
  `init_cache` builds it). `ahead` (weights): copy layer i + 1 in while layer i computes, the host stack stored
  rolled by one; False keeps one layer in flight, copied in by its own scan iteration (fewer device bytes, no
  overlap with the previous layer). ValueError for an unstacked model (load it stacked: every loader does)."""
  check(offload)
  if offload == "none":
    return model
  if isinstance(model.blocks, nnx.List):
    raise ValueError("offload needs the model's stacked blocks (as loaded), not an unstacked() copy")
  model = nnx.merge(*nnx.split(model))  # a copy: the caller's model keeps its arrays and placement
  if "weights" in parts(offload):
    if ahead:
      graphdef, blocks = nnx.split(model.blocks)
      model.blocks = nnx.merge(graphdef, roll_layers(blocks))
    model = pack_blocks(model)
    graphdef, state = nnx.split(model)
    host = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind=HOST_KIND)
    state = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.device_put(x, host) if jax.tree_util.keystr(path).startswith("['blocks']") else x, state)
    model = nnx.merge(graphdef, state)
  model.spec = dataclasses.replace(model.spec, offload=offload, offload_ahead=ahead, scan_layers=True)
  return model


def resident_bytes(model) -> dict[str, int]:
  """Bytes of the model's arrays by memory kind: {'device': ..., 'pinned_host': ...}."""
  out: dict[str, int] = {}
  for leaf in jax.tree.leaves(nnx.state(model)):
    kind = getattr(getattr(leaf, "sharding", None), "memory_kind", None) or "device"
    out[kind] = out.get(kind, 0) + leaf.nbytes
  return out
