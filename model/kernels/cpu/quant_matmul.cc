// Quantized matmuls for CPU decoding, called from JAX through the XLA FFI (see model/kernels/cpu_native.py).
//
// XLA's CPU backend widens int8 (and unpacked 4-bit) weights into a float copy in a separate pass before every dot,
// so quantized weights read more bytes per token than float ones. These kernels read the weights as stored, widen
// them in registers and accumulate in float32 (or int32 for int8 activations), so a batch-1 decode step reads each
// weight byte once. Work is split on XLA's own intra-op thread pool: [k, n] weights by chunks of rows (one contiguous
// region each), [n, k] weights by tiles of rows.
//
// qmm_kn:  y[m, n] = sum_g scale[g, n] * sum_{k in group g} x[m, k] * (code[k, n] - zero[g, n])
//          codes [k, n] row-major, `bits` in {2, 3, 4, 8} packed along n, most significant bits first (the layout of
//          infer/compress/storage.pack_codes), or two's-complement int8 when `signed_codes` (then zero is unused).
//          qmm_kn_w8a8 (int8 weights) quantizes x per token to int8 first and sums int8 products in int32
//          (AVX512-VNNI where the CPU has it).
// qmm_nk:  y[m, n] = scale[n] * sum_k x[m, k] * w[n, k] for int8 w stored [n, k] (a tied embedding used as the head);
//          qmm_nk_w8a8 likewise with int8 activations.

#include <algorithm>
#include <cmath>
#include <atomic>
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#include <thread>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 64;      // output columns per register tile (kn kernels)
constexpr int64_t kKBlock = 16;    // weight rows per pass over a register tile
constexpr int64_t kPrefetchRows = 32;
constexpr int64_t kMaxRows = 16;   // token rows per call (kn kernels; cpu_native.MAX_ROWS)
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
// Horizontal sum in halves (exact for the int32 sums of qmm_*_w8a8 below 2^24 per lane pair).
inline float Sum(F16 v) {
  F8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  F4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

// Software prefetch of `rows` runs of `bytes` bytes, `stride` apart. The kernels read the next block of weight rows
// while they compute on this one: the [k, n] kernels read 16 or more short runs at once, more streams than the
// hardware prefetcher follows, and without this a decode step read weights from memory at a third of the rate a
// plain streaming loop gets (docs/performance.md).
inline void Prefetch(const void* base, int64_t stride, int64_t rows, int64_t bytes) {
  const char* p = static_cast<const char*>(base);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(p + r * stride + b, _MM_HINT_T0);
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
      _mm_prefetch(reinterpret_cast<const char*>(tile + (kk + kPrefetchRows) * row_bytes), _MM_HINT_T0);
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

// AccumulateBlock over weight rows [k0, k1) and all n columns for all m rows of x, in blocks of kKBlock rows: each
// block is one contiguous run of kKBlock * row_bytes bytes, and the next block is prefetched while this one is
// computed (the register tiles read 16 short runs at once, more streams than the hardware prefetcher follows).
template <int kBits, typename V, typename X>
void AccumulateRows(const X* x, int64_t m, int64_t k, const uint8_t* codes, int64_t row_bytes, int64_t n,
                    int64_t k0, int64_t k1, V* part) {
  for (int64_t kb = k0; kb < k1; kb += kKBlock) {
    const int64_t kend = std::min(kb + kKBlock, k1);
    //PF1
    ForRowBlocks(m, [&](auto rows, int64_t r0) {
      AccumulateBlock<kBits, decltype(rows)::value>(x, k, codes, row_bytes, 0, n, kb, kend, r0, part + r0 * (n / 16));
    });
  }
}

// Work items of the [k, n] kernels are chunks of weight rows (one scale group each when grouped), so each reads one
// contiguous region of the weights; every thread adds its items into its own [m, n] accumulator (a slot), and the
// slots are summed at the end.
constexpr int64_t kChunkRows = 64;

// One chunk [k0, k1) of qmm_kn into `acc` (m * n / 16 vectors; `part` is scratch of the same size). Per-channel
// scales (one group): raw sums, scaled once at the end. Grouped: this chunk is one group, scaled here.
template <int kBits>
void KnChunk(const float* x, int64_t m, int64_t k, int64_t n, const uint8_t* codes, const float* scale,
             const float* zero, int64_t group, int64_t k0, int64_t k1, F16* part, F16* acc) {
  const int64_t row_bytes = n * (kBits ? kBits : 8) / 8, vecs = n / 16;
  if (group == k) return AccumulateRows<kBits>(x, m, k, codes, row_bytes, n, k0, k1, acc);
  std::fill(part, part + m * vecs, F16{});
  AccumulateRows<kBits>(x, m, k, codes, row_bytes, n, k0, k1, part);
  const float* s = scale + (k0 / group) * n;
  const float* z = zero + (k0 / group) * n;
  for (int64_t r = 0; r < m; ++r) {
    float xsum = 0;
    for (int64_t kk = k0; kk < k1; ++kk) xsum += x[r * k + kk];
    for (int64_t v = 0; v < vecs; ++v)
      acc[r * vecs + v] += Load<F16>(s + 16 * v) * (part[r * vecs + v] - Load<F16>(z + 16 * v) * xsum);
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// int8 x int8 with AVX512-VNNI: vpdpbusd multiplies 4 unsigned bytes by 4 signed bytes and adds their sum to an int32
// lane (64 products per instruction, against 16 per widen + multiply + add without it). The weights take the unsigned
// slot as w + 128 (a sign-bit flip) and the activations the signed one; since sum_k (w + 128) x = sum_k w x +
// 128 sum_k x, each token row's sum of x is subtracted at the end (int32 throughout: |sum| < 2^31 for k < 66,000).
constexpr bool kVnni = true;

// Four weight rows [kk, kk + 4) of one 64-column tile, sign-flipped and interleaved for vpdpbusd: u[j] holds, in its
// int32 lane 4l + i, the 4 bytes of column 16l + 4j + i (so `VnniColumn` undoes the permutation).
inline void VnniTile(const int8_t* row, int64_t n, __m512i u[4]) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i a[4];
  for (int i = 0; i < 4; ++i) a[i] = _mm512_xor_si512(_mm512_loadu_si512(row + i * n), flip);
  const __m512i t0 = _mm512_unpacklo_epi8(a[0], a[1]), t1 = _mm512_unpackhi_epi8(a[0], a[1]);
  const __m512i t2 = _mm512_unpacklo_epi8(a[2], a[3]), t3 = _mm512_unpackhi_epi8(a[2], a[3]);
  u[0] = _mm512_unpacklo_epi16(t0, t2);
  u[1] = _mm512_unpackhi_epi16(t0, t2);
  u[2] = _mm512_unpacklo_epi16(t1, t3);
  u[3] = _mm512_unpackhi_epi16(t1, t3);
}
// Where column c of a 64-column tile sits in the four accumulators of `VnniTile`: (vector, lane).
inline int64_t VnniColumn(int64_t c) { return (c % 16 / 4) * 16 + (c / 16) * 4 + c % 4; }

// part[r] (permuted as VnniTile) += sum over weight rows [kb, kend) (a multiple of 4) for R token rows from r0.
template <int R>
void VnniBlock(const int8_t* x, int64_t k, const int8_t* w, int64_t n, int64_t c0, int64_t width, int64_t kb,
               int64_t kend, int64_t r0, I16* part) {
  const int64_t vecs = width / 16;
  for (int64_t s = 0; s < width; s += kTile) {
    __m512i p[R][4];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 4; ++j) p[r][j] = (__m512i)part[r * vecs + s / 16 + j];
    for (int64_t kk = kb; kk < kend; kk += 4) {
      for (int i = 0; i < 4; ++i) _mm_prefetch(reinterpret_cast<const char*>(w + (kk + i + kPrefetchRows) * n + c0 + s), _MM_HINT_T0);
      __m512i u[4];
      VnniTile(w + kk * n + c0 + s, n, u);
      for (int r = 0; r < R; ++r) {
        int32_t quad;
        std::memcpy(&quad, x + (r0 + r) * k + kk, sizeof(quad));
        const __m512i xb = _mm512_set1_epi32(quad);
        for (int j = 0; j < 4; ++j) p[r][j] = _mm512_dpbusd_epi32(p[r][j], u[j], xb);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 4; ++j) part[r * vecs + s / 16 + j] = (I16)p[r][j];
  }
}

void VnniRows(const int8_t* x, int64_t m, int64_t k, const int8_t* w, int64_t n, int64_t k0, int64_t k1, I16* part) {
  for (int64_t kb = k0; kb < k1; kb += kKBlock) {
    const int64_t kend = std::min(kb + kKBlock, k1);
    //PF2
    ForRowBlocks(m, [&](auto rows, int64_t r0) {
      VnniBlock<decltype(rows)::value>(x, k, w, n, 0, n, kb, kend, r0, part + r0 * (n / 16));
    });
  }
}

// Dot products of one token row with Q weight rows (nk layout), sign-flipped weights as above; k any size.
template <int Q>
void VnniDots(const int8_t* xr, int64_t k, const int8_t* w, int32_t out[Q]) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i acc[Q], ones = _mm512_set1_epi8(1), xs = _mm512_setzero_si512();
  for (int q = 0; q < Q; ++q) acc[q] = _mm512_setzero_si512();
  for (int64_t kk = 0; kk < k; kk += 64) {
    const __mmask64 mask = k - kk >= 64 ? ~__mmask64{0} : (__mmask64{1} << (k - kk)) - 1;
    const __m512i xb = _mm512_maskz_loadu_epi8(mask, xr + kk);
    xs = _mm512_dpbusd_epi32(xs, ones, xb);  // sum of x, for the correction
    for (int q = 0; q < Q; ++q)
      acc[q] = _mm512_dpbusd_epi32(acc[q], _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, w + q * k + kk), flip), xb);
  }
  const int32_t correction = 128 * _mm512_reduce_add_epi32(xs);
  for (int q = 0; q < Q; ++q) out[q] = _mm512_reduce_add_epi32(acc[q]) - correction;
}
#else
constexpr bool kVnni = false;
#endif

// One chunk [k0, k1) of qmm_kn_w8a8: int32 sums into acc (m * n / 16 vectors; permuted as VnniTile with VNNI).
void KnW8a8Chunk(const int8_t* x, int64_t m, int64_t k, int64_t n, const int8_t* w, int64_t k0, int64_t k1, I16* acc) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if (k % 4 == 0) return VnniRows(x, m, k, w, n, k0, k1, acc);
#endif
  AccumulateRows<0>(x, m, k, reinterpret_cast<const uint8_t*>(w), n, n, k0, k1, acc);
}

// Output columns [j0, j0 + Q) of y = x [m, k] @ w[n, k]^T, int8 rows of w, Q rows of w at once (k a multiple of 16).
template <bool kIntX, int Q>
void NkColumns(const void* xv, const float* x_scale, int64_t m, int64_t k, const int8_t* w, const float* scale,
               int64_t n, int64_t j, float* y) {
  for (int64_t r = 0; r < m; ++r) {
    float dots[Q];
    if constexpr (kIntX && kVnni) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
      int32_t sums[Q];
      VnniDots<Q>(static_cast<const int8_t*>(xv) + r * k, k, w + j * k, sums);
      for (int q = 0; q < Q; ++q) dots[q] = static_cast<float>(sums[q]) * x_scale[r];
#endif
    } else if constexpr (kIntX) {
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
  for (; j + 4 <= j0 + count; j += 4) {
    Prefetch(w + (j + 4) * k, 0, 1, std::min<int64_t>(4, n - j - 4) * k);  // the next 4 rows (contiguous)
    NkColumns<kIntX, 4>(xv, x_scale, m, k, w, scale, n, j, y);
  }
  for (; j < j0 + count; ++j) NkColumns<kIntX, 1>(xv, x_scale, m, k, w, scale, n, j, y);
}

int64_t Tiles(int64_t n, int64_t tile) { return (n + tile - 1) / tile; }

// Runs chunk(slot, k0, k1, acc) over the row chunks of a [k, n] kernel (`rows` rows each) with one zeroed
// accumulator of m * n / 16 vectors per thread, and returns the accumulators (slots that ran nothing stay zero).
template <typename V, typename F>
std::vector<V> RunChunks(ffi::ThreadPool& pool, int64_t m, int64_t k, int64_t n, int64_t rows, const F& chunk) {
  const int64_t items = Tiles(k, rows), slots = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), items));
  std::vector<V> acc(slots * m * (n / 16), V{});
  peakllm::ParallelForSlots(pool, items, [&](int64_t slot, int64_t item) {
    const int64_t k0 = item * rows;
    chunk(slot, k0, std::min(k0 + rows, k), acc.data() + slot * m * (n / 16));
  });
  return acc;
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
  const auto* cp = static_cast<const uint8_t*>(codes.untyped_data());
  const int64_t vecs = n / 16, rows = group == k ? kChunkRows : group;
  std::vector<F16> part(group == k ? 0 : std::min<int64_t>(pool.num_threads(), Tiles(k, rows)) * m * vecs);
  const std::vector<F16> acc = RunChunks<F16>(pool, m, k, n, rows, [&](int64_t slot, int64_t k0, int64_t k1, F16* a) {
    F16* scratch = part.data() + slot * m * vecs;
    switch (signed_codes ? 0 : bits) {
      case 0: return KnChunk<0>(xp, m, k, n, cp, sp, zp, group, k0, k1, scratch, a);
      case 8: return KnChunk<8>(xp, m, k, n, cp, sp, zp, group, k0, k1, scratch, a);
      case 4: return KnChunk<4>(xp, m, k, n, cp, sp, zp, group, k0, k1, scratch, a);
      case 3: return KnChunk<3>(xp, m, k, n, cp, sp, zp, group, k0, k1, scratch, a);
      default: return KnChunk<2>(xp, m, k, n, cp, sp, zp, group, k0, k1, scratch, a);
    }
  });
  const int64_t slots = acc.size() / (m * vecs);
  for (int64_t r = 0; r < m; ++r) {
    float xsum = 0;  // per-channel zero point: sum(x * (code - zero)) = sum(x * code) - zero * sum(x)
    if (group == k && zp != nullptr)
      for (int64_t kk = 0; kk < k; ++kk) xsum += xp[r * k + kk];
    for (int64_t v = 0; v < vecs; ++v) {
      F16 out = acc[r * vecs + v];
      for (int64_t t = 1; t < slots; ++t) out += acc[(t * m + r) * vecs + v];
      if (group == k) out = Load<F16>(sp + 16 * v) * (zp ? out - Load<F16>(zp + 16 * v) * xsum : out);
      std::memcpy(y->typed_data() + r * n + 16 * v, &out, sizeof(F16));
    }
  }
  return ffi::Error::Success();
}

// Per-token symmetric int8 activations, as model/kernels/int8_matmul.quantize_per_token computes them:
// scale = max(max |x|, 1e-12) / 127 per row, q = clip(round-half-even(x / scale), -127, 127) (NaN -> 0).
void QuantizeRows(const float* x, int64_t m, int64_t k, int8_t* q, float* scales) {
  for (int64_t r = 0; r < m; ++r) {
    float amax = 0;
    for (int64_t kk = 0; kk < k; ++kk) amax = std::max(amax, std::fabs(x[r * k + kk]));
    const float s = std::max(amax, 1e-12f) / 127.0f;
    scales[r] = s;
    for (int64_t kk = 0; kk < k; ++kk) {
      const float v = std::nearbyint(x[r * k + kk] / s);
      q[r * k + kk] = static_cast<int8_t>(v == v ? std::min(127.0f, std::max(-127.0f, v)) : 0.0f);
    }
  }
}

ffi::Error QmmKnW8a8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                         ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  const int64_t m = x.dimensions()[0], k = x.dimensions()[1], n = y->dimensions()[1];
  if (n % kTile != 0) return ffi::Error::InvalidArgument("qmm_kn_w8a8: the output size must be a multiple of 64");
  if (m > kMaxRows) return ffi::Error::InvalidArgument("qmm_kn_w8a8: at most 16 rows");
  if (static_cast<int64_t>(w.element_count()) != k * n || static_cast<int64_t>(scale.element_count()) != n)
    return ffi::Error::InvalidArgument("qmm_kn_w8a8: w must be [k, n] and scale [n]");
  std::vector<int8_t> x_q(m * k);
  std::vector<float> x_scale(m);
  QuantizeRows(x.typed_data(), m, k, x_q.data(), x_scale.data());
  const int8_t* xp = x_q.data();
  const int64_t vecs = n / 16;
  const std::vector<I16> acc = RunChunks<I16>(pool, m, k, n, kChunkRows, [&](int64_t, int64_t k0, int64_t k1, I16* a) {
    KnW8a8Chunk(xp, m, k, n, w.typed_data(), k0, k1, a);
  });
  const int64_t slots = acc.size() / (m * vecs);
  const bool permuted = kVnni && k % 4 == 0;
  std::vector<int32_t> sums(n);
  for (int64_t r = 0; r < m; ++r) {
    int32_t xsum = 0;  // the VNNI kernels' sign-flip correction
    for (int64_t kk = 0; kk < k; ++kk) xsum += xp[r * k + kk];
    for (int64_t v = 0; v < vecs; ++v) {
      I16 total = acc[r * vecs + v];
      for (int64_t t = 1; t < slots; ++t) total += acc[(t * m + r) * vecs + v];
      std::memcpy(sums.data() + 16 * v, &total, sizeof(I16));
    }
    for (int64_t c0 = 0; c0 < n; c0 += kTile) {
      int32_t tile[kTile];
      for (int64_t c = 0; c < kTile; ++c) tile[c] = permuted ? sums[c0 + VnniColumn(c)] - 128 * xsum : sums[c0 + c];
      for (int64_t v = 0; v < kTile / 16; ++v) {
        const F16 out = __builtin_convertvector(Load<I16>(tile + 16 * v), F16) *
                        Load<F16>(scale.typed_data() + c0 + 16 * v) * x_scale[r];
        std::memcpy(y->typed_data() + r * n + c0 + 16 * v, &out, sizeof(F16));
      }
    }
  }
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

ffi::Error QmmNkW8a8Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                         ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  const int64_t m = x.dimensions()[0], k = x.dimensions()[1];
  std::vector<int8_t> x_q(m * k);
  std::vector<float> x_scale(m);
  QuantizeRows(x.typed_data(), m, k, x_q.data(), x_scale.data());
  return Nk<true>(pool, x_q.data(), x_scale.data(), m, k, w, scale, y);
}

// (pool, x float32 [m, k], w int8, scale float32) -> y float32 [m, n]: W8A16 [n, k] and both W8A8 kernels.
auto FloatXInt8WBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(PeakllmQmmKnW8a8, QmmKnW8a8Impl, FloatXInt8WBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PeakllmQmmNk, QmmNkImpl, FloatXInt8WBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PeakllmQmmNkW8a8, QmmNkW8a8Impl, FloatXInt8WBinding());
