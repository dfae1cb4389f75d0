#!/usr/bin/env bash
# One-shot accelerator check: versions, the model/step test files on the GPU, and short training runs whose
# metrics (tokens/s, MFU) the README quotes. Usage on a GPU machine: bash scripts/gpu_check.sh [OUT_DIR]
# Wheels for packages the machine lacks may be placed in .whl/ (installed to /tmp/site first).
set -uo pipefail
OUT=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1
python3 -c "import jax, flax, optax, orbax.checkpoint, grain; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" \
  2>&1 | tee "$OUT/versions.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv >> "$OUT/versions.txt" 2>&1

# Tests on the accelerator (f32 matmuls at full precision so the CPU tolerances apply).
JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest timeout 200 python3 -m pytest -q -p no:cacheprovider \
  tests/test_model.py tests/test_step.py 2>&1 | tail -25 | tee "$OUT/tests.txt"

# GPT-2 124M, bf16 compute, on the embedded stdlib corpus.
timeout 200 python3 -m train --config=configs/gpt2_124m.py --workdir=/tmp/gpt2 --config.train.steps=120 \
  --config.train.warmup_steps=20 --config.train.eval_every=0 --config.train.eval_batches=4 \
  --config.train.checkpoint_every=1000 --config.train.batch_size=32 --config.data.num_workers=8 \
  --config.data.tokenizer_train_bytes=4000000 --config.train.progress_bar=False > "$OUT/gpt2.log" 2>&1
cp /tmp/gpt2/metrics.jsonl "$OUT/gpt2_metrics.jsonl" 2>/dev/null
tail -5 "$OUT/gpt2.log"

# Llama-3.2-1B shape, bf16 compute, full remat (the XLA attention path materialises scores).
timeout 200 python3 -m train --config=configs/llama_1b.py --workdir=/tmp/llama --config.train.steps=30 \
  --config.train.warmup_steps=5 --config.train.eval_every=0 --config.train.eval_batches=1 \
  --config.train.checkpoint_every=1000 --config.train.batch_size=8 --config.train.log_every=5 \
  --config.model.remat=full --config.data.num_workers=8 --config.data.tokenizer_train_bytes=4000000 \
  --config.sample.max_new_tokens=8 --config.train.progress_bar=False > "$OUT/llama.log" 2>&1
cp /tmp/llama/metrics.jsonl "$OUT/llama_metrics.jsonl" 2>/dev/null
tail -5 "$OUT/llama.log"
