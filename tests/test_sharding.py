"""Mesh and logical-axis sharding on 8 simulated CPU devices: the sharded train step equals the single-device one,
parameters and optimizer moments really are split (FSDP over 'embed', tensor over heads/MLP), and bad meshes fail
early with clear messages."""

import json
import os
import signal

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import base, tiny
from model import sharding
from model.transformer import ModelSpec, Transformer
from conftest import tiny_config
from train import optim, trainer
from train import step as step_lib
from model import transformer


def sizes(**kw):
  return {**{a: 1 for a in sharding.MESH_AXES}, **kw}


def test_mesh_shapes_resolve_and_bad_sizes_are_named():
  assert sharding.mesh_shape(sizes(data=-1, tensor=2), 8) == (4, 1, 2, 1, 1)
  assert sharding.mesh_shape(sizes(fsdp=2), 8) == (1, 2, 1, 1, 1)  # without -1: the first 2 devices
  with pytest.raises(ValueError, match="does not fit the 8 available devices"):
    sharding.mesh_shape(sizes(data=-1, tensor=3), 8)
  with pytest.raises(ValueError, match="does not fit"):
    sharding.mesh_shape(sizes(data=4, fsdp=4), 8)
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.mesh_shape(sizes(data=-1, fsdp=-1), 8)
  c = tiny.get_config()
  c.mesh.fsdp = -1  # data is already -1
  with pytest.raises(ValueError, match="config.mesh=.*at most one -1"):
    base.validate(c)


def setup(mesh_sizes, num_layers=2):
  c = tiny.get_config()
  c.mesh.pipeline = mesh_sizes.get("pipeline", 1)
  c.model.update(family="llama", num_layers=num_layers, embed_dim=32, num_heads=4, num_kv_heads=2, vocab_size=64,
                 max_len=16)
  c.data.seq_len = 16
  c.train.update(batch_size=8, steps=10, warmup_steps=1, learning_rate=1e-2)
  spec = ModelSpec.from_config(base.validate(c).model)
  params = jax.eval_shape(lambda: transformer.init_params(spec, 0))
  optimizer = optim.make_optimizer(c.train, params)
  abstract_state = jax.eval_shape(lambda: step_lib.init_state(spec, optimizer, 0))
  mesh = sharding.make_mesh(mesh_sizes)
  specs = sharding.param_specs(nnx.eval_shape(lambda: Transformer(spec, rngs=nnx.Rngs(params=0))))
  sharding.check_divisible(params, specs, mesh)
  state_sh = sharding.state_shardings(mesh, abstract_state, specs, optimizer)
  init = jax.jit(lambda: step_lib.init_state(spec, optimizer, 0), out_shardings=state_sh)
  with jax.set_mesh(mesh):
    fn = step_lib.jit_train_step(transformer.graphdef(spec), optimizer, optim.make_schedule(c.train), 1, 0.0,
                                 state_sh, sharding.batch_sharding(mesh))
  return init(), fn, mesh


def batches(n):
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    tokens = rng.integers(0, 64, (8, 17)).astype(np.int32)
    out.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((8, 16), np.int32),
                "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1)), "weights": np.ones((8, 16), np.float32)})
  return out


def run(mesh_sizes, data, num_layers=2, grad_norms=None):
  state, fn, mesh = setup(mesh_sizes, num_layers)
  losses = []
  with jax.set_mesh(mesh):
    for b in data:
      state, m = fn(state, b)
      losses.append(float(m["loss"]))
      if grad_norms is not None:
        grad_norms.append(float(m["grad_norm"]))
  return state, losses


@pytest.fixture(scope="module")
def two_layer_baseline():
  """(losses, gradient norms) of 5 single-device steps of the 2-layer model on `batches(5)`."""
  norms = []
  _, losses = run(sizes(), batches(5), grad_norms=norms)
  return losses, norms


def _device_bytes(tree) -> tuple[int, int]:
  """(bytes held by device 0, total bytes) over the arrays of `tree`."""
  arrays = jax.tree.leaves(tree)
  held = sum(s.data.nbytes for a in arrays for s in a.addressable_shards if s.device == jax.devices()[0])
  return held, sum(a.nbytes for a in arrays)


@pytest.mark.parametrize("mesh_sizes", [sizes(data=8), sizes(fsdp=8), sizes(tensor=2), sizes(fsdp=4, tensor=2)],
                         ids=lambda s: str({k: v for k, v in s.items() if v > 1}))
def test_each_parallelism_matches_one_device(mesh_sizes, two_layer_baseline):
  single_losses, single_norms = two_layer_baseline
  norms = []
  state, losses = run(mesh_sizes, batches(5), grad_norms=norms)
  np.testing.assert_allclose(losses, single_losses, rtol=1e-5)
  np.testing.assert_allclose(norms, single_norms, rtol=1e-4)
  if mesh_sizes["fsdp"] == 8:  # ZeRO-3: each device holds about 1/8 of the parameters and of the Adam moments
    for tree in (state["params"], state["opt_state"]):
      held, total = _device_bytes(tree)
      assert held <= total / 8 * 1.1, (held, total)
  if mesh_sizes["fsdp"] == 4 and mesh_sizes["tensor"] == 2:  # FSDP over embed, Megatron over the MLP columns
    w_in = state["params"]["blocks"]["mlp"]["w_in"]  # [layers, embed, mlp]
    assert w_in.sharding.spec == P("pipeline", "fsdp", "tensor")  # layers over the (size-1 here) pipeline axis
    assert w_in.addressable_shards[0].data.shape == (2, 32 // 4, w_in.shape[2] // 2)
    mu = state["opt_state"][1][0].mu["blocks"]["mlp"]["w_in"]  # Adam first moment follows its parameter
    assert mu.sharding.spec == P("pipeline", "fsdp", "tensor")


@pytest.fixture(scope="module")
def four_layer_baseline():
  """(losses, gradient norms) of 5 single-device steps of the 4-layer model on `batches(5)`."""
  norms = []
  _, losses = run(sizes(), batches(5), num_layers=4, grad_norms=norms)
  return losses, norms


@pytest.mark.parametrize("mesh_sizes", [sizes(pipeline=2), sizes(pipeline=4), sizes(data=2, pipeline=2)],
                         ids=lambda s: str({k: v for k, v in s.items() if v > 1}))
def test_pipeline_training_matches_one_device(mesh_sizes, four_layer_baseline):
  data = batches(5)
  single_losses, single_norms = four_layer_baseline
  pipe_norms = []
  piped, piped_losses = run(mesh_sizes, data, num_layers=4, grad_norms=pipe_norms)
  np.testing.assert_allclose(piped_losses, single_losses, rtol=1e-5)
  np.testing.assert_allclose(pipe_norms, single_norms, rtol=1e-4)  # gradients, not just Adam-normalised steps
  w_in = piped["params"]["blocks"]["mlp"]["w_in"]  # [layers, embed, mlp]: each stage holds its own layers
  assert w_in.sharding.spec[0] == "pipeline"
  assert w_in.addressable_shards[0].data.shape[0] == 4 // mesh_sizes["pipeline"]


def test_pipeline_config_errors_are_named():
  c = tiny.get_config()
  c.mesh.update(data=1, pipeline=4)
  c.model.num_layers = 6
  with pytest.raises(ValueError, match="mesh.pipeline=4.*must divide model.num_layers=6"):
    base.validate(c)
  c.model.num_layers = 4
  c.model.pipeline_microbatches = 3
  with pytest.raises(ValueError, match="model.pipeline_microbatches=3.*must divide the 8 sequences"):
    base.validate(c)


def test_bubble_fraction():
  from model import pipeline

  assert pipeline.bubble_fraction(4, 8) == pytest.approx(3 / 11)
  assert pipeline.bubble_fraction(1, 8) == 0.0


def test_an_axis_that_does_not_divide_a_dimension_is_named():
  with pytest.raises(ValueError, match="dimension .* mesh axes \\('tensor',\\) of total size 8"):
    setup(sizes(tensor=8))


def test_a_checkpoint_written_on_one_mesh_resumes_on_another(data_dir, tmp_path):
  steps = dict(steps=8, log_every=1, eval_every=0, checkpoint_every=4, warmup_steps=2)
  straight = tiny_config(data_dir, **steps)
  trainer.run(straight, str(tmp_path / "one_device"))
  expected = [r["loss"] for r in map(json.loads, open(tmp_path / "one_device" / "metrics.jsonl")) if "loss" in r]

  workdir = str(tmp_path / "resharded")
  first = tiny_config(data_dir, **steps)
  first.mesh.update(data=1, fsdp=8)  # ZeRO-3 over 8 devices
  trainer.run(first, workdir, on_step=lambda s: s == 4 and os.kill(os.getpid(), signal.SIGTERM))
  second = tiny_config(data_dir, **steps)
  second.mesh.update(data=4, tensor=2)  # a different layout: data x tensor
  summary = trainer.run(second, workdir)
  assert summary["step"] == 8 and not summary["interrupted"]
  got = [r["loss"] for r in map(json.loads, open(f"{workdir}/metrics.jsonl")) if "loss" in r]
  np.testing.assert_allclose(got, expected, rtol=1e-4)  # same data, same updates, up to reduction order


def test_optimizer_offload_to_host_memory_trains_identically_and_resumes(data_dir, tmp_path):
  """ZeRO-Offload with JAX memory kinds: the optimizer state lives in pinned host memory between steps."""
  def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      return [r["loss"] for r in map(json.loads, f) if "loss" in r]

  plain, offload = str(tmp_path / "plain"), str(tmp_path / "offload")
  common = dict(steps=6, warmup_steps=1, log_every=1, eval_every=0, checkpoint_every=6, eval_batches=1)
  trainer.run(tiny_config(data_dir, **common), plain)
  c = tiny_config(data_dir, offload_optimizer=True, **common)
  c.sample.max_new_tokens = 0
  trainer.run(c, offload)
  np.testing.assert_allclose(losses(offload), losses(plain), rtol=1e-6)
  c.train.steps = 8  # resume: the checkpointed moments are restored into host memory
  summary = trainer.run(c, offload)
  assert summary["step"] == 8 and len(losses(offload)) == 8

  spec = ModelSpec.from_config(c.model)
  params = jax.eval_shape(lambda: transformer.init_params(spec, 0))
  optimizer = optim.make_optimizer(c.train, params)
  abstract_state = jax.eval_shape(lambda: step_lib.init_state(spec, optimizer, 0))
  mesh = sharding.make_mesh(sizes(data=1))
  specs = sharding.param_specs(nnx.eval_shape(lambda: Transformer(spec, rngs=nnx.Rngs(params=0))))
  sh = sharding.state_shardings(mesh, abstract_state, specs, optimizer, offload_optimizer=True)
  kinds = {s.memory_kind for s in jax.tree.leaves(sh["opt_state"])}
  assert kinds == {"pinned_host"} and {s.memory_kind for s in jax.tree.leaves(sh["params"])} != {"pinned_host"}


def test_bench_train_compares_meshes(tmp_path):
  """scripts/bench_train.py --meshes: the same steps under each mesh (same batches, so the same losses)."""
  import subprocess
  import sys

  out = tmp_path / "bench.json"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "scripts.bench_train", "--config=configs/tiny.py", "--steps=2", "--warmup=0",
         "--meshes=data=8,fsdp=4/tensor=2", f"--out={out}"]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  rows = json.loads(out.read_text())["rows"]
  assert [r["mesh"] for r in rows] == ["data=8", "fsdp=4/tensor=2"]
  assert rows[0]["tokens_per_sec"] > 0 and "fsdp=4/tensor=2" in done.stdout
  assert rows[0]["final_loss"] == pytest.approx(rows[1]["final_loss"], rel=1e-4)
