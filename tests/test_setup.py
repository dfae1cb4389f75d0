"""`train.setup.build` is the one training set-up: the benchmark compiles the trainer's own step (MoE loss
coefficients and optimizer offload included), not a copy of it."""

import jax
import numpy as np
import pytest

from conftest import tiny_config
from scripts import bench_train
from train import setup as setup_lib
from train import trainer


def _trainer_setup(config, workdir, monkeypatch) -> setup_lib.TrainSetup:
  """The set-up `trainer.run` builds for `config` (captured while it trains its steps)."""
  built = []
  real = setup_lib.build
  monkeypatch.setattr(setup_lib, "build", lambda *a, **kw: built.append(real(*a, **kw)) or built[-1])
  trainer.run(config, workdir)
  assert len(built) == 1
  return built[0]


def _moe(c):
  c.model.update(num_experts=4, experts_per_token=2, moe_every=2, expert_mlp_dim=64)
  c.train.update(moe_aux_loss=0.5, router_z_loss=0.25)  # large, so leaving them out would show in the loss
  return c


def _offload(c):
  c.train.offload_optimizer = True
  return c


@pytest.mark.parametrize("variant", [_moe, _offload], ids=["moe", "offload"])
def test_the_benchmark_runs_the_trainers_step(variant, data_dir, tmp_path, monkeypatch):
  config = variant(tiny_config(data_dir, steps=1, warmup_steps=0, eval_every=0, eval_batches=1, checkpoint_every=1,
                               async_checkpoint=False))
  ours = _trainer_setup(config, str(tmp_path / "run"), monkeypatch)
  monkeypatch.undo()
  bench = bench_train.setup_for(config)
  # The same program: lowered from the same abstract state and batch, the texts are identical.
  assert bench.train_step.lower(bench.abstract_state, bench.batch_spec).as_text() == \
      ours.train_step.lower(ours.abstract_state, ours.batch_spec).as_text()
  # And it runs: one step of the benchmark's set-up (the same program, so the trainer's gives the same).
  batch = jax.device_put(bench_train.random_batch(config, 0), bench.batch_sharding)
  with jax.set_mesh(bench.mesh):
    _, got = bench.train_step(bench.init_state(), batch)
  assert np.isfinite(float(got["loss"]))
  if variant is _moe:  # the auxiliary terms enter the objective with the configured coefficients
    expected = got["loss"] + 0.5 * got["moe_load_balance"] + 0.25 * got["moe_router_z"]
    np.testing.assert_allclose(got["objective"], expected, rtol=1e-5)
    assert float(got["objective"]) > float(got["loss"]) + 0.1
  else:  # the optimizer state lives in pinned host memory between steps
    kinds = {s.memory_kind for s in jax.tree.leaves(bench.state_shardings["opt_state"])}
    assert kinds == {"pinned_host"}


def test_a_mesh_that_does_not_divide_the_model_is_refused_by_name(data_dir):
  config = tiny_config(data_dir)
  config.mesh.tensor = 3  # does not divide 4 heads
  with pytest.raises(ValueError, match="does not divide"):
    setup_lib.build(config)
