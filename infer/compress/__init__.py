"""Post-training compression: calibration, SparseGPT, GPTQ and their baselines, compressed checkpoints."""

from __future__ import annotations


def compress_workdir(config, model, tokenizer, step: int, c, *, source_workdir: str, out: str | None = None,
                     samples=None) -> dict:
  """Compresses a loaded float model with the method config `c` (configs/compress.py), optionally saving the
  result as workdir `out`. Draws calibration samples from the training split unless `samples` [n, L] are given.
  Returns {"model": the compressed float model, "params", "layers", "metadata"}."""
  from configs import compress as compress_config
  from infer import loading
  from infer.compress import calibrate, pipeline, storage

  compress_config.validate(c)
  if model.spec.num_experts:
    raise ValueError(f"the model has {model.spec.num_experts}-expert MoE layers; compress it with QMoE "
                     "(python -m scripts.case_study_qmoe, infer/compress/qmoe.py)")
  if model.spec.quant != "none":
    raise ValueError(f"the model is already int8-quantized (model.quant={model.spec.quant!r}); compress a float one")
  if samples is None and c.method in compress_config.HESSIAN_METHODS:
    samples = calibrate.calibration_samples(config, tokenizer, num_samples=c.calibration_samples,
                                            seq_len=c.calibration_len or config.data.seq_len,
                                            seed=c.calibration_seed)
  params, layers, seconds = pipeline.compress_model(model, c, samples)
  metadata = {"label": compress_config.describe(c), "method": c.to_dict(), "time_s": seconds,
              "summary": pipeline.summary(layers)}
  if out is not None:
    metadata = storage.save(out, config=config, source_workdir=source_workdir, step=step, params=params,
                            layers=layers, metadata=metadata)
  return {"model": loading.as_model(model.spec, params), "params": params, "layers": layers, "metadata": metadata}
