#!/usr/bin/env bash
# One-shot accelerator check on one H100/H200. Sections: `tests` (about 3 minutes on an H100): the kernel and
# quantization tests compiled for the GPU; `bench` (about 2 minutes): the kernel benchmark (attention TFLOP/s, int8
# decode-matmul GB/s); `model` (about 2 minutes): the model tests on the GPU; `train` (about 3 minutes): short GPT-2 124M
# training runs with xla, pallas and cudnn attention; `ablate` (about 8 minutes): the ablation study's GPU version,
# the train study on GPT-2 124M (attention implementations, remat, scan, dtype, chunked loss, accumulation, LoRA) and
# the decode study, one round
# each, tables and plots in OUT/ablations (copy them to docs/ablations.md beside the CPU ones).
# Usage on a GPU machine: bash scripts/gpu_check.sh [OUT_DIR] [SECTION ...]   (default: tests bench)
# Wheels for packages the machine lacks may sit in .whl/.
set -uo pipefail
OUT=${1:-${OUT:-/tmp/gpu_check}}
shift || true
SECTIONS=${*:-tests bench}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" \
  2>&1 | tee "$OUT/versions.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | tee -a "$OUT/versions.txt"

if [[ " $SECTIONS " == *" tests "* ]]; then
  # Kernels leave interpret mode off the CPU, so these run the Triton-compiled kernels.
  JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest timeout 200 python3 -m pytest -q -p no:cacheprovider -x \
    --durations=5 tests/test_flash_attention.py tests/test_decode_attention.py tests/test_int8_matmul.py \
    tests/test_quant.py "tests/test_qmoe.py::test_fused_decode_matvec_equals_decode_then_matmul" \
    "tests/test_serving.py::test_paged_decode_kernel_matches_reference_for_ragged_rows" \
    2>&1 | tail -40 | tee "$OUT/tests.txt"
fi

if [[ " $SECTIONS " == *" model "* ]]; then
  JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest timeout 150 python3 -m pytest -q -p no:cacheprovider -x \
    --durations=5 tests/test_model.py 2>&1 | tail -30 | tee "$OUT/tests_model.txt"
fi

if [[ " $SECTIONS " == *" bench "* ]]; then
  timeout 170 python3 -m scripts.bench_kernels --repeats=5 --out="$OUT/bench_kernels.json" 2>&1 | grep -v "^W\|^I" \
    | tee "$OUT/bench_kernels.txt"
fi

if [[ " $SECTIONS " == *" train "* ]]; then
  # GPT-2 124M, bf16: the same short run with each attention implementation.
  for impl in xla pallas cudnn; do
    limit=70; [[ $impl == xla ]] && limit=150  # the first run also prepares the data
    timeout $limit python3 -m train --config=configs/gpt2_124m.py --workdir=/tmp/gpt2_$impl --config.train.steps=30 \
      --config.train.warmup_steps=10 --config.train.eval_every=0 --config.train.eval_batches=2 \
      --config.train.checkpoint_every=1000 --config.train.batch_size=32 --config.data.num_workers=8 \
      --config.data.tokenizer_train_bytes=4000000 --config.sample.max_new_tokens=8 \
      --config.model.attention_impl=$impl --config.train.progress_bar=False > "$OUT/gpt2_$impl.log" 2>&1
    grep -v eval /tmp/gpt2_$impl/metrics.jsonl 2>/dev/null | tail -1 | sed "s/^/$impl last: /"
    grep -E "Traceback|Error" -A3 "$OUT/gpt2_$impl.log" | head -12 || true
  done
fi
if [[ " $SECTIONS " == *" ablate "* ]]; then
  timeout 360 python3 -m scripts.ablate --config=configs/gpt2_124m.py --study=train --rounds=1 --steps=5 --warmup=2 \
    --switches=model.attention_impl,model.remat,model.scan_layers,model.dtype,model.loss_chunk_tokens,train.grad_accum_steps,train.lora.rank \
    --out_dir="$OUT/ablations" --config.train.batch_size=16 \
    2>&1 | grep -v "^W\|^I" | tail -30 | tee "$OUT/ablate_train.txt"
  timeout 180 python3 -m scripts.ablate --config=configs/gpt2_124m.py --study=decode --rounds=1 \
    --out_dir="$OUT/ablations" 2>&1 | grep -v "^W\|^I" | tail -20 | tee "$OUT/ablate_decode.txt"
fi
exit 0
