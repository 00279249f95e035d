// Paged decode attention for XLA:CPU (an XLA FFI custom call).
//
// One query per sequence (decode), dense causal: query g attends to positions
// [0, kv_len[g]) of its own pages. K and V are read straight from the paged
// cache, once, with no gathered copy: each (sequence, kv head) task walks its
// page table with an online softmax. The cache is float32 [N, P, Z, K, X], or
// bfloat16 packed two to a uint32 word [N, P, Z, K, X/2] (element 2j in the low
// half, 2j+1 in the high half). Tasks run on a small pool of the kernel's own.
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
#include <vector>

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

// A small persistent pool of its own: XLA's intra-op pool is often busy with the thunk
// executor itself when a custom call runs, which left the kernel on one core.
class Pool {
 public:
  static Pool& Get() {
    static Pool* pool = new Pool(std::max(1u, std::thread::hardware_concurrency()) - 1);
    return *pool;
  }
  int64_t workers() const { return static_cast<int64_t>(threads_.size()); }

  // Runs fn() on every worker and on the caller; returns when all have finished.
  void Run(const std::function<void()>& fn) {
    std::unique_lock<std::mutex> lock(mu_);
    job_ = &fn;
    pending_ = workers();
    ++generation_;
    cv_.notify_all();
    lock.unlock();
    fn();
    lock.lock();
    done_.wait(lock, [&] { return pending_ == 0; });
    job_ = nullptr;
  }

 private:
  explicit Pool(unsigned n) {
    for (unsigned i = 0; i < n; ++i) threads_.emplace_back([this] { Loop(); });
    for (auto& t : threads_) t.detach();
  }
  void Loop() {
    uint64_t seen = 0;
    while (true) {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      const std::function<void()>* job = job_;
      lock.unlock();
      (*job)();
      lock.lock();
      if (--pending_ == 0) done_.notify_all();
    }
  }
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_, done_;
  const std::function<void()>* job_ = nullptr;
  int64_t pending_ = 0;
  uint64_t generation_ = 0;
};

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

// Copies `count` head rows starting at `row` (contiguous in the cache) into `out` as float32.
template <bool kPacked>
inline void LoadRows(const void* base, int64_t row, int64_t count, int64_t X, float* out) {
  if constexpr (kPacked) {
    const uint32_t* w = static_cast<const uint32_t*>(base) + row * (X / 2);
    uint32_t* ob = reinterpret_cast<uint32_t*>(out);
#pragma omp simd
    for (int64_t j = 0; j < count * X / 2; ++j) {
      ob[2 * j] = w[j] << 16;
      ob[2 * j + 1] = w[j] & 0xFFFF0000u;
    }
  } else {
    const float* src = static_cast<const float*>(base) + row * X;
    std::copy(src, src + count * X, out);
  }
}

// One sequence: online softmax over its pages, a page at a time. A page's K and V for all
// kv heads are one contiguous block of the cache [Z, K, X], read once, sequentially; each
// query head then takes its kv head's rows (scores of the page, one rescale per page).
template <bool kPacked>
void Task(int64_t g, const float* q, const void* kc, const void* vc, const int32_t* pages,
          const int32_t* kv_len, float* out, int64_t layer, int64_t P, int64_t Z, int64_t K,
          int64_t X, int64_t H, int64_t W) {
  const int64_t Q = H / K;
  const float scale = 1.0f / std::sqrt(static_cast<float>(X));
  thread_local std::vector<float> kbuf, vbuf, s;
  kbuf.resize(Z * K * X);
  vbuf.resize(Z * K * X);
  s.resize(Z);
  std::vector<float> acc(H * X, 0.0f), qv(H * X), m(H, -std::numeric_limits<float>::infinity()),
      l(H, 0.0f);
  for (int64_t i = 0; i < H * X; ++i) qv[i] = q[g * H * X + i] * scale;
  const int64_t len = std::min<int64_t>(kv_len[g], W * Z);
  for (int64_t w = 0; w * Z < len; ++w) {
    const int64_t page = pages[g * W + w];
    if (page < 0 || page >= P) continue;
    const int64_t n = std::min<int64_t>(Z, len - w * Z);
    const int64_t first_row = (layer * P + page) * Z * K;
    LoadRows<kPacked>(kc, first_row, n * K, X, kbuf.data());
    LoadRows<kPacked>(vc, first_row, n * K, X, vbuf.data());
    for (int64_t h = 0; h < H; ++h) {
      const int64_t kh = h / Q;
      const float* qh = &qv[h * X];
      float m_page = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < n; ++t) {
        const float* kt = &kbuf[(t * K + kh) * X];
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t x = 0; x < X; ++x) dot += qh[x] * kt[x];
        s[t] = dot;
        m_page = std::max(m_page, dot);
      }
      const float m_new = std::max(m[h], m_page);
      const float c = std::exp(m[h] - m_new);
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t t = 0; t < n; ++t) {  // vectorised exp (libmvec)
        s[t] = std::exp(s[t] - m_new);
        sum += s[t];
      }
      float* a = &acc[h * X];
#pragma omp simd
      for (int64_t x = 0; x < X; ++x) a[x] *= c;
      for (int64_t t = 0; t < n; ++t) {
        const float p = s[t];
        const float* vt = &vbuf[(t * K + kh) * X];
#pragma omp simd
        for (int64_t x = 0; x < X; ++x) a[x] += p * vt[x];
      }
      l[h] = l[h] * c + sum;
      m[h] = m_new;
    }
  }
  for (int64_t h = 0; h < H; ++h) {
    const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
    float* o = &out[(g * H + h) * X];
    for (int64_t x = 0; x < X; ++x) o[x] = acc[h * X + x] * inv;
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
