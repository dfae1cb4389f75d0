"""Native CPU kernels, built once per machine and called through the XLA FFI: quantized decoding matmuls
(`cpu/quant_matmul.cc`) and attention's batched float32 matmuls (`cpu/batched_matmul.cc`).

Why native code: XLA's CPU backend widens int8 or 4-bit weights into a float copy in a separate pass before every dot
(docs/performance.md), and Pallas kernels only interpret on CPU. These kernels read the weights as stored, widen them
in registers and split the output columns over XLA's intra-op thread pool, so a batch-1 decode step reads each weight
byte once. They need a C++17 compiler (`$CXX`, default `g++`); the library is compiled with `-march=native` into
`$PEAKLLM_CACHE` (default ~/.cache/peakllm)/native, keyed by the source, the compiler, the CPU's flags and jaxlib.
Without a compiler, `available()` is False and `model.matmul_impl=auto` runs the XLA path; `PEAKLLM_NATIVE=0` turns
the kernels off.

Layouts (per weight, x [m, k] -> y [m, n], n a multiple of 64):
  * int8 [k, n] with scale [n] (W8A16: float x; W8A8: x quantized per token in the kernel, int32 sums): `matmul_kn*`.
  * int8 [n, k] rows (a tied embedding used as the head): `matmul_nk*`.
  * packed unsigned b-bit codes (b in 2, 3, 4, 8) [k, n] in the serving layout of `to_kernel_layout`, with scale and
    zero point [k / group, n]: `matmul_packed`. The weight is scale * (code - zero), as `infer.compress` stores it.
Batched float32 products [batch, m, k] x [batch, k, n] (either operand transposed), the batch split over the pool:
`batched_matmul`. XLA runs such a dot on one thread (docs/performance.md).
Paged decode attention over a float32 page pool, reading each row's live pages in place (`cpu/paged_attention.cc`):
`paged_decode_attention`; the `xla` path gathers the whole page-table width into a dense copy first.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

SOURCE_DIR = pathlib.Path(__file__).with_name("cpu")
SOURCES = (SOURCE_DIR / "quant_matmul.cc", SOURCE_DIR / "batched_matmul.cc", SOURCE_DIR / "paged_attention.cc")
HEADERS = (SOURCE_DIR / "parallel.h",)
TILE = 64  # output columns per register tile: n must be a multiple
MAX_ROWS = 16  # token rows per call of the [k, n] kernels (model/quant.py runs up to 4 calls; longer prefills on XLA)
PACKED_BITS = (2, 3, 4, 8)
_TARGETS = {"PeakllmQmmKn": "qmm_kn", "PeakllmQmmKnW8a8": "qmm_kn_w8a8", "PeakllmQmmNk": "qmm_nk",
            "PeakllmQmmNkW8a8": "qmm_nk_w8a8", "PeakllmBmm": "bmm", "PeakllmPagedDecode": "paged_decode"}
BMM_COLUMNS = 32  # batched_matmul: n must be a multiple


class NativeUnavailable(RuntimeError):
  """The kernels cannot be built or loaded here (the message says why)."""


def _cpu_flags() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      return next((line for line in f if line.startswith("flags")), "")
  except OSError:
    return ""


def _library_path(compiler: str, version: str) -> pathlib.Path:
  import jaxlib  # the FFI headers and ABI come with jaxlib
  texts = [p.read_text() for p in SOURCES + HEADERS]
  key = hashlib.sha256("\n".join([*texts, compiler, version, _cpu_flags(), jaxlib.__version__]).encode())
  cache = pathlib.Path(os.environ.get("PEAKLLM_CACHE", pathlib.Path.home() / ".cache" / "peakllm")) / "native"
  return cache / f"quant_matmul-{key.hexdigest()[:16]}.so"


@functools.cache
def _library() -> ctypes.CDLL:
  if os.environ.get("PEAKLLM_NATIVE", "1") == "0":
    raise NativeUnavailable("PEAKLLM_NATIVE=0")
  compiler = os.environ.get("CXX", "g++")
  try:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError) as e:
    raise NativeUnavailable(f"no C++ compiler ({compiler}: {e}); install g++ or set $CXX") from e
  path = _library_path(compiler, version)
  if not path.exists():
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
      out = pathlib.Path(tmp) / path.name
      cmd = [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}",
             *map(str, SOURCES), "-o", str(out)]
      done = subprocess.run(cmd, capture_output=True, text=True)
      if done.returncode != 0:
        raise NativeUnavailable(f"compiling {', '.join(p.name for p in SOURCES)} failed:\n{done.stderr[-2000:]}")
      os.replace(out, path)  # atomic: concurrent builders race harmlessly
  lib = ctypes.cdll.LoadLibrary(str(path))
  for symbol in _TARGETS:
    jax.ffi.register_ffi_target(symbol, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  return lib


def unavailable_reason() -> str | None:
  """None when the kernels are built and registered, else why not."""
  try:
    _library()
    return None
  except NativeUnavailable as e:
    return str(e)


def available() -> bool:
  """True when the default backend is the CPU and the kernels are built and registered."""
  return jax.default_backend() == "cpu" and unavailable_reason() is None


def require() -> None:
  """Raises NativeUnavailable (with the reason) unless `available()`."""
  if jax.default_backend() != "cpu":
    raise NativeUnavailable(f"model.matmul_impl=native runs on CPU only; the default backend is {jax.default_backend()}")
  reason = unavailable_reason()
  if reason:
    raise NativeUnavailable(f"model.matmul_impl=native: {reason}")


def supports_kn(n: int) -> bool:
  return n % TILE == 0


def supports_nk(k: int) -> bool:
  return k % 16 == 0


def _call(target: str, m: int, n: int, *args, **attrs):
  if "Kn" in target and m > MAX_ROWS:
    raise ValueError(f"{target}: {m} rows; the native [k, n] kernels take at most {MAX_ROWS} (decode batches)")
  _library()
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((m, n), jnp.float32))(*args, **attrs)


def matmul_kn(x: jax.Array, w: jax.Array, scale: jax.Array) -> jax.Array:
  """x [m, k] float32 @ (w [k, n] int8 * scale [n]) -> [m, n] float32."""
  k, n = w.shape
  s = scale.reshape(1, n).astype(jnp.float32)
  return _call("PeakllmQmmKn", x.shape[0], n, x.astype(jnp.float32), w, s, s, bits=np.int64(8), group=np.int64(k),
               signed_codes=True)


def matmul_kn_w8a8(x: jax.Array, w: jax.Array, scale: jax.Array) -> jax.Array:
  """W8A8: x [m, k] float32, quantized per token inside the kernel exactly as `int8_matmul.quantize_per_token`,
  @ (w [k, n] int8 * scale [n]) -> [m, n] float32, int32 sums (AVX512-VNNI where present)."""
  return _call("PeakllmQmmKnW8a8", x.shape[0], w.shape[1], x.astype(jnp.float32), w, scale.astype(jnp.float32))


def matmul_nk(x: jax.Array, w: jax.Array, scale: jax.Array) -> jax.Array:
  """x [m, k] float32 @ (w [n, k] int8 * scale [n, None]).T -> [m, n] float32."""
  return _call("PeakllmQmmNk", x.shape[0], w.shape[0], x.astype(jnp.float32), w, scale.astype(jnp.float32))


def matmul_nk_w8a8(x: jax.Array, w: jax.Array, scale: jax.Array) -> jax.Array:
  """W8A8 with x quantized per token inside the kernel: x [m, k] float32 @ (w [n, k] int8 * scale [n, None]).T
  -> [m, n] float32, int32 sums."""
  return _call("PeakllmQmmNkW8a8", x.shape[0], w.shape[0], x.astype(jnp.float32), w, scale.astype(jnp.float32))


def matmul_packed(x: jax.Array, codes: jax.Array, scale: jax.Array, zero: jax.Array, bits: int) -> jax.Array:
  """x [m, k] float32 @ W -> [m, n] float32, W[kk, c] = scale[g, c] * (code[kk, c] - zero[g, c]) with g = kk // group;
  codes: uint8 [k * n * bits / 8] in the layout of `to_kernel_layout`, scale and zero float32 [k / group, n]."""
  groups, n = scale.shape
  k = x.shape[1]
  return _call("PeakllmQmmKn", x.shape[0], n, x.astype(jnp.float32), codes, scale.astype(jnp.float32),
               zero.astype(jnp.float32), bits=np.int64(bits), group=np.int64(k // groups), signed_codes=False)


def supports_batched(n: int) -> bool:
  return n % BMM_COLUMNS == 0


def batched_matmul(a: jax.Array, b: jax.Array, transpose_a: bool = False, transpose_b: bool = False) -> jax.Array:
  """float32 [batch, m, k] (or [batch, k, m] with transpose_a) @ [batch, k, n] (or [batch, n, k] with transpose_b)
  -> [batch, m, n] float32, each batch entry on one thread of XLA's pool; n a multiple of BMM_COLUMNS."""
  batch = a.shape[0]
  m = a.shape[2] if transpose_a else a.shape[1]
  n = b.shape[1] if transpose_b else b.shape[2]
  if not supports_batched(n):
    raise ValueError(f"batched_matmul: n={n} must be a multiple of {BMM_COLUMNS}")
  _library()
  return jax.ffi.ffi_call("PeakllmBmm", jax.ShapeDtypeStruct((batch, m, n), jnp.float32))(
      a.astype(jnp.float32), b.astype(jnp.float32), transpose_a=transpose_a, transpose_b=transpose_b)


def paged_decode_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array,
                           lengths: jax.Array, sm_scale: float) -> jax.Array:
  """One query token per row against its pages: q [B, H, D], k/v pages [N, P, K, D] float32 (K | H), page_table
  [B, M] int32, lengths [B] int32 (live slots per row; 0 gives zeros) -> [B, H, D] float32."""
  _library()
  return jax.ffi.ffi_call("PeakllmPagedDecode", jax.ShapeDtypeStruct(q.shape, jnp.float32))(
      q.astype(jnp.float32), k_pages, v_pages, page_table.astype(jnp.int32), lengths.astype(jnp.int32),
      scale=np.float32(sm_scale))


# -- the serving layout of packed codes -------------------------------------------------------------------------------


def to_kernel_layout(codes: np.ndarray, bits: int) -> np.ndarray:
  """Unsigned codes [..., k, n] (n a multiple of 64) -> uint8 [..., k * n * bits / 8]: row-major, and within each
  64-column tile of a row, 8 bits: the codes in order; 4 bits: byte t holds column t (high nibble) and t + 32;
  2 bits: byte t holds columns t, t + 16, t + 32, t + 48 from the high bits down; 3 bits: the low two bits in the
  2-bit layout (16 bytes), then the high bits as 4 little-endian uint16 (bit i of the j-th is column 16j + i)."""
  if bits not in PACKED_BITS:
    raise ValueError(f"bits={bits}: the packed kernels take {PACKED_BITS}")
  c = np.asarray(codes, np.uint8)
  lead, (k, n) = c.shape[:-2], c.shape[-2:]
  if n % TILE:
    raise ValueError(f"the packed layout needs the output size ({n}) to be a multiple of {TILE}")
  t = c.reshape(*lead, k, n // TILE, TILE)
  two_bit = lambda a: (a[..., :16] << 6) | (a[..., 16:32] << 4) | (a[..., 32:48] << 2) | a[..., 48:]  # noqa: E731
  if bits == 8:
    out = t
  elif bits == 4:
    out = (t[..., :32] << 4) | t[..., 32:]
  elif bits == 2:
    out = two_bit(t)
  else:
    high = (t >> 2).reshape(*t.shape[:-1], 4, 16).astype(np.uint16) << np.arange(16, dtype=np.uint16)
    words = high.sum(axis=-1, dtype=np.uint16).astype("<u2")  # [..., 4]
    out = np.concatenate([two_bit(t & 3), words.view(np.uint8).reshape(*t.shape[:-1], 8)], axis=-1)
  return np.ascontiguousarray(out).reshape(*lead, k * n * bits // 8)


def from_kernel_layout(packed: jax.Array, bits: int, k: int, n: int) -> jax.Array:
  """Inverse of `to_kernel_layout` for one weight, in jnp (the XLA path): uint8 [k * n * bits / 8] -> int32 [k, n]."""
  b = packed.astype(jnp.int32)
  if bits == 8:
    return b.reshape(k, n)
  if bits == 4:
    t = b.reshape(k, n // TILE, TILE // 2)
    return jnp.concatenate([t >> 4, t & 15], axis=-1).reshape(k, n)
  two_bit = lambda t: jnp.concatenate([(t >> s) & 3 for s in (6, 4, 2, 0)], axis=-1)  # noqa: E731
  if bits == 2:
    return two_bit(b.reshape(k, n // TILE, TILE // 4)).reshape(k, n)
  t = b.reshape(k, n // TILE, 24)
  words = t[..., 16:24:2] | (t[..., 17:24:2] << 8)  # [k, tiles, 4]
  high = (words[..., None] >> jnp.arange(16)) & 1  # [k, tiles, 4, 16]
  return (two_bit(t[..., :16]) | (high.reshape(k, n // TILE, TILE) << 2)).reshape(k, n)
