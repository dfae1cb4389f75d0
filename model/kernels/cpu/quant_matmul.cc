// Quantized matmuls for CPU decoding, called from JAX through the XLA FFI (see model/kernels/cpu_native.py).
//
// XLA's CPU backend widens int8 (and unpacked 4-bit) weights into a float copy in a separate pass before every dot,
// so quantized weights read more bytes per token than float ones. These kernels read the weights as stored, widen
// them in registers and accumulate in float32 (or int32 for int8 activations), so a batch-1 decode step reads each
// weight byte once. Work is split over output tiles on XLA's own intra-op thread pool.
//
// qmm_kn:  y[m, n] = sum_g scale[g, n] * sum_{k in group g} x[m, k] * (code[k, n] - zero[g, n])
//          codes [k, n] row-major, `bits` in {2, 3, 4, 8} packed along n, most significant bits first (the layout of
//          infer/compress/storage.pack_codes), or two's-complement int8 when `signed_codes` (then zero is unused).
//          With int8 activations (qmm_kn_i8x: x int8 [m, k] plus x_scale [m]) the products accumulate in int32.
// qmm_nk:  y[m, n] = scale[n] * sum_k x[m, k] * w[n, k] for int8 w stored [n, k] (a tied embedding used as the head);
//          qmm_nk_i8x takes int8 activations with x_scale [m].

#include <algorithm>
#include <atomic>
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <thread>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 64;      // output columns per register tile (kn kernels)
constexpr int64_t kKBlock = 16;    // weight rows per pass over a register tile
constexpr int64_t kMaxWidth = 512; // output columns per work item (kn kernels)
constexpr int64_t kMaxRows = 16;   // token rows per call (kn kernels; model/quant.py NATIVE_MAX_ROWS)
constexpr int64_t kRowTile = 64;   // output rows (weight rows) per work item (nk kernels)

using peakllm::ParallelFor;

// Vectors of 16 lanes; with -march=native GCC lowers them to one AVX-512 register or two AVX2 ones.
typedef float F16 __attribute__((vector_size(64)));
typedef int32_t I16 __attribute__((vector_size(64)));
typedef int8_t S8x16 __attribute__((vector_size(16)));
typedef uint8_t U8x16 __attribute__((vector_size(16)));

template <typename V>
inline V Load(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
inline F16 Splat(float v) { return F16{} + v; }
inline F16 ToFloat(U8x16 b) { return __builtin_convertvector(__builtin_convertvector(b, I16), F16); }
// GCC 12 scalarizes the generic signed byte -> int vector conversion: use the sign-extending instruction.
inline I16 Widen(S8x16 b) {
#if defined(__AVX512F__)
  return (I16)_mm512_cvtepi8_epi32((__m128i)b);
#elif defined(__AVX2__)
  typedef int32_t I8 __attribute__((vector_size(32)));
  const I8 lo = (I8)_mm256_cvtepi8_epi32((__m128i)b), hi = (I8)_mm256_cvtepi8_epi32(_mm_srli_si128((__m128i)b, 8));
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  return __builtin_convertvector((U8x16)b ^ 0x80, I16) - 128;  // portable: through the unsigned conversion
#endif
}
inline F16 ToFloat(S8x16 b) { return __builtin_convertvector(Widen(b), F16); }
typedef float F8 __attribute__((vector_size(32)));
typedef float F4 __attribute__((vector_size(16)));
// Horizontal sum in halves (exact for the int32 sums of qmm_*_i8x below 2^24 per lane pair).
inline float Sum(F16 v) {
  F8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  F4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

// The codes of one row of one 64-column tile as four float vectors, in column order. `p` points at the tile's bytes
// in the serving layout of `repack_for_kernel` (model/kernels/cpu_native.py): 8 bits: 64 bytes in order; 4 bits:
// 32 bytes, byte t holding column t (high nibble) and t + 32 (low); 2 bits: 16 bytes, byte t holding columns t,
// t + 16, t + 32, t + 48 from the high bits down; 3 bits: 24 bytes, the low two bits in the 2-bit layout, then the
// high bits as 4 little-endian uint16 (bit i of the j-th: column 16j + i).
template <int kBits>
inline void DecodeTile(const uint8_t* p, F16 w[4]) {
  if constexpr (kBits == 8) {
    for (int j = 0; j < 4; ++j) w[j] = ToFloat(Load<U8x16>(p + 16 * j));
  } else if constexpr (kBits == 4) {
    const U8x16 b0 = Load<U8x16>(p), b1 = Load<U8x16>(p + 16);
    w[0] = ToFloat(b0 >> 4);
    w[1] = ToFloat(b1 >> 4);
    w[2] = ToFloat(b0 & 15);
    w[3] = ToFloat(b1 & 15);
  } else if constexpr (kBits == 2) {
    const U8x16 b = Load<U8x16>(p);
    w[0] = ToFloat(b >> 6);
    w[1] = ToFloat((b >> 4) & 3);
    w[2] = ToFloat((b >> 2) & 3);
    w[3] = ToFloat(b & 3);
  } else {  // 3 bits: the 2-bit layout of the low bits, then 4 little-endian uint16 of high bits (bit i: column 16j + i)
    const U8x16 b = Load<U8x16>(p);
    uint16_t h[4];
    std::memcpy(h, p + 16, sizeof(h));
    const I16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const U8x16 lo[4] = {b >> 6, (b >> 4) & 3, (b >> 2) & 3, b & 3};
    for (int j = 0; j < 4; ++j) {
      const I16 hi = ((I16{} + static_cast<int32_t>(h[j])) >> lane) & 1;
      w[j] = __builtin_convertvector(__builtin_convertvector(lo[j], I16) | (hi << 2), F16);
    }
  }
}

inline void DecodeInt8(const uint8_t* p, F16 w[4]) {
  for (int j = 0; j < 4; ++j) w[j] = ToFloat(Load<S8x16>(p + 16 * j));
}
inline void DecodeInt8(const uint8_t* p, I16 w[4]) {
  for (int j = 0; j < 4; ++j) w[j] = Widen(Load<S8x16>(p + 16 * j));
}

// Runs `rows(R, r0)` over all rows of x in register blocks of at most 4.
template <typename F>
inline void ForRowBlocks(int64_t m, const F& rows) {
  int64_t r0 = 0;
  for (; r0 + 4 <= m; r0 += 4) rows(std::integral_constant<int, 4>(), r0);
  if (m - r0 == 3) rows(std::integral_constant<int, 3>(), r0);
  if (m - r0 == 2) rows(std::integral_constant<int, 2>(), r0);
  if (m - r0 == 1) rows(std::integral_constant<int, 1>(), r0);
}

// part[r][c] += sum_{kk in [kb, kend)} x[r0 + r, kk] * code[kk, c] for the columns [c0, c0 + width) of one work
// item, 64 columns at a time with the R x 64 sums in registers; `part` holds `width` sums per row from row r0 on.
// kBits 0 means two's-complement int8 weights, 32 float32; V is F16 (float activations) or I16 (int8 activations,
// exact int32 sums).
template <int kBits, int R, typename V, typename X>
void AccumulateBlock(const X* x, int64_t k, const uint8_t* codes, int64_t row_bytes, int64_t c0, int64_t width,
                     int64_t kb, int64_t kend, int64_t r0, V* part) {
  constexpr int64_t kBytesPerTile = kTile * (kBits ? kBits : 8) / 8;
  const int64_t vecs = width / 16;
  for (int64_t s = 0; s < width; s += kTile) {
    V p[R][4];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 4; ++j) p[r][j] = part[r * vecs + s / 16 + j];
    const uint8_t* tile = codes + (c0 + s) / kTile * kBytesPerTile;
    for (int64_t kk = kb; kk < kend; ++kk) {
      V w[4];
      if constexpr (kBits == 0) DecodeInt8(tile + kk * row_bytes, w);
      else DecodeTile<kBits>(tile + kk * row_bytes, w);
      for (int r = 0; r < R; ++r) {
        const V xb = V{} + x[(r0 + r) * k + kk];
        for (int j = 0; j < 4; ++j) p[r][j] += xb * w[j];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 4; ++j) part[r * vecs + s / 16 + j] = p[r][j];
  }
}

// AccumulateBlock over weight rows [k0, k1) for all m rows of x: blocks of kKBlock weight rows, each a run of
// `width` contiguous bytes per row (so the hardware prefetcher streams them), visited once for every row block of x
// while they sit in L1.
template <int kBits, typename V, typename X>
void AccumulateRows(const X* x, int64_t m, int64_t k, const uint8_t* codes, int64_t row_bytes, int64_t c0,
                    int64_t width, int64_t k0, int64_t k1, V* part) {
  for (int64_t kb = k0; kb < k1; kb += kKBlock) {
    const int64_t kend = std::min(kb + kKBlock, k1);
    ForRowBlocks(m, [&](auto rows, int64_t r0) {
      AccumulateBlock<kBits, decltype(rows)::value>(x, k, codes, row_bytes, c0, width, kb, kend, r0,
                                                    part + r0 * (width / 16));
    });
  }
}

// One work item of qmm_kn: all m rows of y for columns [c0, c0 + width). `part` and `acc` are scratch for
// m * width floats each.
template <int kBits>
void KnItem(const float* x, int64_t m, int64_t k, int64_t n, const uint8_t* codes, const float* scale,
            const float* zero, int64_t group, int64_t c0, int64_t width, F16* part, F16* acc, float* y) {
  const int64_t row_bytes = n * (kBits ? kBits : 8) / 8, vecs = width / 16;
  std::fill(acc, acc + m * vecs, F16{});
  for (int64_t g0 = 0; g0 < k; g0 += group) {
    std::fill(part, part + m * vecs, F16{});
    AccumulateRows<kBits>(x, m, k, codes, row_bytes, c0, width, g0, g0 + group, part);
    const float* s = scale + (g0 / group) * n + c0;
    for (int64_t r = 0; r < m; ++r) {
      if (zero == nullptr) {
        for (int64_t v = 0; v < vecs; ++v) acc[r * vecs + v] += Load<F16>(s + 16 * v) * part[r * vecs + v];
        continue;
      }
      float xsum = 0;
      for (int64_t kk = g0; kk < g0 + group; ++kk) xsum += x[r * k + kk];
      const float* z = zero + (g0 / group) * n + c0;
      for (int64_t v = 0; v < vecs; ++v)
        acc[r * vecs + v] += Load<F16>(s + 16 * v) * (part[r * vecs + v] - Load<F16>(z + 16 * v) * xsum);
    }
  }
  for (int64_t r = 0; r < m; ++r) std::memcpy(y + r * n + c0, acc + r * vecs, width * sizeof(float));
}

// One work item of qmm_kn_i8x: int8 activations (per-row scale) against int8 weights, int32 sums.
void KnI8xItem(const int8_t* x, const float* x_scale, int64_t m, int64_t k, int64_t n, const int8_t* w,
               const float* scale, int64_t c0, int64_t width, I16* part, float* y) {
  const int64_t vecs = width / 16;
  std::fill(part, part + m * vecs, I16{});
  AccumulateRows<0>(x, m, k, reinterpret_cast<const uint8_t*>(w), n, c0, width, 0, k, part);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t v = 0; v < vecs; ++v) {
      const F16 out = __builtin_convertvector(part[r * vecs + v], F16) * Load<F16>(scale + c0 + 16 * v) * x_scale[r];
      std::memcpy(y + r * n + c0 + 16 * v, &out, sizeof(F16));
    }
}

// Output columns [j0, j0 + Q) of y = x [m, k] @ w[n, k]^T, int8 rows of w, Q rows of w at once (k a multiple of 16).
template <bool kIntX, int Q>
void NkColumns(const void* xv, const float* x_scale, int64_t m, int64_t k, const int8_t* w, const float* scale,
               int64_t n, int64_t j, float* y) {
  for (int64_t r = 0; r < m; ++r) {
    float dots[Q];
    if constexpr (kIntX) {
      const int8_t* xr = static_cast<const int8_t*>(xv) + r * k;
      I16 acc[Q] = {};
      for (int64_t kk = 0; kk < k; kk += 16) {
        const I16 xb = Widen(Load<S8x16>(xr + kk));
        for (int q = 0; q < Q; ++q) acc[q] += xb * Widen(Load<S8x16>(w + (j + q) * k + kk));
      }
      for (int q = 0; q < Q; ++q) dots[q] = static_cast<float>(Sum(__builtin_convertvector(acc[q], F16))) * x_scale[r];
    } else {
      const float* xr = static_cast<const float*>(xv) + r * k;
      F16 acc[Q] = {};
      for (int64_t kk = 0; kk < k; kk += 16) {
        const F16 xb = Load<F16>(xr + kk);
        for (int q = 0; q < Q; ++q) acc[q] += xb * ToFloat(Load<S8x16>(w + (j + q) * k + kk));
      }
      for (int q = 0; q < Q; ++q) dots[q] = Sum(acc[q]);
    }
    for (int q = 0; q < Q; ++q) y[r * n + j + q] = dots[q] * scale[j + q];
  }
}

template <bool kIntX>
void NkRows(const void* xv, const float* x_scale, int64_t m, int64_t k, const int8_t* w, const float* scale,
            int64_t n, int64_t j0, int64_t count, float* y) {
  int64_t j = j0;
  for (; j + 4 <= j0 + count; j += 4) NkColumns<kIntX, 4>(xv, x_scale, m, k, w, scale, n, j, y);
  for (; j < j0 + count; ++j) NkColumns<kIntX, 1>(xv, x_scale, m, k, w, scale, n, j, y);
}

int64_t Tiles(int64_t n, int64_t tile) { return (n + tile - 1) / tile; }

// Work items of qmm_kn: column ranges of a multiple of 64, at most kMaxWidth and at least 4 per thread when possible.
int64_t ItemWidth(int64_t n, int64_t threads) {
  const int64_t tiles = n / kTile, per_item = std::max<int64_t>(1, tiles / (4 * std::max<int64_t>(threads, 1)));
  return std::min(kMaxWidth, per_item * kTile);
}

ffi::Error QmmKnImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer codes, ffi::Buffer<ffi::F32> scale,
                     ffi::Buffer<ffi::F32> zero, ffi::ResultBuffer<ffi::F32> y, int64_t bits, int64_t group,
                     bool signed_codes) {
  const int64_t m = x.dimensions()[0], k = x.dimensions()[1], n = y->dimensions()[1];
  if (n % kTile != 0) return ffi::Error::InvalidArgument("qmm_kn: the output size must be a multiple of 64");
  if (m > kMaxRows) return ffi::Error::InvalidArgument("qmm_kn: at most 16 rows");
  if (signed_codes ? bits != 8 : (bits != 2 && bits != 3 && bits != 4 && bits != 8))
    return ffi::Error::InvalidArgument("qmm_kn: bits must be 2, 3, 4 or 8 (signed codes: 8)");
  if (signed_codes) group = k;
  if (group <= 0 || k % group != 0) return ffi::Error::InvalidArgument("qmm_kn: group must divide the input size");
  if (static_cast<int64_t>(codes.size_bytes()) != k * n * bits / 8)
    return ffi::Error::InvalidArgument("qmm_kn: codes must hold k * n * bits / 8 bytes");
  if (static_cast<int64_t>(scale.element_count()) != (k / group) * n ||
      (!signed_codes && zero.element_count() != scale.element_count()))
    return ffi::Error::InvalidArgument("qmm_kn: scale and zero must be [k / group, n]");
  const float* xp = x.typed_data();
  const float* sp = scale.typed_data();
  const float* zp = signed_codes ? nullptr : zero.typed_data();
  float* yp = y->typed_data();
  const auto* cp = static_cast<const uint8_t*>(codes.untyped_data());
  const int64_t width = ItemWidth(n, pool.num_threads());
  auto run_item = [&](int64_t item) {
    const int64_t c0 = item * width, w = std::min(width, n - c0);
    alignas(64) F16 part[kMaxRows * kMaxWidth / 16], acc[kMaxRows * kMaxWidth / 16];
    switch (signed_codes ? 0 : bits) {
      case 0: return KnItem<0>(xp, m, k, n, cp, sp, nullptr, k, c0, w, part, acc, yp);
      case 8: return KnItem<8>(xp, m, k, n, cp, sp, zp, group, c0, w, part, acc, yp);
      case 4: return KnItem<4>(xp, m, k, n, cp, sp, zp, group, c0, w, part, acc, yp);
      case 3: return KnItem<3>(xp, m, k, n, cp, sp, zp, group, c0, w, part, acc, yp);
      default: return KnItem<2>(xp, m, k, n, cp, sp, zp, group, c0, w, part, acc, yp);
    }
  };
  ParallelFor(pool, Tiles(n, width), run_item);
  return ffi::Error::Success();
}

ffi::Error QmmKnI8xImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::F32> x_scale,
                        ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  const int64_t m = x.dimensions()[0], k = x.dimensions()[1], n = y->dimensions()[1];
  if (n % kTile != 0) return ffi::Error::InvalidArgument("qmm_kn_i8x: the output size must be a multiple of 64");
  if (m > kMaxRows) return ffi::Error::InvalidArgument("qmm_kn_i8x: at most 16 rows");
  if (static_cast<int64_t>(w.element_count()) != k * n || static_cast<int64_t>(scale.element_count()) != n)
    return ffi::Error::InvalidArgument("qmm_kn_i8x: w must be [k, n] and scale [n]");
  const int64_t width = ItemWidth(n, pool.num_threads());
  auto run_item = [&](int64_t item) {
    const int64_t c0 = item * width;
    alignas(64) I16 part[kMaxRows * kMaxWidth / 16];
    KnI8xItem(x.typed_data(), x_scale.typed_data(), m, k, n, w.typed_data(), scale.typed_data(), c0,
              std::min(width, n - c0), part, y->typed_data());
  };
  ParallelFor(pool, Tiles(n, width), run_item);
  return ffi::Error::Success();
}

template <bool kIntX>
ffi::Error Nk(ffi::ThreadPool& pool, const void* x, const float* x_scale, int64_t m, int64_t k, ffi::Buffer<ffi::S8>& w,
              ffi::Buffer<ffi::F32>& scale, ffi::ResultBuffer<ffi::F32>& y) {
  const int64_t n = y->dimensions()[1];
  if (k % 16 != 0) return ffi::Error::InvalidArgument("qmm_nk: the input size must be a multiple of 16");
  if (static_cast<int64_t>(w.element_count()) != k * n || static_cast<int64_t>(scale.element_count()) != n)
    return ffi::Error::InvalidArgument("qmm_nk: w must be [n, k] and scale [n]");
  auto run_tile = [&](int64_t i) {
    const int64_t j0 = i * kRowTile;
    NkRows<kIntX>(x, x_scale, m, k, w.typed_data(), scale.typed_data(), n, j0, std::min(kRowTile, n - j0),
                  y->typed_data());
  };
  ParallelFor(pool, Tiles(n, kRowTile), run_tile);
  return ffi::Error::Success();
}

ffi::Error QmmNkImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                     ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  return Nk<false>(pool, x.typed_data(), nullptr, x.dimensions()[0], x.dimensions()[1], w, scale, y);
}

ffi::Error QmmNkI8xImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::F32> x_scale,
                        ffi::Buffer<ffi::S8> w, ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  return Nk<true>(pool, x.typed_data(), x_scale.typed_data(), x.dimensions()[0], x.dimensions()[1], w, scale, y);
}

// (pool, x_q int8 [m, k], x_scale [m], w int8, scale) -> y [m, n]: the signature of both int8-activation kernels.
auto Int8ActivationBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::S8>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S8>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PeakllmQmmKn, QmmKnImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group")
                                  .Attr<bool>("signed_codes"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PeakllmQmmKnI8x, QmmKnI8xImpl, Int8ActivationBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PeakllmQmmNk, QmmNkImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PeakllmQmmNkI8x, QmmNkI8xImpl, Int8ActivationBinding());
