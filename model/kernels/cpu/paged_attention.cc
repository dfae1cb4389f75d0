// Paged decode attention on CPU, called from JAX through the XLA FFI (model/kernels/cpu_native.py).
//
// The `xla` path of a paged decode step gathers every row's pages into a dense [B, M * P, K, D] copy (the whole
// page-table width, live or not) before two dots; on a CPU that gather is most of a serving step. This kernel reads
// each row's live pages where they lie and keeps an online softmax, one (row, kv head) per task of XLA's intra-op
// pool, so it touches each live key and value once.
//
// paged_decode: out[b, h] = softmax(scale * q[b, h] . k[b, s, h / G]) v[b, s, h / G] over the row's first lengths[b]
//               slots s, slot s in page page_table[b, s / P] at offset s % P; G = H / K query heads share a kv head.
//               q [B, H, D], k/v pages [N, P, K, D], page_table [B, M] int32, lengths [B] int32, all float32 but
//               the tables. A row with length 0 gives zeros.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

typedef float F16 __attribute__((vector_size(64)));

inline F16 Load(const float* p) {
  F16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store(float* p, F16 v) { std::memcpy(p, &v, sizeof(v)); }

inline float Dot(const float* a, const float* b, int64_t d) {
  int64_t i = 0;
  float sum = 0.0f;
  if (d >= 16) {
    F16 acc = F16{};
    for (; i + 16 <= d; i += 16) acc += Load(a + i) * Load(b + i);
    for (int j = 0; j < 16; ++j) sum += acc[j];
  }
  for (; i < d; ++i) sum += a[i] * b[i];
  return sum;
}

// acc[0:d] = acc * keep + p * v
inline void ScaleAdd(float* acc, float keep, float p, const float* v, int64_t d) {
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) Store(acc + i, Load(acc + i) * keep + p * Load(v + i));
  for (; i < d; ++i) acc[i] = acc[i] * keep + p * v[i];
}

ffi::Error PagedDecodeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_pages,
                           ffi::Buffer<ffi::F32> v_pages, ffi::Buffer<ffi::S32> page_table,
                           ffi::Buffer<ffi::S32> lengths, ffi::ResultBuffer<ffi::F32> out, float scale) {
  const auto qd = q.dimensions(), kd = k_pages.dimensions(), td = page_table.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || td.size() != 2) {
    return ffi::Error::InvalidArgument("paged_decode: q [B, H, D], pages [N, P, K, D], page_table [B, M]");
  }
  const int64_t batch = qd[0], heads = qd[1], d = qd[2];
  const int64_t num_pages = kd[0], page_size = kd[1], kv_heads = kd[2];
  const int64_t width = td[1];
  if (kd[3] != d || td[0] != batch || lengths.element_count() != batch || kv_heads == 0 || heads % kv_heads ||
      v_pages.element_count() != k_pages.element_count()) {
    return ffi::Error::InvalidArgument("paged_decode: operand shapes do not agree");
  }
  const int64_t group = heads / kv_heads;
  const float* qp = q.typed_data();
  const float* kp = k_pages.typed_data();
  const float* vp = v_pages.typed_data();
  const int32_t* table = page_table.typed_data();
  const int32_t* lens = lengths.typed_data();
  float* o = out->typed_data();
  auto run = [&](int64_t item) {
    const int64_t b = item / kv_heads, kh = item % kv_heads;
    const int64_t length = std::clamp<int64_t>(lens[b], 0, width * page_size);
    const float* qb = qp + (b * heads + kh * group) * d;
    float* ob = o + (b * heads + kh * group) * d;
    std::vector<float> acc(group * d, 0.0f), scores(group * page_size);
    std::vector<float> top(group, -std::numeric_limits<float>::infinity()), total(group, 0.0f);
    for (int64_t first = 0; first < length; first += page_size) {
      const int64_t page = std::clamp<int64_t>(table[b * width + first / page_size], 0, num_pages - 1);
      const int64_t count = std::min(page_size, length - first);
      const int64_t base = page * page_size * kv_heads * d + kh * d;  // slot t at base + t * kv_heads * d
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * page_size;
        float page_top = top[g];
        for (int64_t t = 0; t < count; ++t) {
          s[t] = scale * Dot(qb + g * d, kp + base + t * kv_heads * d, d);
          page_top = std::max(page_top, s[t]);
        }
        const float keep = std::exp(top[g] - page_top);  // rescales what came before (0 at the first page)
        float* a = acc.data() + g * d;
        total[g] *= keep;
        for (int64_t t = 0; t < count; ++t) {
          const float p = std::exp(s[t] - page_top);
          total[g] += p;
          ScaleAdd(a, t == 0 ? keep : 1.0f, p, vp + base + t * kv_heads * d, d);
        }
        top[g] = page_top;
      }
    }
    for (int64_t g = 0; g < group; ++g) {
      const float inv = total[g] > 0.0f ? 1.0f / total[g] : 0.0f;
      for (int64_t i = 0; i < d; ++i) ob[g * d + i] = acc[g * d + i] * inv;
    }
  };
  peakllm::ParallelFor(pool, batch * kv_heads, run);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PeakllmPagedDecode, PagedDecodeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
