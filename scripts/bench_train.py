"""Training-step benchmark: warmed-up median tokens/s and step time of a config in each compute dtype, beside the
HF-PyTorch peer (`GPT2LMHeadModel`, AdamW, eager, float32 and bf16 autocast, 2 threads) and this device's dense
matmul rates (float32, and bfloat16 operands with float32 accumulation), all measured in the same run, with our
process's CPU utilization, system-time share and page faults over the timed steps.

  python -m scripts.bench_train [--config=configs/shape_s.py] [--dtypes=float32,float32/bfloat16,bfloat16]
      [--steps=20] [--nopeer]
      [--out=bench_train.json]
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m scripts.bench_train --config=configs/tiny.py \
      --meshes=data=8,fsdp=8,tensor=8,data=2/fsdp=2/tensor=2       # the same step under several meshes

Batches are random tokens of the config's shape (one document per row), so the data pipeline is not measured; the
step is the trainer's own jitted, donated train step.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from model import flops, sharding
from model.transformer import ModelSpec
from scripts import torch_peer
from train import metrics
from train import profiling
from train import setup as setup_lib
from train import allocator

def parse_mesh(text: str) -> dict[str, int]:
  """'data=2/tensor=4' -> sizes for every mesh axis (unnamed axes 1); ValueError names a bad part."""
  sizes = {a: 1 for a in sharding.MESH_AXES}
  for part in text.split("/"):
    name, _, value = part.partition("=")
    if name not in sizes or not value.isdigit() or int(value) < 1:
      raise ValueError(f"mesh part {part!r} in {text!r}: use AXIS=SIZE with AXIS one of {', '.join(sharding.MESH_AXES)}")
    sizes[name] = int(value)
  return sizes


def random_batch(config, seed: int) -> dict[str, np.ndarray]:
  b, l = config.train.batch_size, config.data.seq_len
  tokens = np.random.default_rng(seed).integers(0, config.model.vocab_size, (b, l + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((b, l), np.int32),
          "positions": np.broadcast_to(np.arange(l, dtype=np.int32), (b, l)).copy(),
          "weights": np.ones((b, l), np.float32)}


def setup_for(config, mesh_sizes: dict[str, int] | None = None, donate: bool = True) -> setup_lib.TrainSetup:
  """The trainer's own set-up of `config` (`train.setup.build`), on the config's mesh or on `mesh_sizes`."""
  if mesh_sizes is not None:
    config = config.copy_and_resolve_references()
    config.mesh.update(mesh_sizes)
  return setup_lib.build(config, donate=donate)


def benchmark(config, steps: int, warmup: int, mesh_sizes: dict[str, int] | None = None, donate: bool = True,
              profile_dir: str = "") -> dict:
  """Times `steps` train steps of `config` (each blocked) after compilation and `warmup` steps: the trainer's own
  step (`setup_for`). `donate=False` measures what donating the state saves; `profile_dir` traces the first three
  timed steps there (`train.profiling`) and adds their top operations as row["profile"]."""
  setup = setup_for(config, mesh_sizes, donate)
  state = setup.init_state()
  batches = [jax.device_put(random_batch(config, i), setup.batch_sharding) for i in range(4)]
  with jax.set_mesh(setup.mesh):
    return _time_steps(config, setup.spec, state, setup.train_step, batches, steps, warmup, profile_dir)


def _time_steps(config, spec, state, step_fn, batches, steps, warmup, profile_dir="") -> dict:
  """Compiles (first call), warms up, then times `steps` blocked steps: median step time and derived rates."""
  t = config.train
  start = time.perf_counter()
  state, m = step_fn(state, batches[0])
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - start
  for i in range(warmup):
    state, m = step_fn(state, batches[i % 4])
  jax.block_until_ready(m)
  times, losses = [], []
  profiler = profiling.StepProfiler((1, min(3, steps)) if profile_dir else None, profile_dir)
  usage_start, wall_start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  for i in range(steps):
    profiler.before(i + 1)
    start = time.perf_counter()
    state, m = step_fn(state, batches[i % 4])
    jax.block_until_ready(m)
    times.append(time.perf_counter() - start)
    profiler.after(i + 1, m)
    losses.append(float(m["loss"]))
  usage = process_usage(usage_start, resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - wall_start)
  profile = {}
  if profiler.traced:  # the traced steps count in the times (the profiler's overhead is small next to a step)
    n = profiler.traced[1]
    print(profiler.summary.table(steps=n), flush=True)
    profile = {"profile": {"trace_dir": profiler.summary.trace_dir, "occupancy": profiler.summary.busy_s / max(
        profiler.summary.wall_s * profiler.summary.threads, 1e-12), "top_ms_per_step": {
            op.name: op.seconds / n * 1e3 for op in profiler.summary.ops[:15]}}}
  step_s = statistics.median(times)
  tokens = t.batch_size * config.data.seq_len
  return {"step_time_s": step_s, "tokens_per_sec": tokens / step_s, "compile_s": compile_s,
          "flops_per_token": flops.flops_per_token(spec, config.data.seq_len), "parameters": flops.param_count(spec),
          "final_loss": losses[-1], "step_time_spread": [min(times), max(times)],
          "cpu_utilization": usage["cpu_utilization"], "system_share": usage["system_share"],
          "minor_page_faults_per_step": usage["minor_page_faults"] / steps, **profile}


def process_usage(before, after, wall_s: float) -> dict:
  """This process's CPU use between two `resource.getrusage` readings over `wall_s` seconds: cpu_utilization
  (user + system CPU time over wall time; 2.0 = two cores busy), system_share (system time over CPU time) and
  minor_page_faults."""
  user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
  return {"cpu_utilization": (user + system) / wall_s, "system_share": system / max(user + system, 1e-9),
          "minor_page_faults": after.ru_minflt - before.ru_minflt}


def _define_flags():
  # Defined only when run as a script, so importing this module (tests do) never clashes with other flags.
  config_flags.DEFINE_config_file("config", "configs/shape_s.py", "Config to benchmark.")
  flags.DEFINE_integer("steps", 20, "Timed steps (after warm-up).")
  flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
  flags.DEFINE_string("out", "bench_train.json", "Where to write the JSON results.")
  flags.DEFINE_bool("donate", True, "Donate the train state to the step (--nodonate measures the cost of a fresh "
                    "state buffer every step).")
  flags.DEFINE_list("meshes", [], "Meshes to compare, each AXIS=SIZE[/AXIS=SIZE...] over config.mesh's axes "
                    "(e.g. data=8,fsdp=8,data=2/tensor=4); empty: the config's own mesh.")
  flags.DEFINE_list("dtypes", ["float32", "float32/bfloat16", "bfloat16"], "Our steps to measure, each "
                    "model.dtype[/model.matmul_dtype]: float32/bfloat16 keeps float32 activations around bf16 matmuls.")
  flags.DEFINE_string("profile", "", "A directory: trace three timed steps of each of our rows there "
                      "(TensorBoard/Perfetto) and print their top operations.")
  flags.DEFINE_bool("peer", True, "Also measure the HF-PyTorch peer (GPT2LMHeadModel, AdamW, eager, float32 and "
                    "bf16 autocast, 2 threads) in the same run.")


def main(argv):
  del argv
  f = flags.FLAGS
  config = f.config
  device = jax.devices()[0]
  peaks = {dtype: metrics.measure_matmul_flops(dtype, size=1024, repeats=10) for dtype in ("float32", "bfloat16")}
  if f.meshes:
    rows = []
    for text in f.meshes:
      row = benchmark(config, f.steps, f.warmup, parse_mesh(text), donate=f.donate)
      row.update(mesh=text, mfu_f32=row["flops_per_token"] * row["tokens_per_sec"] / (peaks["float32"] * jax.device_count()))
      rows.append(row)
    print(f"device {device.device_kind} x{jax.device_count()}; MFU against {jax.device_count()} x the f32 matmul peak")
    print(f"{'mesh':<28} {'tokens/s':>9} {'step ms':>8} {'MFU f32':>8} {'loss':>8}")
    for row in rows:
      print(f"{row['mesh']:<28} {row['tokens_per_sec']:9,.0f} {row['step_time_s'] * 1e3:8.1f} {row['mfu_f32']:8.1%} "
            f"{row['final_loss']:8.4f}")
    with open(f.out, "w", encoding="utf-8") as fh:
      json.dump({"device": device.device_kind, "devices": jax.device_count(), "rows": rows}, fh, indent=2)
    return
  name = os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"]))
  print(f"{name} on {cpu_description()}; {device.device_kind} x{jax.device_count()}; matmul rate f32 "
        f"{peaks['float32'] / 1e9:.0f} GFLOP/s, bf16 x bf16 -> f32 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s", flush=True)
  rows = []
  for entry in f.dtypes:
    c = config.copy_and_resolve_references()
    c.model.dtype, _, matmul = entry.partition("/")
    c.model.matmul_dtype = matmul or c.model.matmul_dtype
    profile_dir = os.path.join(f.profile, entry.replace("/", "-")) if f.profile else ""
    row = benchmark(c, f.steps, f.warmup, donate=f.donate, profile_dir=profile_dir)
    achieved = row["flops_per_token"] * row["tokens_per_sec"]
    rate_dtype = c.model.matmul_dtype or c.model.dtype  # the dtype the step's matmuls compute in
    row.update(who="peakllm", dtype=f"{c.model.dtype}/{rate_dtype}" if rate_dtype != c.model.dtype else rate_dtype,
               achieved_flops=achieved, mfu_of=rate_dtype,
               mfu=achieved / (peaks.get(rate_dtype, peaks["float32"]) * jax.device_count()))
    rows.append(row)
    _print_row(row)
  if f.peer and torch_peer.available():
    spec = ModelSpec.from_config(config.model)
    for autocast in (False, True):
      row = torch_peer.train_tokens_per_sec(spec, config.train.batch_size, config.data.seq_len, autocast_bf16=autocast,
                                            steps=f.steps, warmup=f.warmup)
      row.update(who="HF-PyTorch eager", dtype="bf16 autocast" if autocast else "float32")
      rows.append(row)
      _print_row(row)
  elif f.peer:
    print("peer skipped: torch and transformers are not installed (pip install -e '.[test]')")
  ours = max((r for r in rows if r["who"] == "peakllm"), key=lambda r: r["tokens_per_sec"])
  peer = max((r for r in rows if r["who"] != "peakllm"), key=lambda r: r["tokens_per_sec"], default=None)
  result = {"config": name, "cpu": cpu_description(), "device": device.device_kind, "devices": jax.device_count(),
            "matmul_peak_flops": peaks, "rows": rows, "best": ours,
            "ratio_to_peer": ours["tokens_per_sec"] / peer["tokens_per_sec"] if peer else None}
  if peer:
    print(f"ours ({ours['dtype']}) / peer's best ({peer['dtype']}): {result['ratio_to_peer']:.2f}x")
  with open(f.out, "w", encoding="utf-8") as fh:
    json.dump(result, fh, indent=2)


def _print_row(row: dict) -> None:
  extra = ""
  if row["who"] == "peakllm":
    extra = (f"  MFU {row['mfu']:.1%} of the {row['mfu_of']} matmul rate, CPU {row['cpu_utilization']:.0%}, "
             f"system {row['system_share']:.0%}, {row['minor_page_faults_per_step']:,.0f} page faults/step")
  print(f"{row['who']:<17} {row['dtype']:<14} {row['tokens_per_sec']:9,.0f} tokens/s {row['step_time_s'] * 1e3:8.1f} ms"
        f"/step  loss {row['final_loss']:.4f}{extra}", flush=True)


def cpu_description() -> str:
  """The CPU's model name and the flags that decide matmul rates here (AVX2, AVX-512, AVX512-BF16, VNNI, AMX)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as fh:
      info = fh.read()
  except OSError:
    return "unknown CPU"
  model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
  flags_line = next((line for line in info.splitlines() if line.startswith("flags")), "")
  present = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
             if f" {f}" in flags_line]
  return f"{model} ({os.cpu_count()} cores; {', '.join(present) or 'no AVX2'})"


if __name__ == "__main__":
  allocator.reexec_with_tcmalloc("scripts.bench_train")  # XLA CPU temporaries without page faults (train/allocator.py)
  _define_flags()
  app.run(main)
