// Paged decode attention for XLA:CPU (an XLA FFI custom call).
//
// One query per sequence (decode), dense causal: query g attends to positions
// [0, kv_len[g]) of its own pages. K and V are read straight from the paged
// cache, once, with no gathered copy and no staging copy: each sequence's task walks
// its page table with an online softmax, prefetching the pages ahead of it. The
// cache is float32 [N, P, Z, K, X], or bfloat16 packed two to a uint32 word
// [N, P, Z, K, X/2] (element 2j in the low half, 2j+1 in the high half), converted
// in registers. Tasks run on a small pool of the kernel's own. With AVX-512 and
// head rows of a multiple of 16 stored elements, a page's scores are computed 16
// tokens at a time (one transpose-and-add reduction) and the weighted V keeps its
// accumulator in registers; otherwise plain loops the compiler vectorises.
//
// IEEE arithmetic throughout: the running max starts at -inf and its first rescale is
// exp(-inf) = 0, so this file must not be built with finite-math assumptions (-ffast-math).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <limits>
#include <functional>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#include "pool.h"
#include "xla/ffi/api/ffi.h"

#if defined(__FINITE_MATH_ONLY__) && __FINITE_MATH_ONLY__
#error "paged_decode.cc relies on IEEE infinities: build without -ffast-math/-ffinite-math-only"
#endif

// glibc declares libmvec's vector expf only under -ffast-math; declare it here so that the
// `omp simd` exp loop below still calls the vector variant (_ZGVdN8v_expf with AVX2, ...).
#if defined(__x86_64__) && defined(__GLIBC__)
extern "C" {
#pragma omp declare simd notinbranch
float expf(float);
}
#endif

namespace ffi = xla::ffi;

namespace {

using mlx_native::Pool;

inline float Bf16Low(uint32_t w) {
  uint32_t b = w << 16;
  float f;
  __builtin_memcpy(&f, &b, 4);
  return f;
}
inline float Bf16High(uint32_t w) {
  uint32_t b = w & 0xFFFF0000u;
  float f;
  __builtin_memcpy(&f, &b, 4);
  return f;
}

constexpr int64_t kLine = 64;  // bytes per cache line, for software prefetch

// How many pages ahead of the one being read the walk prefetches: pages are scattered, so
// the hardware prefetcher cannot follow the walk. Into L2 (locality 2, prefetcht1): a
// non-temporal hint (0) was twice as slow here, and L1 (3) no faster.
constexpr int64_t kAhead = 2;

// Prefetches bytes [0, size) of p, one line at a time.
inline void Prefetch(const char* p, int64_t size) {
  for (int64_t b = 0; b < size; b += kLine) __builtin_prefetch(p + b, 0, 2);
}

#if defined(__AVX512F__)
#include <immintrin.h>
#define PD_AVX512 1
// Sums each of 16 vectors: lane t of the result is the sum of v[t]'s 16 elements
// (a transpose-and-add tree, 15 adds in place of 16 horizontal reductions).
inline __m512 Sum16(const __m512* v) {
  __m512 x[8], y[4], z[2];
  for (int i = 0; i < 8; ++i)
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(x[2 * i]), b = _mm512_castps_pd(x[2 * i + 1]);
    y[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; ++i)
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88),
                       _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
}

// Scores of up to 16 tokens (n) for one query head: s[t] = q . k_t, k_t = k + t * stride
// (elements). q is [X] (packed: evens then odds); E % 16 == 0.
template <bool kPacked, typename Elem>
inline void Scores16(const float* q, const Elem* k, int64_t stride, int64_t n, int64_t E,
                     float* s) {
  __m512 acc[16];
  for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t j = 0; j < E; j += 16) {
    if constexpr (kPacked) {
      const __m512 qe = _mm512_loadu_ps(q + j), qo = _mm512_loadu_ps(q + E + j);
      const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
      for (int64_t t = 0; t < n; ++t) {
        const __m512i w = _mm512_loadu_si512(k + t * stride + j);
        acc[t] = _mm512_fmadd_ps(qe, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), acc[t]);
        acc[t] = _mm512_fmadd_ps(qo, _mm512_castsi512_ps(_mm512_and_si512(w, hi_mask)), acc[t]);
      }
    } else {
      const __m512 qx = _mm512_loadu_ps(q + j);
      for (int64_t t = 0; t < n; ++t)
        acc[t] = _mm512_fmadd_ps(qx, _mm512_loadu_ps(k + t * stride + j), acc[t]);
    }
  }
  _mm512_mask_storeu_ps(s, static_cast<__mmask16>((1u << n) - 1), Sum16(acc));
}

// Weighted V of up to n tokens for one head, after rescaling: a = a * c + sum_t p[t] v_t,
// v_t = v + t * stride (elements); a is [X] (packed: evens then odds); E % 16 == 0. The
// accumulator stays in registers, 64 of its floats at a time.
template <bool kPacked, typename Elem>
inline void WeightedV(float* a, float c, const float* p, const Elem* v, int64_t stride,
                      int64_t n, int64_t E) {
  const __m512 cv = _mm512_set1_ps(c);
  constexpr int kChunks = kPacked ? 2 : 4;  // of 16 stored elements: 4 accumulators either way
  int64_t j = 0;
  for (; j + 16 * kChunks <= E; j += 16 * kChunks) {
    __m512 acc[2 * kChunks];
    for (int i = 0; i < kChunks; ++i) {
      acc[i] = _mm512_mul_ps(_mm512_loadu_ps(a + j + 16 * i), cv);
      if constexpr (kPacked)
        acc[kChunks + i] = _mm512_mul_ps(_mm512_loadu_ps(a + E + j + 16 * i), cv);
    }
    for (int64_t t = 0; t < n; ++t) {
      const __m512 pt = _mm512_set1_ps(p[t]);
      for (int i = 0; i < kChunks; ++i) {
        if constexpr (kPacked) {
          const __m512i w = _mm512_loadu_si512(v + t * stride + j + 16 * i);
          const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
          acc[i] = _mm512_fmadd_ps(pt, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), acc[i]);
          acc[kChunks + i] = _mm512_fmadd_ps(
              pt, _mm512_castsi512_ps(_mm512_and_si512(w, hi_mask)), acc[kChunks + i]);
        } else {
          acc[i] = _mm512_fmadd_ps(pt, _mm512_loadu_ps(v + t * stride + j + 16 * i), acc[i]);
        }
      }
    }
    for (int i = 0; i < kChunks; ++i) {
      _mm512_storeu_ps(a + j + 16 * i, acc[i]);
      if constexpr (kPacked) _mm512_storeu_ps(a + E + j + 16 * i, acc[kChunks + i]);
    }
  }
  for (; j < E; j += 16) {  // what is left, 16 stored elements at a time
    __m512 ae = _mm512_mul_ps(_mm512_loadu_ps(a + j), cv), ao = _mm512_setzero_ps();
    if constexpr (kPacked) ao = _mm512_mul_ps(_mm512_loadu_ps(a + E + j), cv);
    for (int64_t t = 0; t < n; ++t) {
      const __m512 pt = _mm512_set1_ps(p[t]);
      if constexpr (kPacked) {
        const __m512i w = _mm512_loadu_si512(v + t * stride + j);
        const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
        ae = _mm512_fmadd_ps(pt, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), ae);
        ao = _mm512_fmadd_ps(pt, _mm512_castsi512_ps(_mm512_and_si512(w, hi_mask)), ao);
      } else {
        ae = _mm512_fmadd_ps(pt, _mm512_loadu_ps(v + t * stride + j), ae);
      }
    }
    _mm512_storeu_ps(a + j, ae);
    if constexpr (kPacked) _mm512_storeu_ps(a + E + j, ao);
  }
}
#endif

// Prefetches part i of `parts` (whole lines) of bytes [0, size) of p.
inline void PrefetchPart(const char* p, int64_t size, int64_t i, int64_t parts) {
  const int64_t lines = (size + kLine - 1) / kLine;
  const int64_t a = lines * i / parts, b = lines * (i + 1) / parts;
  Prefetch(p + a * kLine, (b - a) * kLine);
}

// Per-thread scratch of one task: accumulators, scaled query, running max/sum, scores.
struct Scratch {
  std::vector<float> acc, qv, m, l, c, s;
  std::vector<int64_t> walk;
  void Resize(int64_t H, int64_t X, int64_t Z, int64_t W) {
    if (static_cast<int64_t>(walk.size()) < W) walk.resize(W);
    if (static_cast<int64_t>(acc.size()) < H * X) {
      acc.resize(H * X);
      qv.resize(H * X);
    }
    if (static_cast<int64_t>(m.size()) < H) {
      m.resize(H);
      l.resize(H);
      c.resize(H);
    }
    if (static_cast<int64_t>(s.size()) < H * Z) s.resize(H * Z);
  }
};

// One sequence: online softmax over its pages, a page at a time, reading K and V straight
// from the cache (no copy). A page's K (or V) for all kv heads is one contiguous block
// [Z, K, X] of the cache, read sequentially, token by token; while a page is worked on, the
// next one's rows are prefetched (pages are scattered, so the hardware prefetcher cannot
// follow the walk). Scores of a page are computed for every head, then one rescale per
// head and page. Packed bf16 words hold elements (2j, 2j+1): the query and accumulator are
// kept as (evens, odds), so each word converts in registers, and the output interleaves
// them back.
template <bool kPacked>
void Task(int64_t g, const float* q, const void* kc, const void* vc, const int32_t* pages,
          const int32_t* kv_len, float* out, int64_t layer, int64_t P, int64_t Z, int64_t K,
          int64_t X, int64_t H, int64_t W) {
  const int64_t len = std::min<int64_t>(kv_len[g], W * Z);
  float* o_g = &out[g * H * X];
  if (len <= 0) {  // padding slot: zeros, nothing read
    std::fill(o_g, o_g + H * X, 0.0f);
    return;
  }
  using Elem = typename std::conditional<kPacked, uint32_t, float>::type;
  const int64_t E = kPacked ? X / 2 : X;  // stored elements per head row
  const int64_t row_bytes = K * E * static_cast<int64_t>(sizeof(Elem));  // one token, all kv heads
  const Elem* kbase = static_cast<const Elem*>(kc);
  const Elem* vbase = static_cast<const Elem*>(vc);
  const int64_t Q = H / K;
  const float scale = 1.0f / std::sqrt(static_cast<float>(X));
  thread_local Scratch sc;
  sc.Resize(H, X, Z, W);
  float* __restrict acc = sc.acc.data();
  float* __restrict qv = sc.qv.data();
  float* __restrict m = sc.m.data();
  float* __restrict l = sc.l.data();
  float* __restrict cs = sc.c.data();
  float* __restrict s = sc.s.data();
  const float* q_g = &q[g * H * X];
  for (int64_t h = 0; h < H; ++h) {
    if constexpr (kPacked) {
      for (int64_t j = 0; j < E; ++j) {
        qv[h * X + j] = q_g[h * X + 2 * j] * scale;
        qv[h * X + E + j] = q_g[h * X + 2 * j + 1] * scale;
      }
    } else {
      for (int64_t x = 0; x < X; ++x) qv[h * X + x] = q_g[h * X + x] * scale;
    }
    m[h] = -std::numeric_limits<float>::infinity();
    l[h] = 0.0f;
  }
  std::fill(acc, acc + H * X, 0.0f);

  // The sequence's in-range pages, in order (page ids out of range are skipped).
  const int64_t n_pages = (len + Z - 1) / Z;
  int64_t* __restrict walk = sc.walk.data();
  int64_t n_walk = 0;
  for (int64_t w = 0; w < n_pages; ++w) {
    const int64_t page = pages[g * W + w];
    if (page >= 0 && page < P) walk[n_walk++] = w;
  }
  auto page_offset = [&](int64_t w) { return ((layer * P + pages[g * W + w]) * Z) * K * E; };
  auto page_rows = [&](int64_t w) { return std::min<int64_t>(Z, len - w * Z); };
  for (int64_t i = 0; i < std::min(kAhead, n_walk); ++i) {  // nothing to overlap these with
    const int64_t bytes = page_rows(walk[i]) * row_bytes;
    Prefetch(reinterpret_cast<const char*>(kbase + page_offset(walk[i])), bytes);
    Prefetch(reinterpret_cast<const char*>(vbase + page_offset(walk[i])), bytes);
  }
  for (int64_t i = 0; i < n_walk; ++i) {
    const int64_t w = walk[i];
    const int64_t n = page_rows(w);
    const bool ahead = i + kAhead < n_walk;
    const int64_t wn = ahead ? walk[i + kAhead] : 0;
    const int64_t n_next = ahead ? page_rows(wn) : 0;
    const char* kn = ahead ? reinterpret_cast<const char*>(kbase + page_offset(wn)) : nullptr;
    const char* vn = ahead ? reinterpret_cast<const char*>(vbase + page_offset(wn)) : nullptr;
    const Elem* kp = kbase + page_offset(w);
    const Elem* vp = vbase + page_offset(w);
    // Scores s[h * Z + t] of the page's tokens for every head.
#ifdef PD_AVX512
    if (E % 16 == 0) {
      const int64_t parts = ((n + 15) / 16) * K;  // the next page's K, a part per step
      for (int64_t t0 = 0; t0 < n; t0 += 16) {
        const int64_t nt = std::min<int64_t>(16, n - t0);
        for (int64_t kh = 0; kh < K; ++kh) {
          if (kn) PrefetchPart(kn, n_next * row_bytes, (t0 / 16) * K + kh, parts);
          for (int64_t h = kh * Q; h < (kh + 1) * Q; ++h)
            Scores16<kPacked>(&qv[h * X], kp + (t0 * K + kh) * E, K * E, nt, E, &s[h * Z + t0]);
        }
      }
    } else
#endif
    for (int64_t t = 0; t < n; ++t) {  // token-major walk of the K block
      if (t < n_next) Prefetch(kn + t * row_bytes, row_bytes);
      for (int64_t kh = 0; kh < K; ++kh) {
        const Elem* __restrict kt = kp + (t * K + kh) * E;
        for (int64_t h = kh * Q; h < (kh + 1) * Q; ++h) {
          const float* __restrict qh = &qv[h * X];
          float dot = 0.0f;
          if constexpr (kPacked) {
#pragma omp simd reduction(+ : dot)
            for (int64_t j = 0; j < E; ++j)
              dot += qh[j] * Bf16Low(kt[j]) + qh[E + j] * Bf16High(kt[j]);
          } else {
#pragma omp simd reduction(+ : dot)
            for (int64_t x = 0; x < X; ++x) dot += qh[x] * kt[x];
          }
          s[h * Z + t] = dot;
        }
      }
    }
    // Softmax of the page per head: one rescale factor c of the accumulator.
    for (int64_t h = 0; h < H; ++h) {
      float* __restrict sh = &s[h * Z];
      float m_page = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < n; ++t) m_page = std::max(m_page, sh[t]);
      const float m_new = std::max(m[h], m_page);
      const float c = std::exp(m[h] - m_new);
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t t = 0; t < n; ++t) {  // vectorised exp (libmvec)
        sh[t] = std::exp(sh[t] - m_new);
        sum += sh[t];
      }
      cs[h] = c;
      l[h] = l[h] * c + sum;
      m[h] = m_new;
    }
    // The accumulators rescaled by c, plus the page's weighted V.
#ifdef PD_AVX512
    if (E % 16 == 0) {
      for (int64_t kh = 0; kh < K; ++kh) {
        if (vn) PrefetchPart(vn, n_next * row_bytes, kh, K);  // the next page's V
        for (int64_t h = kh * Q; h < (kh + 1) * Q; ++h)
          WeightedV<kPacked>(&acc[h * X], cs[h], &s[h * Z], vp + kh * E, K * E, n, E);
      }
      continue;
    }
#endif
    for (int64_t h = 0; h < H; ++h) {
      float* __restrict a = &acc[h * X];
#pragma omp simd
      for (int64_t x = 0; x < X; ++x) a[x] *= cs[h];
    }
    for (int64_t t = 0; t < n; ++t) {  // token-major walk of the V block
      if (t < n_next) Prefetch(vn + t * row_bytes, row_bytes);
      for (int64_t kh = 0; kh < K; ++kh) {
        const Elem* __restrict vt = vp + (t * K + kh) * E;
        for (int64_t h = kh * Q; h < (kh + 1) * Q; ++h) {
          const float p = s[h * Z + t];
          float* __restrict a = &acc[h * X];
          if constexpr (kPacked) {
#pragma omp simd
            for (int64_t j = 0; j < E; ++j) {
              a[j] += p * Bf16Low(vt[j]);
              a[E + j] += p * Bf16High(vt[j]);
            }
          } else {
#pragma omp simd
            for (int64_t x = 0; x < X; ++x) a[x] += p * vt[x];
          }
        }
      }
    }
  }
  for (int64_t h = 0; h < H; ++h) {
    const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
    float* o = &o_g[h * X];
    const float* a = &acc[h * X];
    if constexpr (kPacked) {
      for (int64_t j = 0; j < E; ++j) {
        o[2 * j] = a[j] * inv;
        o[2 * j + 1] = a[E + j] * inv;
      }
    } else {
      for (int64_t x = 0; x < X; ++x) o[x] = a[x] * inv;
    }
  }
}

ffi::Error PagedDecodeImpl(ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k_cache,
                           ffi::AnyBuffer v_cache, ffi::Buffer<ffi::S32> pages,
                           ffi::Buffer<ffi::S32> kv_len, ffi::ResultBuffer<ffi::F32> out,
                           int64_t layer) {
  auto qd = q.dimensions();      // [G, H, X]
  auto cd = k_cache.dimensions();  // [N, P, Z, K, X or X/2]
  auto pd = pages.dimensions();  // [G, W]
  if (qd.size() != 3 || cd.size() != 5 || pd.size() != 2)
    return ffi::Error::InvalidArgument("paged_decode: bad ranks");
  const int64_t G = qd[0], H = qd[1], X = qd[2];
  const int64_t P = cd[1], Z = cd[2], K = cd[3], W = pd[1];
  const bool packed = k_cache.element_type() == ffi::DataType::U32;
  if (!packed && k_cache.element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("paged_decode: cache must be f32 or packed u32");
  if ((packed ? 2 * cd[4] : cd[4]) != X || H % K != 0)
    return ffi::Error::InvalidArgument("paged_decode: head shapes do not match");
  const float* qp = q.typed_data();
  const void* kc = k_cache.untyped_data();
  const void* vc = v_cache.untyped_data();
  const int32_t* pg = pages.typed_data();
  const int32_t* lens = kv_len.typed_data();
  float* op = out->typed_data();
  std::atomic<int64_t> next{0};
  std::function<void()> work = [&] {
    for (int64_t g = next.fetch_add(1); g < G; g = next.fetch_add(1)) {
      if (packed)
        Task<true>(g, qp, kc, vc, pg, lens, op, layer, P, Z, K, X, H, W);
      else
        Task<false>(g, qp, kc, vc, pg, lens, op, layer, P, Z, K, X, H, W);
    }
  };
  static std::mutex one_call_at_a_time;
  std::lock_guard<std::mutex> lock(one_call_at_a_time);
  Pool::Get().Run(work);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MlxPagedDecode, PagedDecodeImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("layer"));
