"""Multi-process training for real: two processes on this machine (jax.distributed with a loopback coordinator, CPU
collectives through gloo) train one mesh spanning both (data = 2 per process over ICI x 2 processes over DCN), each
feeding its own share of the data."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import tiny_config
from model import transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one_and_their_checkpoint_restores_in_one(tiny_run, data_dir, tmp_path):
  from infer import loading
  from model.transformer import ModelSpec
  from train import data as data_lib
  from train import optim
  from train import step as step_lib
  from train import bpe

  tokenizer_path = os.path.join(tiny_run[0], "tokenizer.json")
  workdir = str(tmp_path / "two")
  train = dict(steps=4, warmup_steps=1, log_every=1, eval_every=0, checkpoint_every=4, eval_batches=1,
               async_checkpoint=False)
  port = _free_port()
  common = [sys.executable, "-m", "train", "--config=configs/tiny.py", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", "--config.data.max_docs=300",
            f"--config.data.tokenizer_path={tokenizer_path}", "--config.mesh.data=-1", "--config.mesh.dcn.data=2",
            "--config.sample.max_new_tokens=0", "--config.distributed.initialize=True",
            f"--config.distributed.coordinator_address=127.0.0.1:{port}", "--config.distributed.num_processes=2"]
  common += [f"--config.train.{k}={v}" for k, v in train.items()]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen(common + [f"--config.distributed.process_id={i}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
  assert len(losses) == 4

  # The same global batches in one process: shard 0's rows, then shard 1's, through a one-device step.
  config = tiny_config(data_dir, **train)
  config.data.tokenizer_path = tokenizer_path
  tokenizer = bpe.load_or_train(config, workdir)
  source = data_lib.load_sources(config)["train"]
  shards = [data_lib.make_iterator(config, source, tokenizer, split="train", shard_index=i, shard_count=2)
            for i in range(2)]
  spec = ModelSpec.from_config(config.model)
  params = jax.eval_shape(lambda: transformer.init_params(spec, 0))
  optimizer = optim.make_optimizer(config.train, params)
  state = step_lib.init_state(spec, optimizer, 0)
  fn = step_lib.jit_train_step(transformer.graphdef(spec), optimizer, optim.make_schedule(config.train), 1, 0.0)
  expected = []
  for _ in range(4):
    parts = [next(it) for it in shards]
    state, m = fn(state, {k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    expected.append(float(m["loss"]))
  np.testing.assert_allclose(losses, expected, rtol=5e-5)

  # The checkpoint both processes wrote restores in this single process with the same parameters.
  _, model, _, step = loading.load_trained(workdir)
  assert step == 4
  from flax import nnx
  restored = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5)


def test_distributed_config_errors_name_the_key():
  from configs import base, tiny

  c = tiny.get_config()
  c.distributed.update(num_processes=2, process_id=2)
  with pytest.raises(ValueError, match="distributed.process_id=2"):
    base.validate(c)
