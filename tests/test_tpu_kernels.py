"""The TPU (Mosaic) variants of our Pallas kernels: each matches its plain-jnp reference under Pallas's TPU interpreter
on this CPU, and the public entry point, lowered for a TPU chip described by libtpu (no TPU needed), compiles to a
Mosaic custom call."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from model.kernels import decode_attention as dec
from model.kernels import int8_matmul as q8
from model.kernels import paged_attention as pa
from model.kernels import ternary_matvec as tm

TPU_REASON = "libtpu is not installed (pip install -e '.[tpu]'), so nothing can be compiled for a TPU here"
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def _normal(seed, shape, dtype):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _tpu_compiled_text(fn, *args, topology="v5e:2x2"):
  """fn lowered and compiled for one chip of `topology`; returns the lowered text (the compile must succeed)."""
  from scripts import plan

  device = plan.topology_devices(topology)[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  abstract = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args]
  lowered = jax.jit(fn).lower(*abstract)
  lowered.compile()
  return lowered.as_text()


@pytest.mark.parametrize("b,s,h,kv,d,dtype", [
    (3, 256, 8, 2, 64, jnp.float32),   # GQA, two 128-slot blocks
    (3, 200, 4, 4, 24, jnp.float32),   # MHA, head_dim 24 (lane slices off the 128 grid), 200 slots padded to 208
    (3, 512, 12, 12, 64, jnp.bfloat16),  # GPT-2's heads, bf16
])
def test_tpu_decode_attention_matches_the_reference_in_tpu_interpret_mode(b, s, h, kv, d, dtype):
  q, k, v = _normal(0, (b, h, d), dtype), _normal(1, (b, s, kv, d), dtype), _normal(2, (b, s, kv, d), dtype)
  # a left-padded row, a row ending inside a block, a row whose range skips whole blocks, and (below) an empty row
  starts = jnp.array([0, 5, s - 70], jnp.int32)
  ends = jnp.array([1, s // 2 + 3, s], jnp.int32)
  with pltpu.force_tpu_interpret_mode():
    got = dec._tpu_decode_attention(q, k, v, starts, ends, sm_scale=d**-0.5)
    empty = dec._tpu_decode_attention(q, k, v, starts, starts, sm_scale=d**-0.5)
  want = dec.reference_decode_attention(q, k, v, starts, ends)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=TOL[dtype], rtol=0)
  assert float(jnp.abs(empty.astype(jnp.float32)).max()) == 0.0


@pytest.mark.parametrize("page_size,kv,d,dtype", [(16, 2, 64, jnp.float32), (32, 4, 32, jnp.bfloat16)])
def test_tpu_paged_decode_attention_matches_the_reference_in_tpu_interpret_mode(page_size, kv, d, dtype):
  b, h, max_pages, num_pages = 4, 8, 5, 24
  rng = np.random.default_rng(0)
  q = _normal(3, (b, h, d), dtype)
  k_pages, v_pages = _normal(4, (num_pages, page_size, kv, d), dtype), _normal(5, (num_pages, page_size, kv, d), dtype)
  table = rng.permutation(np.arange(1, num_pages))[:b * max_pages].reshape(b, max_pages).astype(np.int32)
  table[3, 1:] = 10_000  # entries past a sequence's pages may hold anything: never read
  lengths = jnp.array([1, 2 * page_size + 5, max_pages * page_size, 0], jnp.int32)
  with pltpu.force_tpu_interpret_mode():
    got = pa._tpu_paged_decode_attention(q, k_pages, v_pages, jnp.asarray(table), lengths, sm_scale=d**-0.5)
    poisoned = k_pages.at[table[1, 3:]].set(jnp.nan)  # pages past row 1's length: must not be read
    again = pa._tpu_paged_decode_attention(q, poisoned, v_pages, jnp.asarray(table), lengths, sm_scale=d**-0.5)
  safe_table = jnp.asarray(np.minimum(table, num_pages - 1))
  want = pa.reference_paged_decode_attention(q, k_pages, v_pages, safe_table, lengths)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=TOL[dtype], rtol=0)
  np.testing.assert_array_equal(np.asarray(again), np.asarray(got))
  assert float(jnp.abs(got[3].astype(jnp.float32)).max()) == 0.0  # the empty row


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason=TPU_REASON)
@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
def test_the_decode_kernels_compile_to_mosaic_for_a_tpu_chip(topology):
  """Through the public entry points: lowered for a TPU, `jax.lax.platform_dependent` picks the Mosaic variant."""
  b, s, h, kv, d = 4, 384, 16, 4, 64
  q, k = jnp.zeros((b, h, d), jnp.bfloat16), jnp.zeros((b, s, kv, d), jnp.bfloat16)
  bounds = jnp.zeros((b,), jnp.int32)
  text = _tpu_compiled_text(dec.decode_attention, q, k, k, bounds, bounds, topology=topology)
  assert "tpu_custom_call" in text and "decode_attention_tpu" in text
  pages, table = jnp.zeros((64, 16, kv, d), jnp.bfloat16), jnp.zeros((b, 8), jnp.int32)
  text = _tpu_compiled_text(pa.paged_decode_attention, q, pages, pages, table, bounds, topology=topology)
  assert "tpu_custom_call" in text and "decode_attention_tpu" in text


@pytest.mark.parametrize("m,k,n,group,dtype,transposed", [
    (3, 300, 200, 0, jnp.float32, False),    # decode-sized rows; K and N off the block grid (padded)
    (3, 300, 200, 0, jnp.float32, True),     # the weight as [N, K] (a tied head), contracted in place
    (40, 1024, 384, 64, jnp.float32, False),  # two K blocks of 512, eight groups per block
    (40, 1024, 384, 64, jnp.float32, True),
    (16, 256, 256, 128, jnp.bfloat16, False),
])
def test_tpu_w8a16_matches_the_reference_in_tpu_interpret_mode(m, k, n, group, dtype, transposed):
  x = _normal(6, (m, k), dtype)
  w_q, w_scale = q8.quantize_per_channel(_normal(7, (k, n), jnp.float32), group=group)
  with pltpu.force_tpu_interpret_mode():
    got = q8._tpu_w8a16(x, w_q.T if transposed else w_q, w_scale, group=group, transposed=transposed)
  want = q8.w8a16_reference(x, w_q, w_scale, group=group)
  assert got.dtype == dtype and got.shape == (m, n)
  atol, rtol = (1e-4, 0) if dtype == jnp.float32 else (0.25, 2e-2)  # bf16 outputs of O(10): a few ulps
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=atol, rtol=rtol)


@pytest.mark.parametrize("m,k,n,transposed", [(5, 300, 130, False), (5, 300, 130, True), (64, 1024, 512, False)])
def test_tpu_w8a8_is_exact_in_tpu_interpret_mode(m, k, n, transposed):
  x_q, x_scale = q8.quantize_per_token(_normal(8, (m, k), jnp.float32))
  w_q, w_scale = q8.quantize_per_channel(_normal(9, (k, n), jnp.float32))
  with pltpu.force_tpu_interpret_mode():
    got = q8._tpu_w8a8(x_q, x_scale, w_q.T if transposed else w_q, w_scale, transposed=transposed)
  np.testing.assert_allclose(np.asarray(got), np.asarray(q8.w8a8_reference(x_q, x_scale, w_q, w_scale)), rtol=1e-6,
                             atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason=TPU_REASON)
@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
def test_the_int8_kernels_compile_to_mosaic_for_a_tpu_chip(topology):
  m, k, n = 8, 2048, 5632  # a llama_1b MLP projection at decode batch 8
  x, w_q = jnp.zeros((m, k), jnp.bfloat16), jnp.zeros((k, n), jnp.int8)
  text = _tpu_compiled_text(lambda x, w, s: q8.w8a16_matmul(x, w, s), x, w_q, jnp.zeros((n,), jnp.float32),
                            topology=topology)
  assert "w8a16_matmul_tpu" in text
  text = _tpu_compiled_text(lambda x, w, s: q8.w8a16_matmul(x, w, s, group=128), x, w_q,
                            jnp.zeros((k // 128, n), jnp.float32), topology=topology)
  assert "w8a16_matmul_tpu" in text
  text = _tpu_compiled_text(q8.w8a8_matmul, jnp.zeros((m, k), jnp.int8), jnp.zeros((m,), jnp.float32), w_q,
                            jnp.zeros((n,), jnp.float32), topology=topology)
  assert "w8a8_matmul_tpu" in text
  # a tied int8 embedding [vocab, K] as the head: contracted in place, no transposed copy of it in the program
  vocab = 128256
  text = _tpu_compiled_text(lambda x, w, s: q8.w8a16_matmul(x, w, s, transposed=True), x,
                            jnp.zeros((vocab, k), jnp.int8), jnp.zeros((vocab,), jnp.float32), topology=topology)
  assert "w8a16_matmul_tpu" in text and "stablehlo.transpose" not in text


def _coded(seed, n, k, code_bits=9, max_len=12):
  """A random ternary W (as symbols [N, K]) coded into a Tunstall stream, with its lo/hi."""
  from infer.compress import ternary_code as tc

  rng = np.random.default_rng(seed)
  sym = rng.choice(3, size=(n, k), p=[0.8, 0.1, 0.1])
  d = tc.build_dictionary(sym, code_bits=code_bits, max_len=max_len)
  enc = tc.encode(sym, d)
  lo, hi = -np.abs(rng.normal(size=n)).astype(np.float32), np.abs(rng.normal(size=n)).astype(np.float32)
  stream = (jnp.asarray(enc.codes.astype(np.int32)), jnp.asarray(enc.offsets), jnp.asarray(d.entries),
            jnp.asarray(d.lengths), jnp.asarray(lo), jnp.asarray(hi))
  return sym, stream


@pytest.mark.parametrize("m,chunk", [(1, 8192), (3, 128)])  # 128: the walk refills SMEM many times, mid-row too
def test_tpu_ternary_matvec_matches_decode_then_matmul_in_tpu_interpret_mode(m, chunk, monkeypatch):
  monkeypatch.setattr(tm, "TPU_CHUNK", chunk)
  n, k = 150, 80  # two experts of 150 rows (not a multiple of the 128-row program) stacked in one stream
  sym, (codes, offsets, entries, lengths, lo, hi) = _coded(m, 2 * n, k)
  x = _normal(10 + m, (m, k), jnp.float32)
  with pltpu.force_tpu_interpret_mode():
    got = tm._tpu_ternary_matvec(x, codes, offsets, entries, lengths, lo, hi, jnp.int32(n), rows=n)
  want = tm.ternary_matvec_reference(x, sym[n:], lo[n:], hi[n:])
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason=TPU_REASON)
def test_the_ternary_kernel_compiles_to_mosaic_for_a_tpu_chip():
  """A Mixtral-like expert projection (4,096 -> 14,336 rows, 4 experts in one stream) at a 12-bit dictionary: the
  stream (1.5M codewords, 6 MB) is far beyond SMEM's 1 MiB, so this also checks that it is streamed, not resident."""
  k, n, experts, num_codes, dict_size, run = 4096, 14336, 4, 1_500_000, 4096, 24
  x = jnp.zeros((2, k), jnp.bfloat16)
  codes, offsets = jnp.zeros((num_codes,), jnp.int32), jnp.zeros((experts * n + 1,), jnp.int32)
  entries, lengths = jnp.zeros((dict_size, run), jnp.int32), jnp.zeros((dict_size,), jnp.int32)
  lo = jnp.zeros((experts * n,), jnp.float32)
  text = _tpu_compiled_text(lambda x, c, o, e, ln, lo, hi, r: tm.ternary_matvec(x, c, o, e, ln, lo, hi, row_start=r,
                                                                                 rows=n),
                            x, codes, offsets, entries, lengths, lo, lo, jnp.int32(0))
  assert "ternary_matvec_tpu" in text
