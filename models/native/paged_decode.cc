// Paged decode attention for XLA:CPU (an XLA FFI custom call).
//
// One query per sequence (decode), dense causal: query g attends to positions
// [0, kv_len[g]) of its own pages. K and V are read straight from the paged
// cache, once, with no gathered copy: each (sequence, kv head) task walks its
// page table with an online softmax. The cache is float32 [N, P, Z, K, X], or
// bfloat16 packed two to a uint32 word [N, P, Z, K, X/2] (element 2j in the low
// half, 2j+1 in the high half). Tasks run on a small pool of the kernel's own.
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

// Loads the rows of `n` consecutive tokens of one page and kv head into `out` [n][X] as float32.
template <bool kPacked>
inline void LoadPage(const void* base, int64_t first_row, int64_t K, int64_t n, int64_t X,
                     float* out) {
  for (int64_t t = 0; t < n; ++t) {
    const int64_t row = first_row + t * K;
    float* o = out + t * X;
    if constexpr (kPacked) {
      const uint32_t* w = static_cast<const uint32_t*>(base) + row * (X / 2);
      uint32_t* ob = reinterpret_cast<uint32_t*>(o);
#pragma omp simd
      for (int64_t j = 0; j < X / 2; ++j) {
        ob[2 * j] = w[j] << 16;
        ob[2 * j + 1] = w[j] & 0xFFFF0000u;
      }
    } else {
      const float* src = static_cast<const float*>(base) + row * X;
      for (int64_t x = 0; x < X; ++x) o[x] = src[x];
    }
  }
}

constexpr int64_t kMaxPage = 256;  // tokens per page the stack buffers hold
constexpr int64_t kMaxX = 256;     // head dim the stack buffers hold

// One (sequence, kv head): online softmax over the sequence's pages, a page at a time
// (scores of a page, one rescale per page), for the Q query heads sharing the kv head.
template <bool kPacked>
void Task(int64_t g, int64_t kh, const float* q, const void* kc, const void* vc,
          const int32_t* pages, const int32_t* kv_len, float* out, int64_t layer, int64_t P,
          int64_t Z, int64_t K, int64_t X, int64_t H, int64_t W) {
  const int64_t Q = H / K;
  const float scale = 1.0f / std::sqrt(static_cast<float>(X));
  alignas(64) float kbuf[kMaxPage * kMaxX], vbuf[kMaxPage * kMaxX], s[kMaxPage];
  std::vector<float> acc(Q * X, 0.0f), qv(Q * X), m(Q, -std::numeric_limits<float>::infinity()),
      l(Q, 0.0f);
  for (int64_t i = 0; i < Q * X; ++i) qv[i] = q[(g * H + kh * Q) * X + i] * scale;
  const int64_t len = std::min<int64_t>(kv_len[g], W * Z);
  for (int64_t w = 0; w * Z < len; ++w) {
    const int64_t page = pages[g * W + w];
    if (page < 0 || page >= P) continue;
    const int64_t n = std::min<int64_t>(Z, len - w * Z);
    const int64_t first_row = ((layer * P + page) * Z) * K + kh;
    LoadPage<kPacked>(kc, first_row, K, n, X, kbuf);
    LoadPage<kPacked>(vc, first_row, K, n, X, vbuf);
    for (int64_t i = 0; i < Q; ++i) {
      const float* qi = &qv[i * X];
      float m_page = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < n; ++t) {
        const float* kt = kbuf + t * X;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t x = 0; x < X; ++x) dot += qi[x] * kt[x];
        s[t] = dot;
        m_page = std::max(m_page, dot);
      }
      const float m_new = std::max(m[i], m_page);
      const float c = std::exp(m[i] - m_new);
      float* a = &acc[i * X];
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t t = 0; t < n; ++t) {  // vectorised exp (libmvec)
        s[t] = std::exp(s[t] - m_new);
        sum += s[t];
      }
#pragma omp simd
      for (int64_t x = 0; x < X; ++x) a[x] *= c;
      for (int64_t t = 0; t < n; ++t) {
        const float p = s[t];
        const float* vt = vbuf + t * X;
#pragma omp simd
        for (int64_t x = 0; x < X; ++x) a[x] += p * vt[x];
      }
      l[i] = l[i] * c + sum;
      m[i] = m_new;
    }
  }
  for (int64_t i = 0; i < Q; ++i) {
    const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
    float* o = &out[(g * H + kh * Q + i) * X];
    for (int64_t x = 0; x < X; ++x) o[x] = acc[i * X + x] * inv;
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
  if (Z > kMaxPage || X > kMaxX)
    return ffi::Error::InvalidArgument("paged_decode: page size or head dim too large");
  const float* qp = q.typed_data();
  const void* kc = k_cache.untyped_data();
  const void* vc = v_cache.untyped_data();
  const int32_t* pg = pages.typed_data();
  const int32_t* lens = kv_len.typed_data();
  float* op = out->typed_data();
  const int64_t tasks = G * K;
  std::atomic<int64_t> next{0};
  std::function<void()> work = [&] {
    for (int64_t i = next.fetch_add(1); i < tasks; i = next.fetch_add(1)) {
      if (packed)
        Task<true>(i / K, i % K, qp, kc, vc, pg, lens, op, layer, P, Z, K, X, H, W);
      else
        Task<false>(i / K, i % K, qp, kc, vc, pg, lens, op, layer, P, Z, K, X, H, W);
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
