// The kernels' own small thread pool (shared by the native kernels in this folder).
#ifndef MLX_SCHED_NATIVE_POOL_H_
#define MLX_SCHED_NATIVE_POOL_H_

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace mlx_native {

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
    std::lock_guard<std::mutex> one_job(run_mu_);  // one job at a time, whoever calls
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
  std::mutex run_mu_, mu_;
  std::condition_variable cv_, done_;
  const std::function<void()>* job_ = nullptr;
  int64_t pending_ = 0;
  uint64_t generation_ = 0;
};

}  // namespace mlx_native

#endif  // MLX_SCHED_NATIVE_POOL_H_
