"""The ablation study: one switch at a time against a baseline, each variant in its own process.

  python -m scripts.ablate --config=configs/shape_s.py --study=train [--switches=model.remat,model.scan_layers]
  python -m scripts.ablate --config=configs/shape_s.py --study=decode [--switches=format,batch]
  python -m scripts.ablate --study=compress --workdir=runs/default [--switches=format=int8|gptq4|sparsegpt50]
  python -m scripts.ablate --study=serve --workdir=runs/default [--switches=slots,mode]
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
  * compress: each format of a trained --workdir is made (infer.quantize or infer.compress: GPTQ, RTN, SparseGPT,
    timed as "compress s") and loaded as infer.generate serves it; recorded: batch-1 decode tokens/s, resident
    weights (MiB and bits per parameter of the float model), peak RSS, and validation perplexity (quality). The plot
    is perplexity against bits.
  * serve: `scripts.bench_serve`'s load (streaming clients, mixed prompt and output lengths) against `infer.serve`
    with each setting (slots = the decode batch, batching mode, prefill chunk): output tokens/s, TPOT and TTFT
    (quality column: TTFT p50), requests/s, server start + warm-up time, and the server's peak RSS. The plot is
    speed against batch.
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
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

from configs import base
from configs import compress as compress_config
from infer import evaluate, loading, quantize
from infer.compress import pipeline as compress
from model import quant
from model import transformer
from model.transformer import ModelSpec
from scripts import bench_decode, bench_train, serve_load
from train import allocator
from train import setup as setup_lib
from workdir import layout

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
        "train.lora.rank": (0, 16),  # LoRA on every linear layer of the blocks, the base frozen
        "model.attention_impl": ("xla", "pallas", "cudnn"),  # accelerators only (ACCELERATOR_SWITCHES)
    },
    "decode": {
        "format": ("float32", "bfloat16", "int8", "w8a8", "gptq4", "gptq4_int8head", "gptq3"),
        "model.matmul_impl": ("auto", "xla"),
        "batch": (1, 8),
    },
}
DECODE_BASELINE = {"format": "float32", "model.matmul_impl": "auto", "batch": 1}
# compress study: format -> how it is made from the trained --workdir (infer.quantize mode, or configs/compress.py
# keys for infer.compress; "head": served with --head_quant); float32 is the workdir itself.
COMPRESS_FORMATS: dict[str, dict | None] = {
    "float32": None,
    "int8": {"mode": "int8_weight"},
    "w8a8": {"mode": "w8a8"},
    "gptq8": {"method": "gptq", "bits": 8},
    "gptq4": {"method": "gptq", "bits": 4},
    "gptq4_int8head": {"method": "gptq", "bits": 4, "head": "int8"},
    "gptq3": {"method": "gptq", "bits": 3},
    "gptq2": {"method": "gptq", "bits": 2},
    "rtn4": {"method": "rtn", "bits": 4},
    "sparsegpt50": {"method": "sparsegpt", "sparsity": 0.5},
    "sparsegpt24": {"method": "sparsegpt", "prune_n": 2, "prune_m": 4},
    "sparsegpt50_4bit": {"method": "sparsegpt", "sparsity": 0.5, "bits": 4},
}
STUDIES["compress"] = {"format": tuple(COMPRESS_FORMATS)}
COMPRESS_BASELINE = {"format": "float32"}
# serve study: the server's settings under one load (scripts/bench_serve.py); slots is the decode batch
STUDIES["serve"] = {"slots": (1, 4, 8, 16), "mode": ("continuous", "static"), "prefill_chunk": (0, 32)}
SERVE_BASELINE = {"slots": 8, "mode": "continuous", "prefill_chunk": 0}
WORKDIR_STUDIES = ("compress", "serve")  # the studies of a trained --workdir
MIB = 2**20


# Switches run only when --switches names them (scripts/gpu_check.sh does): on CPU Pallas kernels run in interpret
# mode (minutes per step) and cuDNN does not exist. (Asking JAX for the backend here would claim the accelerator
# that the study's child processes need.)
ACCELERATOR_SWITCHES = {"model.attention_impl"}


def parse_switches(study: str, text: list[str], config) -> dict[str, tuple]:
  """--switches entries (KEY or KEY=V1|V2) -> {key: values}; ValueError names an unknown key and the allowed ones.
  No entries: the study's whole grid but ACCELERATOR_SWITCHES."""
  grid = STUDIES[study]
  if not text:
    return {key: values for key, values in grid.items() if key not in ACCELERATOR_SWITCHES}
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
  if study in WORKDIR_STUDIES:
    return {"compress": COMPRESS_BASELINE, "serve": SERVE_BASELINE}[study][key]
  if study == "decode":
    return DECODE_BASELINE[key] if key != "model.matmul_impl" else config.model.matmul_impl
  node = config
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node:
      raise ValueError(f"--switches: the config has no key {key!r}")
    node = node[part]
  return node


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


def require_workdir(study: str, workdir: str) -> None:
  """The compress and serve studies measure a trained run: raises (FileNotFoundError or ValueError, saying so)
  unless `workdir` is one. Checked before any work."""
  if study in WORKDIR_STUDIES:
    try:
      layout.load_config(workdir or "")
    except (ValueError, FileNotFoundError) as e:
      raise type(e)(f"{e} (--study={study} needs --workdir=<a trained run>)") from None


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
    *parents, name = key.split(".")  # section.name, or deeper (train.lora.rank)
    node = c
    for parent in parents:
      node = node[parent]
    node[name] = value
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


def run_compress(workdir: str, fmt: str, work_root: str, *, group: int, samples: int, eval_tokens: int,
                 new_tokens: int, repeats: int) -> dict:
  """Makes format `fmt` of the trained `workdir` under work_root/fmt (timed), loads it as `infer.generate` would
  (packed codes served as stored), and measures perplexity on the validation split, batch-1 decode tokens/s and
  the resident weights (also as bits per parameter of the float model)."""
  import jax
  from flax import nnx

  recipe = dict(COMPRESS_FORMATS[fmt] or {})
  head = recipe.pop("head", None)
  path = workdir
  start = time.perf_counter()
  if "mode" in recipe:
    path = os.path.join(work_root, fmt)
    quantize.quantize_workdir(workdir, path, recipe["mode"], calibration_batches=max(1, samples // 8))
  elif recipe:
    path = os.path.join(work_root, fmt)
    config, model, tokenizer, step = loading.load_trained(workdir)
    c = compress_config.get_config()
    c.update(calibration_samples=samples, **recipe)
    if c.bits and c.method != "sparsegpt":  # the largest group size up to --compress_group dividing every input size
      inputs = (model.spec.embed_dim, model.spec.mlp_dim, model.spec.num_heads * model.spec.head_dim)
      c.group_size = next((g for g in (group, group // 2, group // 4) if g and not any(d % g for d in inputs)), 0)
    compress.compress_workdir(config, model, tokenizer, step, c, source_workdir=workdir, out=path)
  make_s = time.perf_counter() - start
  config, model, tokenizer, _ = loading.load_trained(path, head_quant=head)
  float_spec = ModelSpec.from_config(layout.load_config(workdir).model)
  params = sum(x.size for x in jax.tree.leaves(jax.eval_shape(lambda: transformer.init_params(float_spec, 0))))
  weight_bytes = quant.nbytes(nnx.state(model, nnx.Param))
  tokens = evaluate.validation_stream(config, tokenizer, eval_tokens)
  ppl = evaluate.stream_perplexity(model, tokens, seq_len=config.data.seq_len)["ppl"]
  seconds = bench_decode.time_generate(model.unstacked(), 1, 32, new_tokens, repeats)
  return {"tokens_per_s": new_tokens / seconds, "step_s": seconds / new_tokens, "compile_s": make_s,
          "weight_mib": weight_bytes / MIB, "bits_per_param": 8 * weight_bytes / params, "quality": ppl,
          "quality_name": "perplexity (validation)", "weights_note": loading.weights_note(model)}


def run_serve(workdir: str, settings: dict, requests: int, concurrency: int) -> dict:
  """`scripts.bench_serve`'s load (scripts/serve_load.py) with these server settings: the server in its own process under `concurrency`
  closed-loop streaming clients sending `requests` requests; output tokens/s, TTFT, TPOT and the server's peak RSS."""
  model_config = layout.load_config(workdir).model
  half = model_config.max_len // 2  # bench_serve's mix (prompts 8-96, outputs 8-128 tokens), fitted to the context
  s = serve_load.Settings(workdir=workdir, requests=requests, concurrency=concurrency,
                          prompt_lengths=(min(8, half), min(96, half)), output_lengths=(min(8, half), min(128, half)),
                          **settings)
  row = serve_load.bench_mode(s, model_config.vocab_size, model_config.max_len)
  if row["failed"] or not row["requests"]:
    raise RuntimeError(f"{row['failed']} of {row['failed'] + row['requests']} requests failed under {settings}")
  return {"tokens_per_s": row["output_tokens_per_s"], "step_s": row["tpot_p50_s"], "compile_s": row["ready_s"],
          "requests_per_s": row["requests_per_s"], "peak_rss_mib": row["server_peak_rss_mib"],
          "quality": row["ttft_p50_s"], "quality_name": "TTFT p50 (s)", "ttft_p99_s": row["ttft_p99_s"],
          "tpot_p99_s": row["tpot_p99_s"], "slots": s.slots}


def child(spec: dict) -> dict:
  """Runs one variant described by `spec` (as `main` writes it) and returns its figures plus the peak RSS (the
  server's, for the serve study)."""
  if spec["study"] == "serve":
    out = run_serve(spec["workdir"], {**SERVE_BASELINE, **spec["overrides"]}, spec["serve_requests"],
                    spec["serve_concurrency"])
  elif spec["study"] == "compress":
    out = run_compress(spec["workdir"], spec["overrides"].get("format", "float32"), spec["work_root"],
                       group=spec["compress_group"], samples=spec["compress_samples"],
                       eval_tokens=spec["eval_tokens"], new_tokens=spec["new_tokens"], repeats=spec["repeats"])
  elif spec["study"] == "train":
    config = _apply(_load_config(spec["config_path"], spec["base_overrides"]), spec["overrides"])
    base.validate(config)
    out = run_train(config, spec["steps"], spec["warmup"])
  else:
    settings = {**DECODE_BASELINE, "model.matmul_impl": spec["base_matmul_impl"], **spec["overrides"]}
    out = run_decode(spec["config_path"], settings, spec["new_tokens"], spec["repeats"])
  out["peak_rss_mib"] = out.get("peak_rss_mib") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
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
  memory = {"train": "temp MiB (XLA)", "decode": "weights MiB", "compress": "weights MiB (bits/param)",
            "serve": "requests/s"}[study]
  mem_key = {"train": "temp_mib", "serve": "requests_per_s"}.get(study, "weight_mib")
  made = {"compress": "compress s", "serve": "ready s"}.get(study, "compile s")
  step = "TPOT p50 ms" if study == "serve" else "step ms"
  lines = [f"| switch | value | tokens/s (rounds) | x baseline | {step} | {made} | {memory} | peak RSS MiB | "
           f"{rows[0]['quality_name']} |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    value = "" if r["switch"] == "baseline" else (repr(r["value"]) if r["value"] == "" else str(r["value"]))
    rounds = " / ".join(f"{t:,.0f}" for t in r["tokens_per_s_rounds"])
    memory_cell = _fmt(r.get(mem_key)) + (f" ({r['bits_per_param']:.2f})" if "bits_per_param" in r else "")
    quality = f"{r['quality']:.6g}" + (f" ({r['quality_x']:.3f}x)" if study == "compress" and "quality_x" in r else "")
    lines.append(f"| {r['switch']} | {value} | {r['tokens_per_s']:,.0f} ({rounds}) | {r.get('tokens_per_s_x', 1):.2f}x | "
                 f"{r['step_s'] * 1e3:,.1f} | {r['compile_s']:.1f} | {memory_cell} | "
                 f"{_fmt(r.get('peak_rss_mib'))} | {quality} |")
  return "\n".join(lines) + "\n"


def _fmt(value) -> str:
  if value is None:
    return "-"
  return f"{value:,.0f}" if abs(value) >= 10 else f"{value:.2f}"


def plot(study: str, rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  mem_key, mem_label = {"train": ("temp_mib", "compiled temporaries (MiB)"),
                        "serve": ("peak_rss_mib", "server peak RSS (MiB)")}.get(study, ("weight_mib", "weights (MiB)"))
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for r in rows:
    label = "baseline" if r["switch"] == "baseline" else f"{r['switch']}={r['value']!r}"
    marker = "*" if r["switch"] == "baseline" else "o"
    axes[0].scatter(r.get(mem_key) or 0, r["tokens_per_s"], marker=marker, s=80)
    axes[0].annotate(label, (r.get(mem_key) or 0, r["tokens_per_s"]), fontsize=7, xytext=(3, 3),
                     textcoords="offset points")
    point = {"compress": lambda: (r["bits_per_param"], r["quality"]),
             "serve": lambda: (r["slots"], r["tokens_per_s"])}.get(study, lambda: (r["quality"], r["tokens_per_s"]))()
    axes[1].scatter(*point, marker=marker, s=80)
    axes[1].annotate(label, point, fontsize=7, xytext=(3, 3), textcoords="offset points")
  axes[0].set(xlabel=mem_label, ylabel="tokens/s", title=f"{study}: speed vs memory, one switch at a time")
  if study == "compress":
    axes[1].set(xlabel="bits per parameter (resident weights)", ylabel=rows[0]["quality_name"],
                title="compress: quality vs bits")
  elif study == "serve":
    axes[1].set(xlabel="slots (decode batch)", ylabel="output tokens/s", title="serve: speed vs batch")
  else:
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
  flags.DEFINE_string("workdir", "", "compress: the trained run whose formats are made and measured.")
  flags.DEFINE_integer("compress_samples", 32, "compress: calibration windows (GPTQ, SparseGPT, SmoothQuant).")
  flags.DEFINE_integer("compress_group", 128, "compress: inputs per quantization group (halved until it divides).")
  flags.DEFINE_integer("eval_tokens", 32768, "compress: validation tokens scored for perplexity.")
  flags.DEFINE_integer("serve_requests", 48, "serve: requests per run (bench_serve's mix of prompt/output lengths).")
  flags.DEFINE_integer("serve_concurrency", 16, "serve: closed-loop streaming clients.")
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
    require_workdir(f.study, f.workdir)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  scratch = tempfile.TemporaryDirectory(prefix="ablate-")  # compress: the formats' workdirs, removed at the end
  work_root = scratch.name
  import jax
  results: list[list[dict]] = [[] for _ in runs]
  for round_ in range(f.rounds):  # whole rounds, so a slow spell of the machine hits every variant alike
    for i, run in enumerate(runs):
      spec = {"study": f.study, "config_path": config_path, "base_overrides": base_overrides,
              "overrides": run["overrides"], "steps": f.steps, "warmup": f.warmup, "new_tokens": f.decode_tokens,
              "repeats": f.decode_repeats, "base_matmul_impl": config.model.matmul_impl,
              "workdir": f.workdir, "work_root": os.path.join(work_root, f"round{round_ + 1}"),
              "compress_group": f.compress_group, "compress_samples": f.compress_samples,
              "eval_tokens": f.eval_tokens, "serve_requests": f.serve_requests,
              "serve_concurrency": f.serve_concurrency}
      label = "baseline" if run["switch"] == "baseline" else f"{run['switch']}={run['value']!r}"
      print(f"[round {round_ + 1}/{f.rounds}, {i + 1}/{len(runs)}] {label}", flush=True)
      try:
        results[i].append(_spawn(spec))
      except RuntimeError as e:
        sys.exit(f"error: {e}")
  scratch.cleanup()
  rows = with_ratios([{"switch": run["switch"], "value": run["value"], **combine(r)} for run, r in zip(runs, results)])
  os.makedirs(f.out_dir, exist_ok=True)
  stem = os.path.join(f.out_dir, f.study)
  meta = {"study": f.study, "config": f.workdir if f.study in WORKDIR_STUDIES else config_path, "cpu": bench_train.cpu_description(), "jax": jax.__version__,
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
    ours, theirs = base.flatten(config[section].to_dict()), base.flatten(fresh[section].to_dict())
    out.update({f"{section}.{name}": value for name, value in ours.items() if theirs.get(name) != value})
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
