"""The ablation study: one switch at a time against a baseline, each variant in its own process.

  python -m scripts.ablate --config=configs/shape_s.py --study=train [--switches=model.remat,model.scan_layers]
  python -m scripts.ablate --config=configs/shape_s.py --study=decode [--switches=format,batch]
  --switches=KEY=V1|V2 overrides a grid's values; --out_dir=ablations (default) receives <study>.json,
  <study>.md and <study>.png.

Each run (the baseline, then every value of every switch that differs from the baseline's) is a fresh Python process
(`--child`), so compile time and the process's peak memory belong to that variant alone. The list runs `--rounds`
times round-robin (default 2), and each row is the variant's median round, since this kind of machine drifts. Recorded per run:
  * train: tokens/s (median of warmed-up steps of the trainer's own compiled step on fixed random batches), step
    time, compile time, XLA's compiled memory analysis (temporaries, arguments) and the process's peak RSS, and the
    loss after the same number of steps (a quality check: the batches repeat, so the loss falls).
  * decode: tokens/s of `infer.generate` (prefill included), time to first token, weight bytes, peak RSS, and the
    KL divergence of the next-token distributions from the float32 model's on fixed random tokens (quality).
Each figure is also given as a ratio to the baseline. The grids below are the one place that declares what a study
varies; a key the config does not have is refused with the list of allowed ones.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import subprocess
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from configs import base
from model import quant
from scripts import bench_decode, bench_train
from train import allocator
from train import setup as setup_lib

# study -> switch -> values. Train keys are config keys; decode switches are the benchmark's own settings.
STUDIES: dict[str, dict[str, tuple]] = {
    "train": {
        "model.remat": ("none", "full", "save_dots"),
        "model.scan_layers": (True, False),
        "model.matmul_dtype": ("", "bfloat16"),
        "model.dtype": ("float32", "bfloat16"),
        "model.matmul_impl": ("auto", "xla"),  # native batched matmuls in attention vs XLA's
        "model.loss_chunk_tokens": (0, 512),
        "train.grad_accum_steps": (1, 2),
    },
    "decode": {
        "format": ("float32", "bfloat16", "int8", "w8a8", "gptq4", "gptq4_int8head", "gptq3"),
        "model.matmul_impl": ("auto", "xla"),
        "batch": (1, 8),
    },
}
DECODE_BASELINE = {"format": "float32", "model.matmul_impl": "auto", "batch": 1}
MIB = 2**20


def parse_switches(study: str, text: list[str], config) -> dict[str, tuple]:
  """--switches entries (KEY or KEY=V1|V2) -> {key: values}; ValueError names an unknown key and the allowed ones."""
  grid = STUDIES[study]
  if not text:
    return dict(grid)
  chosen = {}
  for entry in text:
    key, _, values = entry.partition("=")
    if key not in grid:
      raise ValueError(f"--switches: {key!r} is not a switch of the {study} study; allowed: {', '.join(grid)}")
    if values:
      baseline = _baseline_value(study, key, config)
      chosen[key] = tuple(_parse_like(v, baseline, key) for v in values.split("|"))
    else:
      chosen[key] = grid[key]
  return chosen


def _baseline_value(study: str, key: str, config):
  if study == "decode":
    return DECODE_BASELINE[key] if key != "model.matmul_impl" else config.model.matmul_impl
  section, name = key.split(".")
  if section not in config or name not in config[section]:
    raise ValueError(f"--switches: the config has no key {key!r}")
  return config[section][name]


def _parse_like(text: str, like, key: str):
  """'true' / '2' / 'x' -> a value of `like`'s type (ValueError names the key)."""
  try:
    if isinstance(like, bool):
      if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError(text)
      return text.lower() in ("true", "1")
    return type(like)(text)
  except ValueError:
    raise ValueError(f"--switches: {key}={text!r} is not a valid {type(like).__name__}") from None


def variants(study: str, switches: dict[str, tuple], config) -> list[dict]:
  """The baseline run, then one run per switch value that differs from the baseline's."""
  runs = [{"switch": "baseline", "value": "", "overrides": {}}]
  for key, values in switches.items():
    base_value = _baseline_value(study, key, config)
    for value in values:
      if value != base_value:
        runs.append({"switch": key, "value": value, "overrides": {key: value}})
  return runs


# -- one variant, in its own process -------------------------------------------------------------------------------


def _apply(config, overrides: dict):
  c = config.copy_and_resolve_references()
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


def run_train(config, steps: int, warmup: int) -> dict:
  import jax


  setup = setup_lib.build(config)
  start = time.perf_counter()
  compiled = setup.compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  state = setup.init_state()
  batches = [jax.device_put(bench_train.random_batch(config, i), setup.batch_sharding) for i in range(4)]
  with jax.set_mesh(setup.mesh):
    row = bench_train._time_steps(config, setup.spec, state, compiled, batches, steps, warmup)
  return {"tokens_per_s": row["tokens_per_sec"], "step_s": row["step_time_s"], "compile_s": compile_s,
          "temp_mib": mem.temp_size_in_bytes / MIB if mem else None,
          "argument_mib": mem.argument_size_in_bytes / MIB if mem else None,
          "quality": row["final_loss"], "quality_name": f"loss after {steps + warmup + 1} steps",
          "cpu_utilization": row["cpu_utilization"]}


def run_decode(config_path: str, settings: dict, new_tokens: int, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx


  shape = os.path.splitext(os.path.basename(config_path))[0]
  fmt, batch, impl = settings["format"], int(settings["batch"]), settings["model.matmul_impl"]
  start = time.perf_counter()
  model = bench_decode.build_model(shape, fmt, impl).unstacked()
  total = bench_decode.time_generate(model, batch, 32, new_tokens, repeats)
  compile_and_first_s = time.perf_counter() - start
  ttft = bench_decode.time_generate(model, batch, 32, 1, repeats)
  length = min(128, model.spec.max_len)
  tokens = jnp.asarray(np.random.default_rng(1).integers(1, model.spec.vocab_size, (4, length)), jnp.int32)
  reference = bench_decode.build_model(shape, "float32", "xla")  # same seed: the weights `model` was made from
  p_log = jax.nn.log_softmax(reference(tokens).astype(jnp.float32), -1)
  q_log = jax.nn.log_softmax(model(tokens).astype(jnp.float32), -1)
  p = jnp.exp(p_log)  # tokens the model never predicts (-inf logits) contribute 0
  kl = float(jnp.mean(jnp.sum(jnp.where(p > 0, p * (p_log - q_log), 0.0), -1)))
  return {"tokens_per_s": batch * new_tokens / total, "step_s": total / new_tokens, "ttft_s": ttft,
          "compile_s": compile_and_first_s, "weight_mib": quant.nbytes(nnx.state(model, nnx.Param)) / MIB,
          "quality": kl, "quality_name": "KL to float32 (nats/token)"}


def child(spec: dict) -> dict:
  """Runs one variant described by `spec` (as `main` writes it) and returns its figures plus the peak RSS."""
  if spec["study"] == "train":
    config = _apply(_load_config(spec["config_path"], spec["base_overrides"]), spec["overrides"])
    base.validate(config)
    out = run_train(config, spec["steps"], spec["warmup"])
  else:
    settings = {**DECODE_BASELINE, "model.matmul_impl": spec["base_matmul_impl"], **spec["overrides"]}
    out = run_decode(spec["config_path"], settings, spec["new_tokens"], spec["repeats"])
  out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return out


def _load_config(path: str, overrides: dict):
  module_spec = importlib.util.spec_from_file_location("ablate_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return _apply(module.get_config(), overrides)


# -- the parent: runs, table, plots --------------------------------------------------------------------------------

def combine(runs: list[dict]) -> dict:
  """One variant's rounds -> its row: the median round by tokens/s (all its figures), plus every round's tokens/s."""
  ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
  return {**ordered[(len(ordered) - 1) // 2], "tokens_per_s_rounds": [r["tokens_per_s"] for r in runs]}


RATIO_KEYS = ("tokens_per_s", "step_s", "compile_s", "temp_mib", "peak_rss_mib", "weight_mib", "quality")


def with_ratios(rows: list[dict]) -> list[dict]:
  """Adds `<figure>_x` = figure / the baseline's, for every figure both have."""
  base = rows[0]
  for row in rows:
    for key in RATIO_KEYS:
      if isinstance(row.get(key), (int, float)) and isinstance(base.get(key), (int, float)) and base[key]:
        row[f"{key}_x"] = row[key] / base[key]
  return rows


def markdown(study: str, rows: list[dict]) -> str:
  memory = "temp MiB (XLA)" if study == "train" else "weights MiB"
  mem_key = "temp_mib" if study == "train" else "weight_mib"
  lines = [f"| switch | value | tokens/s (rounds) | x baseline | step ms | compile s | {memory} | peak RSS MiB | "
           f"{rows[0]['quality_name']} |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    value = "" if r["switch"] == "baseline" else (repr(r["value"]) if r["value"] == "" else str(r["value"]))
    rounds = " / ".join(f"{t:,.0f}" for t in r["tokens_per_s_rounds"])
    lines.append(f"| {r['switch']} | {value} | {r['tokens_per_s']:,.0f} ({rounds}) | {r.get('tokens_per_s_x', 1):.2f}x | "
                 f"{r['step_s'] * 1e3:,.1f} | {r['compile_s']:.1f} | {_fmt(r.get(mem_key))} | "
                 f"{_fmt(r.get('peak_rss_mib'))} | {r['quality']:.6g} |")
  return "\n".join(lines) + "\n"


def _fmt(value) -> str:
  if value is None:
    return "-"
  return f"{value:,.0f}" if abs(value) >= 10 else f"{value:.2f}"


def plot(study: str, rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  mem_key, mem_label = ("temp_mib", "compiled temporaries (MiB)") if study == "train" else ("weight_mib", "weights (MiB)")
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for r in rows:
    label = "baseline" if r["switch"] == "baseline" else f"{r['switch']}={r['value']!r}"
    marker = "*" if r["switch"] == "baseline" else "o"
    axes[0].scatter(r.get(mem_key) or 0, r["tokens_per_s"], marker=marker, s=80)
    axes[0].annotate(label, (r.get(mem_key) or 0, r["tokens_per_s"]), fontsize=7, xytext=(3, 3),
                     textcoords="offset points")
    axes[1].scatter(r["quality"], r["tokens_per_s"], marker=marker, s=80)
    axes[1].annotate(label, (r["quality"], r["tokens_per_s"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
  axes[0].set(xlabel=mem_label, ylabel="tokens/s", title=f"{study}: speed vs memory, one switch at a time")
  axes[1].set(xlabel=rows[0]["quality_name"], ylabel="tokens/s", title=f"{study}: speed vs quality")
  for ax in axes:
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _define_flags():
  config_flags.DEFINE_config_file("config", "configs/shape_s.py", "The baseline config.")
  flags.DEFINE_enum("study", "train", list(STUDIES), "Which study.")
  flags.DEFINE_list("switches", [], "Switches to vary (KEY or KEY=V1|V2); empty: the study's whole grid.")
  flags.DEFINE_string("out_dir", "ablations", "Where <study>.json, .md and .png go.")
  flags.DEFINE_integer("steps", 8, "train: timed steps per run (after warm-up).")
  flags.DEFINE_integer("warmup", 2, "train: untimed steps after compilation.")
  flags.DEFINE_integer("decode_tokens", 64, "decode: generated tokens per run.")
  flags.DEFINE_integer("decode_repeats", 2, "decode: timed generate calls per run (median).")
  flags.DEFINE_integer("rounds", 2, "Runs of every variant, round-robin; each row is the median round.")
  flags.DEFINE_string("child", "", "Internal: run one variant from this JSON and print its figures.")


def main(argv):
  del argv
  f = flags.FLAGS
  if f.child:
    print("ABLATE_RESULT " + json.dumps(child(json.loads(f.child))), flush=True)
    return
  config = f.config
  config_path = config_flags.get_config_filename(f["config"])
  base_overrides = _overridden(config, config_path)
  try:
    switches = parse_switches(f.study, f.switches, config)
    runs = variants(f.study, switches, config)
  except ValueError as e:
    sys.exit(f"error: {e}")
  import jax
  results: list[list[dict]] = [[] for _ in runs]
  for round_ in range(f.rounds):  # whole rounds, so a slow spell of the machine hits every variant alike
    for i, run in enumerate(runs):
      spec = {"study": f.study, "config_path": config_path, "base_overrides": base_overrides,
              "overrides": run["overrides"], "steps": f.steps, "warmup": f.warmup, "new_tokens": f.decode_tokens,
              "repeats": f.decode_repeats, "base_matmul_impl": config.model.matmul_impl}
      label = "baseline" if run["switch"] == "baseline" else f"{run['switch']}={run['value']!r}"
      print(f"[round {round_ + 1}/{f.rounds}, {i + 1}/{len(runs)}] {label}", flush=True)
      try:
        results[i].append(_spawn(spec))
      except RuntimeError as e:
        sys.exit(f"error: {e}")
  rows = with_ratios([{"switch": run["switch"], "value": run["value"], **combine(r)} for run, r in zip(runs, results)])
  os.makedirs(f.out_dir, exist_ok=True)
  stem = os.path.join(f.out_dir, f.study)
  meta = {"study": f.study, "config": config_path, "cpu": bench_train.cpu_description(), "jax": jax.__version__,
          "command": " ".join(["python -m scripts.ablate"] + sys.argv[1:]),
          "date": time.strftime("%Y-%m-%d")}
  with open(stem + ".json", "w", encoding="utf-8") as fh:
    json.dump({**meta, "rows": rows}, fh, indent=2, default=str)
  table = markdown(f.study, rows)
  with open(stem + ".md", "w", encoding="utf-8") as fh:
    fh.write(f"{meta['date']}, {meta['cpu']}, jax {meta['jax']}: `{meta['command']}`\n\n{table}")
  plot(f.study, rows, stem + ".png")
  print(table)
  print(f"wrote {stem}.json, {stem}.md, {stem}.png")


def _overridden(config, config_path: str) -> dict:
  """The --config.KEY=VALUE overrides on the command line, as {key: value}, for the child processes."""
  fresh = _load_config(config_path, {})
  out = {}
  for section in ("model", "data", "train"):
    for name, value in config[section].items():
      if not isinstance(value, dict) and fresh[section].get(name) != value:
        out[f"{section}.{name}"] = value
  return out


def _spawn(spec: dict) -> dict:
  """Runs one variant in a fresh process; RuntimeError with its last output lines when it fails."""
  cmd = [sys.executable, "-m", "scripts.ablate", f"--child={json.dumps(spec, default=str)}"]
  done = subprocess.run(cmd, capture_output=True, text=True)
  for line in done.stdout.splitlines():
    if line.startswith("ABLATE_RESULT "):
      return json.loads(line[len("ABLATE_RESULT "):])
  tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
  raise RuntimeError(f"variant {spec['overrides'] or 'baseline'} failed (exit {done.returncode}):\n{tail}")


if __name__ == "__main__":
  allocator.reexec_with_tcmalloc("scripts.ablate")
  _define_flags()
  app.run(main)
