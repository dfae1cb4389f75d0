"""Memory planner: the analytic per-device estimate against XLA's memory analysis of the compiled step."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from configs import base, tiny
from scripts import plan

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(**mesh):
  c = tiny.get_config()
  c.mesh.update({"data": 1, **mesh})
  return c


@pytest.mark.parametrize("name,mesh,model", [
    ("one device, no remat", {}, {}),
    ("one device, full remat", {}, {"remat": "full"}),
    ("llama, save_dots", {}, {"family": "llama", "remat": "save_dots"}),
    ("data x fsdp x tensor", {"data": 2, "fsdp": 2, "tensor": 2}, {}),
    ("fsdp 8", {"fsdp": 8}, {}),
    ("pipeline 2", {"pipeline": 2}, {"num_layers": 4}),
])
def test_estimate_is_within_20_percent_of_the_compiled_step(name, mesh, model):
  c = _config(**mesh)
  c.model.update(model)
  c = base.validate(c)
  devices = jax.devices()[:max(1, c.mesh.data * c.mesh.fsdp * c.mesh.tensor * c.mesh.pipeline)]
  estimate = plan.plan(c, devices)
  compiled = plan.compiled_memory(c, devices)
  assert 0.8 <= estimate["total"] / compiled["peak"] <= 1.2, (name, estimate["total"], compiled)
  assert estimate["params"] == estimate["grads"]
  assert estimate["optimizer"] == pytest.approx(2 * estimate["params"], abs=1024)  # Adam moments + step counters


def test_sharding_divides_the_exact_state_bytes_and_the_fit_check_reports():
  one = plan.plan(base.validate(_config()), jax.devices()[:1], device_memory_gb=1.0)
  fsdp = plan.plan(base.validate(_config(fsdp=8)), jax.devices()[:8], device_memory_gb=1e-3)
  assert fsdp["params"] == pytest.approx(one["params"] / 8, rel=0.06)  # about 1/8: a few small leaves stay whole
  assert one["fits"] and not fsdp["fits"]  # 1 GB holds the tiny step; 1 MB does not
  tensor = plan.plan(base.validate(_config(tensor=2)), jax.devices()[:2])
  assert tensor["activation_parts"]["logits"] == pytest.approx(one["activation_parts"]["logits"] / 2)


TPU_REASON = "libtpu is not installed (pip install -e '.[tpu]'), so nothing can be compiled for a TPU here"


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason=TPU_REASON)
@pytest.mark.parametrize("topology,family,attention", [("v5e:2x2", "gpt", "xla"), ("v5p:2x2x1", "llama", "pallas")])
def test_the_train_step_compiles_for_a_tpu_slice_without_a_tpu(topology, family, attention):
  c = _config(data=-1)
  c.model.update(family=family, attention_impl=attention)
  c = base.validate(c)
  devices = plan.topology_devices(topology)
  assert len(devices) == 4 and devices[0].platform == "tpu"
  tpu = plan.tpu_compile(c, devices)
  assert tpu["device_kind"] in plan.TPU_CHIPS and tpu["fits"] and 0 < tpu["peak"] < tpu["hbm"]
  assert tpu["xla_step_s"] > 0 and tpu["analytic_step_s"] > 0 and tpu["xla_flops_per_chip"] > 0
  # attention_impl=pallas lowered for TPU from this CPU host runs JAX's Mosaic flash attention, forward and backward
  assert (tpu["mosaic_kernels"] > 0) == (attention == "pallas"), tpu["mosaic_kernels"]
  estimate = plan.plan(c, devices)  # the analytic planner over the same slice
  assert 0.3 <= estimate["total"] / tpu["peak"] <= 3, (estimate["total"], tpu)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason=TPU_REASON)
def test_an_unknown_topology_is_named():
  with pytest.raises(ValueError, match="--topology='v9z:1x1'"):
    plan.topology_devices("v9z:1x1")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason=TPU_REASON)
@pytest.mark.parametrize("attention_impl", ["xla", "pallas"])
def test_the_serving_engine_steps_compile_for_a_tpu_chip(attention_impl):
  c = _config()
  c.model.attention_impl = attention_impl
  spec = plan.ModelSpec.from_config(base.validate(c).model)
  device = plan.topology_devices("v5e:2x2")[0]
  if attention_impl == "pallas":  # the decode step reads the page pool through the Mosaic paged kernel
    assert "decode_attention_tpu" in plan.lower_serve_steps(spec, device, slots=4)["decode"].as_text()
  steps = plan.tpu_serve_steps(spec, device, slots=4)
  pool = 2 * spec.num_layers * (4 * (spec.max_len // 16) + 1) * 16 * spec.num_kv_heads * spec.head_dim * 4
  for name in ("decode", "mixed"):
    m = steps[name]
    assert m["argument"] >= pool and m["alias"] >= pool, (name, m, pool)  # the page pool is donated: updated in place
    assert m["xla_step_s"] > 0 and m["xla_bytes_accessed"] > 0, (name, m)
  assert steps["mixed"]["xla_bytes_accessed"] > steps["decode"]["xla_bytes_accessed"]  # it also writes prompt rows


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason=TPU_REASON)
def test_a_quantized_models_decode_compiles_for_tpu_through_the_mosaic_int8_kernels():
  """`model.matmul_impl=pallas` survives lowering for a TPU (auto/native, this host's CPU kernels, lower as xla)."""
  c = _config()
  c.model.update(quant="int8_weight", matmul_impl="pallas")
  spec = plan.ModelSpec.from_config(base.validate(c).model)
  device = plan.topology_devices("v5e:2x2")[0]
  lowered = plan.lower_decode(spec, device, batch=2, prompt_len=8, new_tokens=4, offload="none")
  assert "w8a16_matmul_tpu" in lowered.as_text()
  assert lowered.compile().memory_analysis().temp_size_in_bytes > 0


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason=TPU_REASON)
@pytest.mark.parametrize("preset,topology,mesh", [
    ("gpt2_124m", "v5e:2x4", ["--config.mesh.data=-1"]),  # README's TPU VM quickstart: one host
    ("llama_1b", "v5p:2x2x4", ["--config.mesh.fsdp=-1", "--config.mesh.data=1"]),  # and several hosts
])
def test_the_tpu_quickstart_commands_compile_and_fit_their_slices(preset, topology, mesh, tmp_path):
  # the README's planner command itself, in its own process (a 1B-parameter TPU compile is gigabytes of host memory)
  out = tmp_path / "plan.json"
  # ALLOW_MULTIPLE_LIBTPU_LOAD: this test process holds libtpu's lockfile once it has described a topology
  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
  subprocess.run([sys.executable, "-m", "scripts.plan", f"--config=configs/{preset}.py", f"--topology={topology}",
                  *mesh, "--compile", f"--out={out}"], check=True, cwd=ROOT, env=env, capture_output=True, timeout=900)
  tpu = json.loads(out.read_text())["tpu"]
  assert tpu["fits"] and tpu["peak"] < tpu["hbm"], tpu
