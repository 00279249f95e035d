// The kernels' own small thread pool (shared by the native kernels in this folder).
#ifndef MLX_SCHED_NATIVE_POOL_H_
#define MLX_SCHED_NATIVE_POOL_H_

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace mlx_native {

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// A small persistent pool of its own: XLA's intra-op pool is often busy with the thunk
// executor itself when a custom call runs, which left the kernel on one core.
//
// A serving step makes ~70 native calls a few tens of microseconds apart. Waking a worker
// blocked on a condition variable took 70-80 us per call on this project's 2-core VM (about
// 5 ms of a 25 ms decode step), so a worker that finishes a job spins for kSpin, yielding
// its core to any other runnable thread between checks, before it blocks; the caller, too,
// spins before it blocks waiting for the workers.
class Pool {
 public:
  static constexpr std::chrono::microseconds kSpin{300};

  static Pool& Get() {
    static Pool* pool = new Pool(std::max(1u, std::thread::hardware_concurrency()) - 1);
    return *pool;
  }
  int64_t workers() const { return static_cast<int64_t>(threads_.size()); }

  // Runs fn() on every worker and on the caller; returns when all have finished.
  void Run(const std::function<void()>& fn) {
    std::lock_guard<std::mutex> one_job(run_mu_);  // one job at a time, whoever calls
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = &fn;
      pending_.store(workers(), std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();  // only blocked workers need it; spinning ones see the generation
    fn();
    if (!SpinUntil([&] { return pending_.load(std::memory_order_acquire) == 0; })) {
      std::unique_lock<std::mutex> lock(mu_);
      done_.wait(lock, [&] { return pending_.load(std::memory_order_acquire) == 0; });
    }
    job_ = nullptr;
  }

 private:
  explicit Pool(unsigned n) {
    for (unsigned i = 0; i < n; ++i) threads_.emplace_back([this] { Loop(); });
    for (auto& t : threads_) t.detach();
  }

  // Spins until done() or kSpin has passed; true when done() held.
  template <typename Done>
  static bool SpinUntil(Done done) {
    const auto until = std::chrono::steady_clock::now() + kSpin;
    for (int i = 0;; ++i) {
      if (done()) return true;
      CpuRelax();
      if (i % 64 == 63) {
        if (std::chrono::steady_clock::now() > until) return false;
        sched_yield();  // let another runnable thread (XLA's) have this core
      }
    }
  }

  void Loop() {
    uint64_t seen = 0;
    while (true) {
      auto fresh = [&] { return generation_.load(std::memory_order_acquire) != seen; };
      if (!SpinUntil(fresh)) {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, fresh);
      }
      const std::function<void()>* job;
      {
        std::lock_guard<std::mutex> lock(mu_);  // job_ and generation_ were set together
        seen = generation_.load(std::memory_order_acquire);
        job = job_;
      }
      (*job)();
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lock(mu_);  // a caller about to block sees the count
        done_.notify_all();
      }
    }
  }

  std::vector<std::thread> threads_;
  std::mutex run_mu_, mu_;
  std::condition_variable cv_, done_;
  const std::function<void()>* job_ = nullptr;
  std::atomic<int64_t> pending_{0};
  std::atomic<uint64_t> generation_{0};
};

}  // namespace mlx_native

#endif  // MLX_SCHED_NATIVE_POOL_H_
