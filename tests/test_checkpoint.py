"""Checkpoints: exact round trip of state and data position, interrupted saves are ignored, corruption is reported."""

import os
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from workdir.checkpoint import Checkpointer
from workdir.layout import checkpoint_dir


def make_state(seed):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"step": jnp.int32(seed), "params": {"w": jax.random.normal(k1, (4, 3)), "b": jax.random.normal(k2, (3,))},
          "opt_state": (jnp.zeros(3), {"mu": jnp.ones((4, 3))})}


def make_iterator():
  return grain.MapDataset.range(1000).shuffle(seed=3).to_iter_dataset().__iter__()


def abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def test_state_and_iterator_round_trip_exactly(tmp_path):
  ckpt = Checkpointer(str(tmp_path), max_to_keep=2, async_save=True)
  it = make_iterator()
  [next(it) for _ in range(7)]
  state = make_state(1)
  assert ckpt.save(7, state, it)
  expected_next = [next(it) for _ in range(5)]  # advancing after an async save must not change what was saved
  ckpt.close()

  fresh = make_iterator()
  restored = Checkpointer(str(tmp_path)).restore(7, abstract(state), fresh)
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert [next(fresh) for _ in range(5)] == expected_next


def test_max_to_keep_and_duplicate_steps(tmp_path):
  ckpt = Checkpointer(str(tmp_path), max_to_keep=2, async_save=False)
  it = make_iterator()
  for step in (1, 2, 3):
    assert ckpt.save(step, make_state(step), it)
  assert not ckpt.save(3, make_state(3), it)  # an existing step is never overwritten
  ckpt.close()
  assert sorted(os.listdir(checkpoint_dir(str(tmp_path)))) == ["2", "3"]


def test_an_interrupted_save_never_replaces_the_latest_good_checkpoint(tmp_path):
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  state = make_state(2)
  ckpt.save(10, state, make_iterator())
  ckpt.close()
  root = checkpoint_dir(str(tmp_path))
  # What a save killed half-way leaves behind: an uncommitted temporary directory for a later step.
  partial = os.path.join(root, "20.orbax-checkpoint-tmp-1234567")
  shutil.copytree(os.path.join(root, "10"), partial)
  marker = os.path.join(partial, "commit_success.txt")
  if os.path.exists(marker):
    os.remove(marker)
  reopened = Checkpointer(str(tmp_path))
  assert reopened.latest_step() == 10
  restored = reopened.restore(10, abstract(state), make_iterator())
  jax.tree.map(np.testing.assert_array_equal, restored, state)


def test_a_corrupt_checkpoint_gives_a_clear_error(tmp_path):
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  state = make_state(3)
  ckpt.save(5, state, make_iterator())
  ckpt.close()
  state_dir = os.path.join(checkpoint_dir(str(tmp_path)), "5", "state")
  for dirpath, _, files in os.walk(state_dir):
    for name in files:
      with open(os.path.join(dirpath, name), "wb") as f:
        f.write(b"garbage")
  with pytest.raises(RuntimeError, match="checkpoint step 5 .* could not be restored"):
    Checkpointer(str(tmp_path)).restore(5, abstract(state), make_iterator())


def _damage(step_dir: str, how: str) -> None:
  """Damages a saved step as a crash or a full disk would: truncate every file, delete the array files, or leave
  the directory empty."""
  if how == "empty":
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)
    return
  for dirpath, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      p = os.path.join(dirpath, name)
      if how == "truncated":
        with open(p, "r+b") as f:
          f.truncate(max(0, os.path.getsize(p) // 3))
      elif how == "deleted" and not name.endswith(".json"):
        os.remove(p)


@pytest.mark.parametrize("how", ["truncated", "deleted", "empty"])
def test_a_damaged_latest_step_falls_back_to_the_newest_whole_one(tmp_path, how, caplog):
  from workdir import checkpoint as checkpoint_lib

  ckpt = Checkpointer(str(tmp_path), max_to_keep=3, async_save=False)
  it = make_iterator()
  good, bad = make_state(5), make_state(10)
  ckpt.save(5, good, it)
  ckpt.save(10, bad, it)
  ckpt.close()
  root = checkpoint_dir(str(tmp_path))
  _damage(os.path.join(root, "10"), how)
  os.makedirs(os.path.join(root, "15.orbax-checkpoint-tmp-99"))  # an interrupted save
  # inference: the newest whole step, or a clear error naming the damaged step and --step
  params, step = checkpoint_lib.restore_state(str(tmp_path), abstract(good))
  assert step == 5
  jax.tree.map(np.testing.assert_array_equal, params, good)
  with pytest.raises(ValueError, match="step 10: .* could not be restored; choose another step with --step"):
    checkpoint_lib.restore_state(str(tmp_path), abstract(good), step=10)
  # training: set aside (kept), resumed from step 5, unfinished temporaries removed, step 10 can be saved again
  reopened = Checkpointer(str(tmp_path), max_to_keep=3, async_save=False)
  assert not any(checkpoint_lib.TEMPORARY_MARK in n for n in os.listdir(root))
  with caplog.at_level("WARNING"):
    state, step = reopened.restore_latest(abstract(good), make_iterator())
  assert step == 5 and "checkpoint step 10 is damaged" in caplog.text and "set aside as" in caplog.text
  jax.tree.map(np.testing.assert_array_equal, state, good)
  assert "10.damaged-0" in os.listdir(root) and reopened.latest_step() == 5
  assert reopened.save(10, bad, make_iterator())
  reopened.close()
  assert Checkpointer(str(tmp_path)).restore_latest(abstract(bad), make_iterator())[1] == 10


def test_every_step_damaged_is_a_clear_error(tmp_path):
  from workdir import checkpoint as checkpoint_lib

  ckpt = Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(3, make_state(3), make_iterator())
  ckpt.close()
  _damage(os.path.join(checkpoint_dir(str(tmp_path)), "3"), "truncated")
  for _ in range(2):  # nothing is moved: the same command fails the same way until the user decides
    with pytest.raises(checkpoint_lib.DamagedCheckpoint, match="no checkpoint .* could be restored"):
      Checkpointer(str(tmp_path)).restore_latest(abstract(make_state(3)), make_iterator())
  assert os.listdir(checkpoint_dir(str(tmp_path))) == ["3"]
