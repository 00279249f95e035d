// Paged attention for XLA:CPU (an XLA FFI custom call), for decode and prefill queries.
//
// Dense causal: query t attends to positions [0, kv_len[t]) of its sequence's pages. K and
// V are read straight from the paged cache, with no gathered copy and no staging copy: a
// task (one decode query, or up to 16 consecutive prefill queries of one sequence) walks
// the sequence's page table with an online softmax per query, prefetching the pages ahead. The
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

#include "bf16.h"
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

using mlx_native::Bf16ToF32;
using mlx_native::F32ToBf16;
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

// The queries and outputs, float32 or bfloat16 (raw 16-bit words) each.
struct Io {
  const void* q;
  bool q_bf16;
  void* out;
  bool out_bf16;
  float Q(int64_t i) const {
    if (!q_bf16) return static_cast<const float*>(q)[i];
    return Bf16ToF32(static_cast<const uint16_t*>(q)[i]);
  }
  void Out(int64_t i, float f) const {
    if (out_bf16)
      static_cast<uint16_t*>(out)[i] = F32ToBf16(f);
    else
      static_cast<float*>(out)[i] = f;
  }
};

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

// One query's running state: its scaled query, accumulators and softmax statistics per head.
struct QueryState {
  float* qv;   // [H, X] (packed: per head evens then odds), scaled by 1/sqrt(X)
  float* acc;  // [H, X], same layout
  float* m;    // [H] running max
  float* l;    // [H] running sum
};

// Per-thread scratch of one task: query states of up to kBlock queries, rescale factors, scores.
constexpr int64_t kBlock = 16;  // queries of one row per prefill task, reading its pages once
struct Scratch {
  std::vector<float> acc, qv, m, l, c, s;
  std::vector<int64_t> walk;
  void Resize(int64_t B, int64_t H, int64_t X, int64_t Z, int64_t W) {
    if (static_cast<int64_t>(walk.size()) < W) walk.resize(W);
    if (static_cast<int64_t>(acc.size()) < B * H * X) {
      acc.resize(B * H * X);
      qv.resize(B * H * X);
    }
    if (static_cast<int64_t>(m.size()) < B * H) {
      m.resize(B * H);
      l.resize(B * H);
    }
    if (static_cast<int64_t>(c.size()) < H) c.resize(H);
    if (static_cast<int64_t>(s.size()) < H * Z) s.resize(H * Z);
  }
  QueryState State(int64_t i, int64_t H, int64_t X) {
    return {&qv[i * H * X], &acc[i * H * X], &m[i * H], &l[i * H]};
  }
};

// Loads query t (io.q [T, H, X]) into st (scaled; packed: evens then odds) and clears its
// statistics.
template <bool kPacked>
void InitQuery(const QueryState& st, const Io& io, int64_t t, int64_t H, int64_t X) {
  const int64_t E = kPacked ? X / 2 : X;
  const float scale = 1.0f / std::sqrt(static_cast<float>(X));
  const int64_t q0 = t * H * X;
  for (int64_t h = 0; h < H; ++h) {
    if constexpr (kPacked) {
      for (int64_t j = 0; j < E; ++j) {
        st.qv[h * X + j] = io.Q(q0 + h * X + 2 * j) * scale;
        st.qv[h * X + E + j] = io.Q(q0 + h * X + 2 * j + 1) * scale;
      }
    } else {
      for (int64_t x = 0; x < X; ++x) st.qv[h * X + x] = io.Q(q0 + h * X + x) * scale;
    }
    st.m[h] = -std::numeric_limits<float>::infinity();
    st.l[h] = 0.0f;
  }
  std::fill(st.acc, st.acc + H * X, 0.0f);
}

// Writes st's normalised accumulators to output t (io.out [T, H, X]; packed: interleaving
// evens and odds); zeros where `empty` (a query that sees nothing).
template <bool kPacked>
void FinishQuery(const QueryState& st, const Io& io, int64_t t, bool empty, int64_t H,
                 int64_t X) {
  const int64_t E = kPacked ? X / 2 : X;
  const int64_t o0 = t * H * X;
  for (int64_t h = 0; h < H; ++h) {
    const float inv = !empty && st.l[h] > 0.0f ? 1.0f / st.l[h] : 0.0f;
    const float* a = &st.acc[h * X];
    if constexpr (kPacked) {
      for (int64_t j = 0; j < E; ++j) {
        io.Out(o0 + h * X + 2 * j, empty ? 0.0f : a[j] * inv);
        io.Out(o0 + h * X + 2 * j + 1, empty ? 0.0f : a[E + j] * inv);
      }
    } else {
      for (int64_t x = 0; x < X; ++x) io.Out(o0 + h * X + x, empty ? 0.0f : a[x] * inv);
    }
  }
}

// One query over the first n tokens of one page (K rows kp, V rows vp, every kv head): the
// scores for every head, one rescale per head, then the weighted V. While it works, the
// page `ahead` (kn, vn: n_next tokens; null for none) is prefetched.
template <bool kPacked, typename Elem>
void PageStep(const QueryState& st, float* __restrict cs, float* __restrict s, const Elem* kp,
              const Elem* vp, int64_t n, const char* kn, const char* vn, int64_t n_next,
              int64_t H, int64_t K, int64_t X, int64_t Z) {
  const int64_t E = kPacked ? X / 2 : X;  // stored elements per head row
  const int64_t row_bytes = K * E * static_cast<int64_t>(sizeof(Elem));
  const int64_t Q = H / K;
  float* __restrict qv = st.qv;
  float* __restrict acc = st.acc;
  float* __restrict m = st.m;
  float* __restrict l = st.l;
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
    if (kn && t < n_next) Prefetch(kn + t * row_bytes, row_bytes);
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
    return;
  }
#endif
  for (int64_t h = 0; h < H; ++h) {
    float* __restrict a = &acc[h * X];
#pragma omp simd
    for (int64_t x = 0; x < X; ++x) a[x] *= cs[h];
  }
  for (int64_t t = 0; t < n; ++t) {  // token-major walk of the V block
    if (vn && t < n_next) Prefetch(vn + t * row_bytes, row_bytes);
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

// Queries t0 .. t0 + nb - 1, all of one sequence (page table row `pages_row`), query i
// seeing positions [0, kv_len[t0 + i]): online softmax over the sequence's pages, a page at
// a time, reading K and V straight from the cache (no copy). A page's K (or V) for all kv
// heads is one contiguous block [Z, K, X] of the cache; every query of the block takes its
// turn on a page while it is in cache (decode: one query; a prefill chunk: kBlock), and the
// first query's turn prefetches the pages ahead (pages are scattered, so the hardware
// prefetcher cannot follow the walk). Packed bf16 words hold elements (2j, 2j+1): queries
// and accumulators are kept as (evens, odds), so each word converts in registers.
template <bool kPacked>
void BlockTask(int64_t t0, int64_t nb, const Io& io, const void* kc, const void* vc,
               const int32_t* pages_row, const int32_t* kv_len, int64_t layer,
               int64_t P, int64_t Z, int64_t K, int64_t X, int64_t H, int64_t W) {
  using Elem = typename std::conditional<kPacked, uint32_t, float>::type;
  const int64_t E = kPacked ? X / 2 : X;
  const int64_t row_bytes = K * E * static_cast<int64_t>(sizeof(Elem));  // one token, all kv heads
  const Elem* kbase = static_cast<const Elem*>(kc);
  const Elem* vbase = static_cast<const Elem*>(vc);
  thread_local Scratch sc;
  sc.Resize(nb, H, X, Z, W);
  int64_t len = 0;  // the longest query's range
  for (int64_t i = 0; i < nb; ++i) {
    InitQuery<kPacked>(sc.State(i, H, X), io, t0 + i, H, X);
    len = std::max<int64_t>(len, std::min<int64_t>(kv_len[t0 + i], W * Z));
  }
  // The sequence's in-range pages, in order (page ids out of range are skipped).
  const int64_t n_pages = (len + Z - 1) / Z;
  int64_t* __restrict walk = sc.walk.data();
  int64_t n_walk = 0;
  for (int64_t w = 0; w < n_pages; ++w) {
    const int64_t page = pages_row[w];
    if (page >= 0 && page < P) walk[n_walk++] = w;
  }
  auto page_offset = [&](int64_t w) { return ((layer * P + pages_row[w]) * Z) * K * E; };
  auto page_rows = [&](int64_t w) { return std::min<int64_t>(Z, len - w * Z); };
  for (int64_t i = 0; i < std::min(kAhead, n_walk); ++i) {  // nothing to overlap these with
    const int64_t bytes = page_rows(walk[i]) * row_bytes;
    Prefetch(reinterpret_cast<const char*>(kbase + page_offset(walk[i])), bytes);
    Prefetch(reinterpret_cast<const char*>(vbase + page_offset(walk[i])), bytes);
  }
  for (int64_t i = 0; i < n_walk; ++i) {
    const int64_t w = walk[i];
    const bool ahead = i + kAhead < n_walk;
    const int64_t wn = ahead ? walk[i + kAhead] : 0;
    const int64_t n_next = ahead ? page_rows(wn) : 0;
    const char* kn = ahead ? reinterpret_cast<const char*>(kbase + page_offset(wn)) : nullptr;
    const char* vn = ahead ? reinterpret_cast<const char*>(vbase + page_offset(wn)) : nullptr;
    bool first = true;
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t n = std::min<int64_t>(Z, std::min<int64_t>(kv_len[t0 + b], W * Z) - w * Z);
      if (n <= 0) continue;  // this query ends before the page
      PageStep<kPacked, Elem>(sc.State(b, H, X), sc.c.data(), sc.s.data(),
                              kbase + page_offset(w), vbase + page_offset(w), n,
                              first ? kn : nullptr, first ? vn : nullptr, n_next, H, K, X, Z);
      first = false;
    }
  }
  for (int64_t b = 0; b < nb; ++b)  // padding (kv_len 0): zeros, nothing read
    FinishQuery<kPacked>(sc.State(b, H, X), io, t0 + b, kv_len[t0 + b] <= 0, H, X);
}

// Checks the operands' ranks, types and head shapes; fills the dimensions.
ffi::Error CheckShapes(ffi::AnyBuffer& q, ffi::AnyBuffer& k_cache,
                       ffi::Buffer<ffi::S32>& pages, ffi::AnyBuffer& out, int64_t* G, int64_t* H, int64_t* X,
                       int64_t* P, int64_t* Z, int64_t* K, int64_t* W, bool* packed) {
  auto qd = q.dimensions();        // [G, H, X]
  auto cd = k_cache.dimensions();  // [N, P, Z, K, X or X/2]
  auto pd = pages.dimensions();    // [rows, W]
  if (qd.size() != 3 || cd.size() != 5 || pd.size() != 2)
    return ffi::Error::InvalidArgument("paged_attention: bad ranks");
  *G = qd[0], *H = qd[1], *X = qd[2];
  *P = cd[1], *Z = cd[2], *K = cd[3], *W = pd[1];
  *packed = k_cache.element_type() == ffi::DataType::U32;
  if (!*packed && k_cache.element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("paged_attention: cache must be f32 or packed u32");
  if ((*packed ? 2 * cd[4] : cd[4]) != *X || *H % *K != 0)
    return ffi::Error::InvalidArgument("paged_attention: head shapes do not match");
  for (auto t : {q.element_type(), out.element_type()})
    if (t != ffi::DataType::F32 && t != ffi::DataType::BF16)
      return ffi::Error::InvalidArgument("paged_attention: q and out must be f32 or bf16");
  if (out.element_count() != q.element_count())
    return ffi::Error::InvalidArgument("paged_attention: out must have q's shape");
  return ffi::Error::Success();
}

// Query t belongs to sequence row[t] (page table pages[row[t]]) and sees positions
// [0, kv_len[t]). Consecutive queries of one row are taken kBlock at a time, so a prefill
// chunk's pages are read once per block rather than once per query; decode queries (one per
// row) are blocks of one.
ffi::Error PagedAttentionImpl(ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
                            ffi::AnyBuffer v_cache, ffi::Buffer<ffi::S32> pages,
                            ffi::Buffer<ffi::S32> row, ffi::Buffer<ffi::S32> kv_len,
                            ffi::Result<ffi::AnyBuffer> out, int64_t layer) {
  int64_t T, H, X, P, Z, K, W;
  bool packed;
  ffi::Error err = CheckShapes(q, k_cache, pages, *out, &T, &H, &X, &P, &Z, &K, &W,
                               &packed);
  if (!err.success()) return err;
  const int64_t R = pages.dimensions()[0];
  const int32_t* rows = row.typed_data();
  std::vector<int64_t> starts;  // blocks: runs of one row, at most kBlock long
  for (int64_t t = 0; t < T; ++t) {
    if (rows[t] < 0 || rows[t] >= R)
      return ffi::Error::InvalidArgument("paged_attention: row out of range");
    if (t == 0 || rows[t] != rows[t - 1] || t - starts.back() == kBlock) starts.push_back(t);
  }
  starts.push_back(T);
  const int64_t n_blocks = static_cast<int64_t>(starts.size()) - 1;
  const Io io{q.untyped_data(), q.element_type() == ffi::DataType::BF16, out->untyped_data(),
              out->element_type() == ffi::DataType::BF16};
  const void* kc = k_cache.untyped_data();
  const void* vc = v_cache.untyped_data();
  const int32_t* pg = pages.typed_data();
  const int32_t* lens = kv_len.typed_data();
  std::atomic<int64_t> next{0};
  std::function<void()> work = [&] {
    for (int64_t b = next.fetch_add(1); b < n_blocks; b = next.fetch_add(1)) {
      const int64_t t0 = starts[b], nb = starts[b + 1] - t0;
      const int32_t* pages_row = &pg[rows[t0] * W];
      if (packed)
        BlockTask<true>(t0, nb, io, kc, vc, pages_row, lens, layer, P, Z, K, X, H, W);
      else
        BlockTask<false>(t0, nb, io, kc, vc, pages_row, lens, layer, P, Z, K, X, H, W);
    }
  };
  static std::mutex one_call_at_a_time;
  std::lock_guard<std::mutex> lock(one_call_at_a_time);
  Pool::Get().Run(work);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MlxPagedAttention, PagedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("layer"));
