// Threads for the CPU kernels. Built with OpenMP (the default), the kernels run on the OpenMP runtime
// that torch already loaded: torch's wheels ship libgomp.so.1 and the loader reuses an already-loaded
// soname, so our parallel regions use torch's own thread team. No second pool competes with torch's
// spinning workers on the same cores (measured: with a separate pool, SmolLM2 decode on 2 cores spent
// 5.7x longer in our kernels). Without OpenMP, a persistent std::thread pool is the fallback (it can
// also be selected at run time, which is how the tests exercise it).
#ifdef _OPENMP
#include <omp.h>
#endif
#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "kernels.h"

namespace qruntime::cpu {
namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

class Pool {
 public:
  void run(int64_t n, int threads, TaskFn fn, void* ctx) {
    std::lock_guard<std::mutex> serial(run_mu_);
    if (threads > n) threads = static_cast<int>(n);
    if (threads <= 1) {
      fn(ctx, 0, n);
      return;
    }
    grow(threads - 1);
    fn_ = fn;
    ctx_ = ctx;
    n_ = n;
    threads_ = threads;
    pending_.store(threads - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(mu_);
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    fn(ctx, 0, n / threads);
    for (int spins = 0; pending_.load(std::memory_order_acquire) != 0; ++spins) {
      if (spins < (1 << 16)) cpu_relax(); else std::this_thread::yield();
    }
  }

 private:
  void grow(int count) {
    while (static_cast<int>(workers_.size()) < count) {
      const int id = static_cast<int>(workers_.size()) + 1;
      const uint64_t start = gen_.load(std::memory_order_acquire);  // before this run's increment
      workers_.emplace_back([this, id, start] { loop(id, start); });
      workers_.back().detach();  // the pool lives for the whole process
    }
  }

  void loop(int id, uint64_t seen) {
    for (;;) {
      uint64_t g;
      int spins = 0;
      while ((g = gen_.load(std::memory_order_acquire)) == seen && spins < 4000) {
        cpu_relax();
        ++spins;
      }
      if (g == seen) {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return gen_.load(std::memory_order_acquire) != seen; });
        g = gen_.load(std::memory_order_acquire);
      }
      seen = g;
      if (id < threads_) {
        const int64_t begin = n_ * id / threads_, end = n_ * (id + 1) / threads_;
        if (begin < end) fn_(ctx_, begin, end);
        pending_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  std::mutex run_mu_, mu_;
  std::condition_variable cv_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> pending_{0};
  TaskFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_ = 0;
  int threads_ = 0;
};

// Leaked on purpose: no destructor races with detached workers at exit. A forked child gets a fresh
// pool (the parent's workers do not exist there).
Pool* g_pool = nullptr;
std::once_flag g_once;

void reset_after_fork() { g_pool = new Pool(); }

Pool& pool() {
  std::call_once(g_once, [] {
    g_pool = new Pool();
    pthread_atfork(nullptr, nullptr, reset_after_fork);
  });
  return *g_pool;
}

#ifdef _OPENMP
std::atomic<bool> g_use_pool{false};
#else
std::atomic<bool> g_use_pool{true};
#endif

}  // namespace

bool openmp_available() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

bool use_thread_pool(bool on) {
  if (!on && !openmp_available()) return false;
  g_use_pool.store(on);
  return true;
}

bool using_thread_pool() { return g_use_pool.load(); }

void parallel_for(int64_t n, int threads, TaskFn fn, void* ctx) {
  if (n <= 0) return;
  if (threads > n) threads = static_cast<int>(n);
#ifdef _OPENMP
  if (!g_use_pool.load(std::memory_order_relaxed)) {
    if (threads <= 1 || omp_in_parallel()) {
      fn(ctx, 0, n);
      return;
    }
#pragma omp parallel num_threads(threads)
    {
      const int64_t t = omp_get_thread_num(), count = omp_get_num_threads();
      const int64_t begin = n * t / count, end = n * (t + 1) / count;
      if (begin < end) fn(ctx, begin, end);
    }
    return;
  }
#endif
  pool().run(n, threads < 1 ? 1 : threads, fn, ctx);
}

}  // namespace qruntime::cpu
