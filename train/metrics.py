"""Training metrics: peak-FLOP/s lookup or measurement, MFU, and the writers for metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
from tensorboardX import SummaryWriter  # TensorFlow-free event writer

# Dense bf16 peak FLOP/s per chip (vendor figures, no sparsity), matched against `device_kind` by substring.
PEAK_BF16_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12), ("A10G", 125e12), ("T4", 65e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v4", 275e12),
)


def measure_matmul_flops(dtype: str = "float32", size: int = 1024, repeats: int = 10) -> float:
  """Peak dense matmul rate (FLOP/s) of the default device in `dtype` with float32 accumulation: the best of
  `repeats` timed runs (a peak is the best the device sustains, so the fastest run is the estimate)."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32).astype(dtype)
  matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  matmul(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * size**3 / min(times)


def peak_flops_per_device(dtype: str, override: float = 0.0) -> tuple[float, str]:
  """(peak FLOP/s of one device, how it was obtained): the override, the vendor table, or a measured matmul."""
  if override > 0:
    return override, "config.train.peak_flops"
  device = jax.devices()[0]
  if device.platform != "cpu":
    for name, flops in PEAK_BF16_FLOPS:
      if name.lower() in device.device_kind.lower():
        return flops, f"table ({device.device_kind}, bf16 dense)"
  return measure_matmul_flops(dtype), f"measured {dtype} matmul on {device.device_kind}"


def mfu(flops_per_token: float, tokens_per_sec: float, peak_flops_total: float) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices used."""
  return flops_per_token * tokens_per_sec / peak_flops_total if peak_flops_total else 0.0


class MetricsWriter:
  """Appends rows to `workdir/metrics.jsonl` and mirrors scalars to TensorBoard; only process 0 writes.

  `keep_through_step`: the step the run resumes from. Rows logged after it by an earlier, interrupted process (the
  steps about to be replayed) and a partial last line (a process killed mid-write) are dropped first, so the file
  holds each step once."""

  def __init__(self, workdir: str, enabled: bool = True, keep_through_step: int | None = None):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      if keep_through_step is not None and os.path.exists(path):
        _truncate_rows(path, keep_through_step)
      self._jsonl = open(path, "a", encoding="utf-8")
      self._tb = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))

  def write(self, step: int, row: dict[str, float]) -> None:
    """One row: {"step": step, **row}, every value a float."""
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in row.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()
    for k, v in clean.items():
      self._tb.add_scalar(k, v, int(step))

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _truncate_rows(path: str, last_step: int) -> None:
  """Rewrites `path` (atomically) with its complete rows of step <= last_step."""
  kept = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue  # a line cut short by a kill
      if line.endswith("\n") and row.get("step", 0) <= last_step:
        kept.append(line)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(kept)
  os.replace(tmp, path)
