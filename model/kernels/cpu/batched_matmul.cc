// Batched float32 matmuls for attention on CPU, called from JAX through the XLA FFI (model/kernels/cpu_native.py).
//
// XLA's CPU backend runs a batched dot such as attention's [B*H, 256, 64] x [B*H, 64, 256] on one thread (measured:
// the same time pinned to one core as on two), so at training shapes attention's six batched dots per layer keep the
// second core idle. This kernel splits the batch over XLA's intra-op thread pool and runs each product through an
// 8 x 32 register-tiled micro-kernel.
//
// bmm: c[b, m, n] = sum_k A[b](m, k) * B[b](k, n), float32 throughout, where A[b] is a[b] ([m, k]) or its transpose
//      (a[b] is [k, m]) and B[b] is b[b] ([k, n]) or its transpose (b[b] is [n, k], transposed per batch entry into
//      a scratch panel first). n must be a multiple of 32.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

typedef float F16 __attribute__((vector_size(64)));

constexpr int64_t kRows = 12;  // rows of c per micro-tile (24 accumulators)
constexpr int64_t kCols = 32;  // columns of c per micro-tile (two 16-lane vectors)

inline F16 Load(const float* p) {
  F16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store(float* p, F16 v) { std::memcpy(p, &v, sizeof(v)); }

// c[i, j0:j0+32] for R rows starting at row i0: A(i, kk) = a[i * a_row + kk * a_k], B rows of ldb floats.
template <int R>
inline void MicroTile(const float* a, int64_t a_row, int64_t a_k, const float* b, int64_t ldb, float* c, int64_t ldc,
                      int64_t k) {
  F16 acc0[R], acc1[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = F16{};
  for (int64_t kk = 0; kk < k; ++kk) {
    const F16 b0 = Load(b + kk * ldb), b1 = Load(b + kk * ldb + 16);
    const float* ak = a + kk * a_k;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const float x = ak[r * a_row];
      acc0[r] += x * b0;
      acc1[r] += x * b1;
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    Store(c + r * ldc, acc0[r]);
    Store(c + r * ldc + 16, acc1[r]);
  }
}

template <int R>
void Rows(const float* a, int64_t a_row, int64_t a_k, const float* b, int64_t n, float* c, int64_t k) {
  for (int64_t j = 0; j < n; j += kCols) MicroTile<R>(a, a_row, a_k, b + j, n, c + j, n, k);
}

// One batch entry: c [m, n] = A [m, k] @ B [k, n], B row-major with n columns.
void Product(const float* a, int64_t a_row, int64_t a_k, const float* b, float* c, int64_t m, int64_t n, int64_t k) {
  int64_t i = 0;
  for (; i + kRows <= m; i += kRows) Rows<kRows>(a + i * a_row, a_row, a_k, b, n, c + i * n, k);
  for (; i < m; ++i) Rows<1>(a + i * a_row, a_row, a_k, b, n, c + i * n, k);
}

using peakllm::ParallelFor;

ffi::Error BmmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                   ffi::ResultBuffer<ffi::F32> c, bool transpose_a, bool transpose_b) {
  const auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  if (ad.size() != 3 || bd.size() != 3 || cd.size() != 3) return ffi::Error::InvalidArgument("bmm: rank-3 operands");
  const int64_t batch = cd[0], m = cd[1], n = cd[2];
  const int64_t k = transpose_a ? ad[1] : ad[2];
  if (ad[0] != batch || bd[0] != batch || (transpose_a ? ad[2] : ad[1]) != m ||
      (transpose_b ? bd[1] : bd[2]) != n || (transpose_b ? bd[2] : bd[1]) != k) {
    return ffi::Error::InvalidArgument("bmm: operand shapes do not match the result");
  }
  if (n % kCols) return ffi::Error::InvalidArgument("bmm: n must be a multiple of 32");
  const float* a_data = a.typed_data();
  const float* b_data = b.typed_data();
  float* c_data = c->typed_data();
  const int64_t a_row = transpose_a ? 1 : k, a_k = transpose_a ? m : 1;
  auto run = [&](int64_t e) {
    const float* be = b_data + e * k * n;
    std::vector<float> panel;
    if (transpose_b) {  // [n, k] -> [k, n]
      panel.resize(k * n);
      for (int64_t j = 0; j < n; ++j)
        for (int64_t kk = 0; kk < k; ++kk) panel[kk * n + j] = be[j * k + kk];
      be = panel.data();
    }
    Product(a_data + e * m * k, a_row, a_k, be, c_data + e * m * n, m, n, k);
  };
  ParallelFor(pool, batch, run);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PeakllmBmm, BmmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));
