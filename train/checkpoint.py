"""Orbax checkpoints of the train state and the grain iterator, plus the loaders inference uses.

Layout: `workdir/checkpoints/<step>/{state,data}`. Orbax writes each step into a temporary directory and renames it
when complete, so an interrupted save never replaces the latest good checkpoint; unfinished temporaries are ignored.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from configs import base


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
  """Saves and restores `{state, data}` at integer steps (async saves when `async_save`)."""

  def __init__(self, workdir: str, max_to_keep: int = 2, async_save: bool = True, with_data: bool = True):
    self.with_data = with_data
    names = ("state", "data") if with_data else ("state",)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=names)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator | None = None) -> bool:
    """Starts saving `state` (and the iterator position) at `step`; returns False if that step already exists."""
    if step in self.manager.all_steps():
      return False
    items = {"state": ocp.args.StandardSave(state)}
    if self.with_data:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state: Any, data_iterator: grain.DatasetIterator | None = None) -> Any:
    """Restores the state onto the shardings of `abstract_state` (ShapeDtypeStructs) and rewinds the iterator."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if self.with_data:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises several types for unreadable or mismatched files
      raise RuntimeError(f"checkpoint step {step} in {self.manager.directory} could not be restored: {e}") from e
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a training run wrote to `workdir/config.json`, over today's defaults, validated."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: --workdir must be a directory written by `python -m train`")
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  config = base.get_config()  # keys added since the run was written keep their defaults
  for section, values in saved.items():
    if isinstance(values, dict) and section in config:
      config[section].update(values)
    else:
      config[section] = values
  return base.validate(config)


def restore_state(workdir: str, abstract_state: Any, step: int | None = None) -> tuple[Any, int]:
  """Restores the train state of the latest (or given) checkpoint without the data iterator: (state, step).

  Leaves of `abstract_state` that carry no sharding are restored onto this process's first device, so checkpoints
  written by any mesh (or by several processes) load for single-device inference."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract_state = jax.tree.map(  # leaves without a sharding land on this process's first device, whatever mesh wrote
      lambda a: a if getattr(a, "sharding", None) is not None else jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                                                          sharding=device),
      abstract_state)
  manager = ocp.CheckpointManager(checkpoint_dir(workdir), item_names=("state",))
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}: train first with `python -m train`")
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  finally:
    manager.close()
  return restored["state"], step


def save_params(workdir: str, step: int, params: Any) -> None:
  """Writes a parameters-only checkpoint ({"step", "params"}) at `step`, as imports and quantized models are stored;
  `restore_params` reads it, and `python -m train` fine-tunes from it (config.train.init_from)."""
  manager = ocp.CheckpointManager(checkpoint_dir(workdir), item_names=("state",))
  try:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(
        {"step": jnp.asarray(step, jnp.int32), "params": params})))
    manager.wait_until_finished()
  finally:
    manager.close()


def restore_params(workdir: str, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
  """Only the parameters of the latest (or given) checkpoint, whether it holds a whole train state or parameters
  only: (params, step). Leaves of `abstract_params` without a sharding land on this process's first device."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract_params = jax.tree.map(
      lambda a: a if getattr(a, "sharding", None) is not None else jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                                                          sharding=device),
      abstract_params)
  item = {"params": abstract_params}
  manager = ocp.CheckpointManager(checkpoint_dir(workdir), item_names=("state",))
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}: train first with `python -m train`")
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
  finally:
    manager.close()
  return restored["state"]["params"], step
