"""Orbax checkpoints of a workdir: the one module that opens an orbax `CheckpointManager`.

Layout: `DIR/checkpoints/<step>/{state,data}` (see `workdir.layout`). The trainer's `Checkpointer` saves the train
state and the grain iterator position; `save_tree` writes any other pytree (parameters of an import, a quantized or
compressed model) as a state-only step; `restore_state` / `restore_params` read them back for inference or
fine-tuning. Orbax writes each step into a temporary directory and renames it when complete, so an interrupted save
never replaces the latest good checkpoint; the trainer removes unfinished temporaries when it opens the directory.
A step that cannot be restored (a file truncated or deleted, an empty directory) is skipped for the newest whole
one: the trainer sets it aside as `<step>.damaged-<n>` (kept, not deleted) and re-saves that step later; inference
reads the newest whole step, or names the damaged one and the `--step` option when a step was asked for.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from workdir.layout import checkpoint_dir

log = logging.getLogger(__name__)


class DamagedCheckpoint(RuntimeError):
  """A checkpoint step that cannot be restored (the message names the step, the directory and the reason)."""

TEMPORARY_MARK = ".orbax-checkpoint-tmp"  # in the names of orbax's unfinished step directories


class Checkpointer:
  """Saves and restores `{state, data}` at integer steps (async saves when `async_save`)."""

  def __init__(self, workdir: str, max_to_keep: int = 2, async_save: bool = True, with_data: bool = True):
    self.with_data = with_data
    names = ("state", "data") if with_data else ("state",)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.directory = checkpoint_dir(workdir)
    if jax.process_index() == 0:
      remove_unfinished_saves(self.directory)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=names)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore_latest(self, abstract_state: Any, data_iterator: grain.DatasetIterator | None = None
                     ) -> tuple[Any, int | None]:
    """(state, step) of the newest step that restores, or (None, None) when there is no checkpoint. Each newer step
    that fails is logged with the reason and, once an older one has restored, set aside as `<step>.damaged-<n>`
    (kept, and the run saves that step again). DamagedCheckpoint, moving nothing, when no step restores."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    damaged = []
    for step in steps:
      try:
        state = self.restore(step, abstract_state, data_iterator)
      except DamagedCheckpoint as e:
        log.warning("checkpoint step %d is damaged (%s); trying the previous step", step, _first_line(e))
        damaged.append(step)
        continue
      for bad in damaged:
        log.warning("checkpoint step %d set aside as %s; resuming from step %d", bad, self._set_aside(bad), step)
      return state, step
    if steps:
      raise DamagedCheckpoint(f"no checkpoint in {self.directory} could be restored (steps {steps} are damaged; "
                              "the warnings above say why): remove them to start again, or use a new --workdir")
    return None, None

  def _set_aside(self, step: int) -> str:
    source = os.path.join(self.directory, str(step))
    n = 0
    while os.path.exists(f"{source}.damaged-{n}"):
      n += 1
    target = f"{source}.damaged-{n}"
    if jax.process_index() == 0 and os.path.exists(source):
      os.rename(source, target)
    self.manager.reload()
    return target

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
      raise DamagedCheckpoint(f"checkpoint step {step} in {self.manager.directory} could not be restored: {e}") from e
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def remove_unfinished_saves(directory: str) -> list[str]:
  """Deletes the temporary step directories an interrupted save left in `directory`; returns their names."""
  if not os.path.isdir(directory):
    return []
  names = [n for n in os.listdir(directory) if TEMPORARY_MARK in n]
  for name in names:
    shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
  if names:
    log.info("removed unfinished checkpoint saves: %s", ", ".join(sorted(names)))
  return names


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return text[0][:300] if text else type(error).__name__


def _on_first_device(abstract: Any) -> Any:
  """Leaves without a sharding are placed on this process's first device, whatever mesh wrote the checkpoint."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
      lambda a: a if getattr(a, "sharding", None) is not None else jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                                                          sharding=device),
      abstract)


def _restore(workdir: str, step: int | None, args_for_state) -> tuple[Any, int]:
  """Restores the "state" item of the latest whole (or the given) step with `args_for_state`: FileNotFoundError if
  there is no checkpoint, ValueError naming the step and `--step` if the given step (or every step) is damaged."""
  manager = ocp.CheckpointManager(checkpoint_dir(workdir), item_names=("state",))
  try:
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}: train first with `python -m train`")
    if step is not None and step not in steps:
      raise ValueError(f"there is no checkpoint step {step} in {checkpoint_dir(workdir)}; --step may be one of "
                       f"{sorted(steps)}")
    errors = []
    for candidate in ([step] if step is not None else steps):
      try:
        restored = manager.restore(candidate, args=ocp.args.Composite(state=args_for_state))
        return restored["state"], candidate
      except Exception as e:  # orbax raises several types for unreadable or mismatched files
        errors.append(f"step {candidate}: {_first_line(e)}")
        if step is None:
          log.warning("checkpoint step %d of %s is damaged (%s); trying the previous step", candidate, workdir,
                      _first_line(e))
    raise ValueError(f"checkpoint {'; '.join(errors)} could not be restored; choose another step with --step "
                     f"(steps present: {sorted(steps)})")
  finally:
    manager.close()


def restore_state(workdir: str, abstract_state: Any, step: int | None = None) -> tuple[Any, int]:
  """Restores the whole "state" tree of the latest (or given) checkpoint without the data iterator: (state, step).

  `abstract_state` holds ShapeDtypeStructs; leaves that carry no sharding are restored onto this process's first
  device, so checkpoints written by any mesh (or by several processes) load for single-device inference."""
  return _restore(workdir, step, ocp.args.StandardRestore(_on_first_device(abstract_state)))


def save_tree(workdir: str, step: int, tree: dict) -> None:
  """Writes `tree` (a dict of arrays: {"step", "params", ...}) as the state-only checkpoint of `step` and waits
  for it: how imports, quantized and compressed models are stored."""
  manager = ocp.CheckpointManager(checkpoint_dir(workdir), item_names=("state",))
  try:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree)))
    manager.wait_until_finished()
  finally:
    manager.close()


def save_params(workdir: str, step: int, params: Any) -> None:
  """Writes a parameters-only checkpoint ({"step", "params"}) at `step`, as imports and quantized models are stored;
  `restore_params` reads it, and `python -m train` fine-tunes from it (config.train.init_from)."""
  save_tree(workdir, step, {"step": jnp.asarray(step, jnp.int32), "params": params})


def restore_params(workdir: str, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
  """Only the parameters of the latest (or given) checkpoint, whether it holds a whole train state or parameters
  only: (params, step). Leaves of `abstract_params` without a sharding land on this process's first device."""
  items, step = restore_items(workdir, {"params": abstract_params}, step)
  return items["params"], step


def restore_items(workdir: str, abstract_items: dict[str, Any], step: int | None = None) -> tuple[dict, int]:
  """Some top-level entries of the latest (or given) checkpoint's state, e.g. {"params", "frozen"} of a LoRA run:
  (dict of them, step). Leaves without a sharding land on this process's first device."""
  item = {k: _on_first_device(v) for k, v in abstract_items.items()}
  state, step = _restore(workdir, step, ocp.args.PyTreeRestore(
      item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
  return {k: state[k] for k in abstract_items}, step
