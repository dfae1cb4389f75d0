"""Offloaded inference (model/offload.py): weights and KV cache in host memory, streamed layer by layer; outputs equal
the resident run's, the program moves each layer in, and the planner counts device bytes with and without it."""

import dataclasses
import importlib.util
import re
import types

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import random_model
from configs import base, tiny
from infer import generate as G
from model import offload
from model import quant
from model import transformer
from model.transformer import ModelSpec
from scripts import plan

PROMPTS = [[5, 6, 7, 8, 5, 6, 7], [1, 2, 3]]
TPU_REASON = "libtpu is not installed (pip install -e '.[tpu]'), so nothing can be compiled for a TPU here"


def test_offloaded_decoding_equals_resident_decoding_and_keeps_the_layers_in_host_memory():
  model = random_model("llama", max_len=48, seed=2)
  want = G.generate(model, PROMPTS, max_new_tokens=12)
  for setting, ahead in (("weights", True), ("kv", True), ("weights,kv", True), ("weights", False),
                         ("weights,kv", False)):
    placed = offload.place(model, setting, ahead=ahead)
    assert placed.spec.offload == setting and placed.spec.offload_ahead == ahead and model.spec.offload == "none"
    assert placed.unstacked() is placed  # offloaded models stay stacked: the layer scan streams one layer at a time
    got = G.generate(placed, PROMPTS, max_new_tokens=12)
    assert got == want, setting
    kinds = {leaf.sharding.memory_kind for leaf in jax.tree.leaves(nnx.state(placed.blocks))}
    assert kinds == ({"pinned_host"} if "weights" in setting else {"device"}), (setting, kinds)
    if "weights" in setting:  # ahead: stored rolled by one, so the layer scan's slice i is layer i + 1
      for host, layers in zip(jax.tree.leaves(nnx.state(placed.blocks)), jax.tree.leaves(nnx.state(model.blocks))):
        np.testing.assert_array_equal(np.asarray(host), np.roll(np.asarray(layers), -1 if ahead else 0, axis=0))
    # the embedding and head stay resident; the caller's model is untouched
    assert placed.embed[...].sharding.memory_kind == "device"
    assert offload.resident_bytes(model) == {"device": sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))}
  for ahead in (True, False):
    placed = offload.place(model, "weights,kv", ahead=ahead)
    assert G.generate(placed, PROMPTS, max_new_tokens=12, speculate="lookup") == want
  tokens = jax.numpy.asarray([PROMPTS[0]])  # the offloaded forward equals the stacked (scanned) one
  for ahead in (True, False):
    np.testing.assert_allclose(offload.place(model, "weights", ahead=ahead)(tokens), model(tokens), rtol=1e-5,
                               atol=1e-5)
  bytes_by_kind = offload.resident_bytes(placed)
  assert bytes_by_kind["pinned_host"] == sum(x.nbytes for x in jax.tree.leaves(nnx.state(model.unstacked().blocks)))


def test_8bit_weights_are_held_as_32bit_words_on_the_host_and_decode_as_the_resident_model():
  rng = np.random.default_rng(0)
  for dtype in (np.int8, np.uint8):  # int8 weights (W8A16, W8A8) and the uint8 code streams of quant=packed
    x = jax.numpy.asarray(rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max + 1, (3, 5, 8), dtype=dtype))
    words = offload.pack(x)
    assert words.shape == (3, 5, 2) and words.dtype.itemsize == 4 and words.nbytes == x.nbytes
    np.testing.assert_array_equal(np.asarray(offload.unpack(words, x.dtype)), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(offload.unpack(words[1], x.dtype)), np.asarray(x[1]))  # one layer
  assert not offload.packable(jax.ShapeDtypeStruct((3, 6), np.int8)) and not offload.packable(x[0, 0])
  model = random_model("llama", max_len=48, seed=3)
  qspec, qparams = quant.quantize_model_params(model.spec, nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                                               "int8_weight")
  qmodel = transformer.from_params(qspec, qparams)
  want = G.generate(qmodel, PROMPTS, max_new_tokens=10)
  placed = offload.place(qmodel, "weights")
  assert G.generate(placed, PROMPTS, max_new_tokens=10) == want
  host = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(placed.blocks))}
  packed = dict(placed.offload_packed)
  assert packed and set(packed.values()) == {"int8"} and not hasattr(qmodel, "offload_packed")
  for key in packed:
    assert host[key].dtype == np.int32 and host[key].sharding.memory_kind == "pinned_host", key
  assert offload.resident_bytes(placed)["pinned_host"] == sum(
      x.nbytes for x in jax.tree.leaves(nnx.state(qmodel.blocks)))


def test_bad_offload_settings_and_backends_without_host_memory_are_refused():
  model = random_model(max_len=16)
  with pytest.raises(ValueError, match=r"offload='disk' must be one of \['none', 'weights', 'kv', 'weights,kv'\]"):
    offload.place(model, "disk")
  no_host = types.SimpleNamespace(platform="metal", addressable_memories=lambda: [types.SimpleNamespace(kind="device")])
  with pytest.raises(ValueError, match="needs the 'pinned_host' memory kind, but metal device .* has only \\['device'\\]"):
    offload.check("weights", no_host)
  offload.check("none", no_host)  # nothing to offload: nothing to check
  with pytest.raises(ValueError, match="needs the model's stacked blocks"):
    offload.place(model.unstacked(), "weights")


def test_the_planner_counts_device_bytes_with_and_without_offload():
  c = tiny.get_config()
  c.model.num_layers = 6  # two in flight of six
  base.validate(c)
  spec = ModelSpec.from_config(c.model)
  rows = {r["offload"]: r for r in plan.decode_plan(spec, batch=4, context=spec.max_len, device_memory_gb=1.0)}
  params = jax.eval_shape(lambda: transformer.init_params(spec, 0))
  blocks = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params["blocks"]))
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  kv = 2 * spec.num_layers * 4 * spec.max_len * spec.num_kv_heads * spec.head_dim * 4
  two = 2 / spec.num_layers
  assert rows["none"]["device"] == total + kv and rows["none"]["host"] == 0
  assert rows["weights"]["device"] == pytest.approx(total - blocks + two * blocks + kv)
  assert rows["kv"]["device"] == pytest.approx(total + two * kv) and rows["kv"]["host"] == kv
  assert rows["weights,kv"]["host"] == blocks + kv
  assert rows["weights,kv"]["device"] < rows["weights"]["device"] < rows["none"]["device"]
  assert all(r["fits"] for r in rows.values())
  assert np.isclose(rows["weights,kv"]["device"] + rows["weights,kv"]["host"],
                    rows["none"]["device"] + two * (blocks + kv))


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason=TPU_REASON)
def test_on_a_tpu_the_offloaded_weights_are_host_arguments_of_the_compiled_decode_program():
  c = tiny.get_config()
  c.model.num_layers = 6
  base.validate(c)
  spec = ModelSpec.from_config(c.model)
  device = plan.topology_devices("v5e:2x2")[0]
  # weights (19 MB) outweighing the activations, as in the models offloading is for
  wspec = dataclasses.replace(spec, embed_dim=256, mlp_dim=1024)
  resident = plan.tpu_decode_memory(wspec, device, batch=2, prompt_len=8, new_tokens=8, offload="none")
  offloaded = plan.tpu_decode_memory(wspec, device, batch=2, prompt_len=8, new_tokens=8, offload="weights")
  params = jax.eval_shape(lambda: transformer.init_params(wspec, 0))
  blocks = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params["blocks"]))
  assert resident["host_argument"] == 0
  assert offloaded["host_argument"] >= blocks  # (TPU layouts may pad small arrays)
  assert offloaded["argument"] <= resident["argument"] - blocks
  # the weights are not all copied back in: the device holds a few layers of six (the one computing, the next one
  # being copied in and the next call's first)
  assert offloaded["argument"] + offloaded["temp"] < resident["argument"] + resident["temp"] - blocks / 2, (
      offloaded, resident, blocks)
  # with one layer in flight (no copy ahead), fewer bytes still
  one = plan.tpu_decode_memory(wspec, device, batch=2, prompt_len=8, new_tokens=8, offload="weights", ahead=False)
  assert one["argument"] == offloaded["argument"] and one["temp"] < offloaded["temp"], (one, offloaded)
  params = jax.eval_shape(lambda: transformer.init_params(spec, 0))
  # each layer's updated cache goes back to host memory inside the layer scan, so the cache never passes whole
  # through the device. At batch 16 the cache (3.1 MB) outweighs the rest: measured 7.1 MB on the device against
  # 8.1 MB resident; copied out after the scan, as before, it took 13.4 MB
  cache = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(
      lambda: transformer.from_params(spec, params).init_cache(16, spec.max_len))))
  kv_offloaded, resident_16 = (plan.tpu_decode_memory(spec, device, batch=16, prompt_len=8, new_tokens=8, offload=o)
                               for o in ("kv", "none"))
  assert kv_offloaded["host_temp"] >= cache
  assert kv_offloaded["argument"] + kv_offloaded["temp"] < resident_16["argument"] + resident_16["temp"], (
      kv_offloaded, resident_16, cache)
  # the program moves each layer's weights and cache to the device and each updated cache back, in the prefill and
  # in the decode loop; resident, it moves nothing
  text = plan.lower_decode(spec, device, batch=2, prompt_len=8, new_tokens=8, offload="weights,kv").as_text()
  to_device = text.count('_xla_buffer_placement = "device"')
  to_host = text.count('_xla_buffer_placement = "pinned_host"')
  per_layer_weights = len(jax.tree.leaves(params["blocks"]))  # stacked leaves: one array per layer each
  # (one layer scan: each iteration copies its slice of the weights and the cache in, and the cache goes back)
  assert to_device >= per_layer_weights + 2 and to_host >= 2, (to_device, to_host)
  assert "annotate_device_placement" not in plan.lower_decode(spec, device, 2, 8, 8, "none").as_text()
  # int8 weights go to the host as 32-bit words and are sliced per layer as they are: without that, XLA's TPU compiler
  # relayouted the whole int8 stack through device memory (GPT-2 W8A16: 132 MB of device temporaries and an 85 MB
  # host copy) or, for the small model here, failed ("Shape mismatch between parameter number 0 and its operand")
  small = plan.tpu_decode_memory(dataclasses.replace(spec, quant="int8_weight", matmul_impl="pallas"), device,
                                 batch=2, prompt_len=8, new_tokens=8, offload="weights")
  assert small["host_temp"] == 0, small
  qspec = dataclasses.replace(wspec, quant="int8_weight", matmul_impl="pallas")
  q_resident = plan.tpu_decode_memory(qspec, device, batch=2, prompt_len=8, new_tokens=8, offload="none")
  q_blocks = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(
      lambda: nnx.state(transformer.Transformer(qspec, rngs=nnx.Rngs(params=0)).blocks))))
  for ahead in (False, True):
    q_offloaded = plan.tpu_decode_memory(qspec, device, batch=2, prompt_len=8, new_tokens=8, offload="weights",
                                         ahead=ahead)
    assert q_offloaded["host_temp"] == 0 and q_offloaded["host_argument"] >= q_blocks, (ahead, q_offloaded)
    # one layer in flight: most of the weights' bytes off the device. Copied ahead, three of these six layers are on
    # it (the one computing, the next arriving, the carried copy), each also widened for the Mosaic kernel
    saved = q_blocks / 2 if not ahead else 0
    assert q_offloaded["argument"] + q_offloaded["temp"] < q_resident["argument"] + q_resident["temp"] - saved, (
        ahead, q_offloaded, q_resident, q_blocks)


def _layer_scan_schedules(hlo_text: str) -> list[list[str]]:
  """For each loop body of a compiled TPU program that copies slices of a host stack in: its sequence of
  'start' (a host slice copy issued), 'done' (one awaited) and 'compute' (a fusion holding a convolution: a matmul)."""
  computations = re.split(r"\n(?=(?:ENTRY )?%[\w.\-]+ .*\{\s*$)", hlo_text, flags=re.M)
  name = lambda c: c.split(" ", 1)[0].removeprefix("ENTRY ").lstrip("%")  # noqa: E731
  with_dot = {name(c) for c in computations if " convolution(" in c}
  schedules = []
  for c in computations:
    if "dynamic-slice-start(" not in c or c.startswith("ENTRY"):  # (the entry copies the first layer in once)
      continue
    seq = []
    for line in c.split("\n")[1:]:
      if "dynamic-slice-start(" in line:
        seq.append("start")
      elif "dynamic-slice-done(" in line:
        seq.append("done")
      elif " convolution(" in line or any(f"calls=%{n}," in line or line.rstrip().endswith(f"calls=%{n}")
                                          for n in re.findall(r"calls=%([\w.\-]+)", line) if n in with_dot):
        seq.append("compute")
    schedules.append(seq)
  return schedules


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason=TPU_REASON)
def test_on_a_tpu_each_layer_is_copied_in_while_the_previous_layer_computes():
  """The compiled schedule of the layer scan (prefill and decode): the layer computing uses weights that are already
  on the device (no copy awaited before its first matmul), the next layer's copies are issued before or among the
  attention's matmuls and awaited after them, and the MLP's matmuls follow."""
  c = tiny.get_config()
  c.model.num_layers = 6
  base.validate(c)
  spec = ModelSpec.from_config(c.model)
  device = plan.topology_devices("v5e:2x2")[0]
  for setting in ("weights",):  # (with "kv" too, each layer's cache slice is also copied in, and awaited first)
    text = plan.lower_decode(spec, device, batch=2, prompt_len=8, new_tokens=8, offload=setting).compile().as_text()
    schedules = _layer_scan_schedules(text)
    assert len(schedules) >= 2, setting  # the prefill's layer scan and the decode step's
    for seq in schedules:
      starts = [i for i, op in enumerate(seq) if op == "start"]
      dones = [i for i, op in enumerate(seq) if op == "done"]
      computes = [i for i, op in enumerate(seq) if op == "compute"]
      assert starts and dones and computes, (setting, seq)
      assert min(computes) < min(dones), (setting, seq)  # this layer's weights came with the carry
      assert max(starts) < min(dones), (setting, seq)  # every copy is in flight before any is awaited
      assert any(min(starts) < i < min(dones) for i in computes), (setting, seq)  # ... while matmuls run
      assert max(computes) > max(dones), (setting, seq)  # and the MLP runs after the copies land
