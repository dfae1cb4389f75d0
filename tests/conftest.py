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


def random_model(family: str = "gpt", vocab: int = 97, max_len: int = 32, seed: int = 0, layers: int = 2):
  """A random width-32 model. Parameters come from numpy (eager jax.random init compiles ~30 small programs,
  seconds on a busy CPU); weights ~ N(0, 0.3) give peaked logits, so greedy argmax is not decided by float noise."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from configs import base, tiny
  from model import transformer

  c = tiny.get_config()
  c.model.update(family=family, num_layers=layers, embed_dim=32, num_heads=4, max_len=max_len, vocab_size=vocab)
  c.data.seq_len = max_len
  if family == "llama":
    c.model.num_kv_heads = 2
  base.validate(c)
  spec = transformer.ModelSpec.from_config(c.model)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: transformer.Transformer(spec, rngs=nnx.Rngs(params=0))))
  rng = np.random.default_rng(seed)

  def init(path, x):
    noise = rng.normal(0.0, 0.3, x.shape)
    return jnp.asarray(1.0 + noise / 3 if "scale" in jax.tree_util.keystr(path) else noise, x.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(init, state))


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
def case_study_run(tmp_path_factory):
  """(workdir, summary) of a small model (width 128, 2 layers, 1,500 stdlib files) trained long enough that
  compression hurts it in the papers' direction, for the case-study tests (about a minute). Measured: at 500 steps
  (or on tiny_run) magnitude pruning, SparseGPT, RTN and GPTQ all stay within 1% of dense in no stable order; at 800
  steps SparseGPT 50% costs 1.008x against magnitude's 1.019x and GPTQ 3-bit 1.008x against RTN's 1.018x."""
  from train import trainer

  steps = 800
  c = tiny_config(str(tmp_path_factory.mktemp("tfds_case_study")), steps=steps, batch_size=16, eval_every=0,
                  checkpoint_every=steps, log_every=100)
  c.data.max_docs = 1500
  c.model.embed_dim = 128
  workdir = str(tmp_path_factory.mktemp("case_study"))
  return workdir, trainer.run(c, workdir)


@pytest.fixture(scope="session")
def tiny_moe_run(data_dir, tmp_path_factory):
  """(workdir, summary) of a finished tiny MoE training run (8 experts, top-2, MoE every other block). 200 steps:
  at 40, ternary RTN and ternary GPTQ tied on the validation loss (GPTQ +0.0002, RTN -0.0000); at 200, +0.0016
  against +0.0042."""
  from train import trainer

  c = tiny_config(data_dir, steps=200, eval_every=0, checkpoint_every=200)
  c.model.update(num_experts=8, experts_per_token=2, moe_every=2, expert_mlp_dim=64)
  workdir = str(tmp_path_factory.mktemp("tiny_moe"))
  return workdir, trainer.run(c, workdir)


def _memory_mappings() -> int:
  """This process's memory mappings (lines of /proc/self/maps); a large number where /proc is absent."""
  try:
    with open("/proc/self/maps", "rb") as f:
      return sum(1 for _ in f)
  except OSError:
    return 1 << 30


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
  """Drop jax's compiled programs after a test module once the process holds over 25,000 memory mappings. Every
  XLA:CPU executable keeps its machine code in mappings of its own until jax's caches let go of it, even after its
  function is gone; over the whole suite they passed the kernel's limit of 65,530 per process (vm.max_map_count) and
  a later compile crashed in LLVM (CI's segfaults and aborts in test_serving, 20+ minutes in; 19,856 mappings a
  third of the way). One module adds at most ~15,000, so this keeps the suite under ~40,000 while sparing the
  recompiles that clearing after every module costs."""
  yield
  if _memory_mappings() > 25_000:
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
