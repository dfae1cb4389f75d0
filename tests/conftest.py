"""Shared test set-up: 8 simulated CPU devices (set before jax is imported) and small shared fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


def tiny_config(data_dir, **train):
  """The tiny preset on a 300-file sample of the stdlib corpus prepared under `data_dir`."""
  from configs import base, tiny

  c = tiny.get_config()
  c.data.update(data_dir=data_dir, max_docs=300, tokenizer_train_bytes=300_000)
  c.mesh.data = 1  # one device: the sharded paths have their own tests
  c.sample.max_new_tokens = 0  # no closing sample (compiling generation costs seconds); tiny_run keeps one
  c.train.update(train)
  return base.validate(c)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def tiny_run(data_dir, tmp_path_factory):
  """(workdir, summary) of one finished tiny training run, shared by the tests that need a trained model."""
  from train import trainer

  workdir = str(tmp_path_factory.mktemp("tiny"))
  config = tiny_config(data_dir)
  from infer import generate

  config.sample.max_new_tokens = 16  # test_train checks the closing sample
  return workdir, trainer.run(config, workdir, closing_sample=generate.closing_sample)


@pytest.fixture(scope="session")
def tiny_moe_run(data_dir, tmp_path_factory):
  """(workdir, summary) of a finished tiny MoE training run (8 experts, top-2, MoE every other block)."""
  from train import trainer

  c = tiny_config(data_dir, steps=40, eval_every=0, checkpoint_every=40)
  c.model.update(num_experts=8, experts_per_token=2, moe_every=2, expert_mlp_dim=64)
  workdir = str(tmp_path_factory.mktemp("tiny_moe"))
  return workdir, trainer.run(c, workdir)
