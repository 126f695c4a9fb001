// Sybil's own thread pool for the CPU kernels: work split into many small chunks
// that whichever thread is running takes, and idle threads that sleep instead of
// spinning.
//
// Why not at::parallel_for (OpenMP): it splits a range statically, one part per
// thread, and ends each region at a barrier. When another program takes a core,
// the descheduled thread's whole part waits for it, at every one of the hundred
// or more regions of a decode step, while the running thread spins on the core
// the descheduled one needs; and OpenMP's workers spin between regions, so they
// use their full share of the CPU and the scheduler preempts them for long slices.
// Here the caller works too and claims chunks from one counter, so a late or
// descheduled helper holds up at most the one chunk it took; helpers spin only
// briefly, then sleep (accruing the scheduler's credit, so they run promptly when
// woken); and the caller waiting for a helper's last chunk yields its core.
//
// SYBIL_POOL=openmp runs the same chunks through at::parallel_for instead, as
// before this pool existed: the benchmark's A/B (bench/busy.py) and nothing else.
//
// Bits: each chunk's outputs are computed by one thread in a fixed order, whatever
// thread takes it, so results never depend on the thread count or the timing.

#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace sybil {

class Pool {
 public:
  // The process's pool; its size comes from set_threads (torch.ops.sybil.set_threads)
  // or, before any call, SYBIL_THREADS, else the hardware's thread count.
  static Pool& get() {
    static Pool pool;
    return pool;
  }

  int threads() const { return static_cast<int>(workers_.size()) + 1; }

  void set_threads(int n) {
    n = std::min(std::max(1, n), MAX_PARTS);
    std::lock_guard<std::mutex> no_job(run_mutex_);
    serial_left_ = window_n_ = bad_windows_ = 0;
    serial_len_ = SERIAL_MIN;
    window_run_ = window_wait_ = 0;
    if (openmp_) {
      at::set_num_threads(n);
      return;
    }
    if (n == threads()) return;
    stop_workers();
    start_workers(n - 1);
  }

  // fn(lo, hi) over [0, n) in chunks of `grain`; returns once every chunk is done.
  void run(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    if (n <= 0) return;
    if (openmp_) {
      at::parallel_for(0, n, grain, fn);
      return;
    }
    grain = std::max<int64_t>(1, grain);
    const int64_t chunks = (n + grain - 1) / grain;
    std::lock_guard<std::mutex> one_job(run_mutex_);  // callers from several threads take turns
    const int parts = static_cast<int>(std::min<int64_t>(threads(), chunks));
    if (parts == 1 || serial_left_ > 0) {
      if (parts > 1) {
        --serial_left_;
        ++stats_.serial;
      }
      fn(0, n);
      return;
    }
    const auto t0 = std::chrono::steady_clock::now();
    job_ = Job{&fn, n, grain};
    done_.store(0, std::memory_order_relaxed);
    for (int t = 0; t < parts; ++t) {
      const uint64_t lo = chunks * t / parts, hi = chunks * (t + 1) / parts;
      part_[t].range.store((lo << 32) | hi, std::memory_order_release);
    }
    parts_.store(parts, std::memory_order_release);
    // seq_cst on both sides (here and the helper's sleeping_ increment before it
    // rereads epoch_): a helper about to sleep either sees this job or is counted.
    epoch_.fetch_add(1, std::memory_order_seq_cst);
    if (sleeping_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lk(sleep_mutex_);
      sleep_cv_.notify_all();
    }
    work(0);
    // Chunks a helper took may still run: wait for them, yielding in case that
    // helper needs this core.
    const auto t1 = std::chrono::steady_clock::now();
    for (int spins = 0; done_.load(std::memory_order_acquire) < chunks; ++spins) {
      if (spins < 64) _mm_pause(); else std::this_thread::yield();
    }
    account(t0, t1, std::chrono::steady_clock::now());
  }

  // What the regions cost: counts and seconds (the waits are the caller's, for the
  // chunks helpers had taken), for the benchmark and for the serial fallback below.
  struct Stats {
    int64_t regions = 0, serial = 0, fallbacks = 0;
    double run_s = 0, wait_s = 0;
  };
  Stats stats() {
    std::lock_guard<std::mutex> lk(run_mutex_);
    return stats_;
  }

  ~Pool() { stop_workers(); }

 private:
  static constexpr int MAX_PARTS = 64;

  // The serial fallback: when, in two windows of parallel regions in a row, the
  // caller spent more than STALL_LIMIT of their time in stalls (waits of STALL_S or
  // more for a chunk a helper had taken: the helper was descheduled mid-chunk, since
  // another program holds its core, and a scheduler slice is milliseconds), the next
  // regions run on the caller alone, which then has a core to itself and never
  // waits; then parallel regions are tried again. The serial stretch starts short
  // and doubles while the machine stays busy (up to SERIAL_MAX regions, about a
  // second of gpt2-medium decoding); a clean window starts it over. Shorter waits (a
  // helper that woke late, or ended its last chunk a little after the caller) are
  // normal on a quiet machine, and a lone stall costs no more than a short stretch.
  static constexpr int WINDOW = 48;
  static constexpr double STALL_S = 1e-3, STALL_LIMIT = 0.2;
  static constexpr int SERIAL_MIN = 250, SERIAL_MAX = 8000;

  void account(std::chrono::steady_clock::time_point t0, std::chrono::steady_clock::time_point t1,
               std::chrono::steady_clock::time_point t2) {
    const double run = std::chrono::duration<double>(t2 - t0).count();
    const double wait = std::chrono::duration<double>(t2 - t1).count();
    ++stats_.regions;
    stats_.run_s += run;
    stats_.wait_s += wait;
    window_run_ += run;
    if (wait >= STALL_S) window_wait_ += wait;
    if (++window_n_ < WINDOW) return;
    if (window_wait_ > STALL_LIMIT * window_run_) {
      if (++bad_windows_ >= 2) {
        serial_left_ = serial_len_;
        serial_len_ = std::min(2 * serial_len_, SERIAL_MAX);
        ++stats_.fallbacks;
      }
    } else {
      bad_windows_ = 0;
      serial_len_ = SERIAL_MIN;
    }
    window_n_ = 0;
    window_run_ = window_wait_ = 0;
  }

  struct Job {
    const std::function<void(int64_t, int64_t)>* fn = nullptr;
    int64_t n = 0, grain = 1;
  };

  // Each thread owns a contiguous part of the chunks and takes them from its front,
  // in order (one stream through the weights, as a static split has); a thread
  // whose part is done takes the other parts' chunks from their backs. A part's
  // range is one word, (next << 32) | end, changed only by compare-and-swap, so a
  // chunk is taken once; a helper that wakes after the job ended finds every range
  // empty, and one that takes a chunk reads job_ only after taking it (the job
  // cannot end before that chunk is done).
  struct alignas(64) Part {
    std::atomic<uint64_t> range{0};
  };

  bool take(int t, bool front, int64_t* chunk) {
    uint64_t r = part_[t].range.load(std::memory_order_acquire);
    while (true) {
      const uint64_t lo = r >> 32, hi = r & 0xffffffffu;
      if (lo >= hi) return false;
      const uint64_t want = front ? r + (uint64_t(1) << 32) : r - 1;
      if (part_[t].range.compare_exchange_weak(r, want, std::memory_order_acq_rel, std::memory_order_acquire)) {
        *chunk = static_cast<int64_t>(front ? lo : hi - 1);
        return true;
      }
    }
  }

  void run_chunk(int64_t chunk) {
    const Job job = job_;
    const int64_t lo = chunk * job.grain, hi = std::min(job.n, lo + job.grain);
    (*job.fn)(lo, hi);
    done_.fetch_add(1, std::memory_order_acq_rel);
  }

  // Thread `self`'s share: its own part front to back, then the others' from the back.
  void work(int self) {
    // Parts past this job's count are empty (an earlier, wider job emptied them).
    const int parts = parts_.load(std::memory_order_acquire);
    int64_t chunk;
    if (self < parts)
      while (take(self, true, &chunk)) run_chunk(chunk);
    for (int k = 1; k < parts; ++k) {
      const int t = (self + k) % parts;
      while (take(t, false, &chunk)) run_chunk(chunk);
    }
  }

  Pool() {
    int n = static_cast<int>(std::thread::hardware_concurrency());
    if (const char* env = std::getenv("SYBIL_THREADS")) n = std::atoi(env);
    const char* mode = std::getenv("SYBIL_POOL");
    openmp_ = mode != nullptr && std::string(mode) == "openmp";
    start_workers(openmp_ ? 0 : std::min(std::max(1, n), MAX_PARTS) - 1);
  }

  void helper(int self) {
    uint64_t seen = epoch_.load(std::memory_order_acquire);
    while (true) {
      // Between the regions of one forward the next job comes within microseconds:
      // spin that long, then sleep, so an idle helper does not hold a core.
      uint64_t epoch = seen;
      for (int spins = 0; spins < SPIN && epoch == seen && !stop_.load(std::memory_order_relaxed); ++spins) {
        _mm_pause();
        epoch = epoch_.load(std::memory_order_acquire);
      }
      if (epoch == seen) {
        std::unique_lock<std::mutex> lk(sleep_mutex_);
        sleeping_.fetch_add(1, std::memory_order_seq_cst);
        sleep_cv_.wait(lk, [&] {
          return stop_.load(std::memory_order_relaxed) || epoch_.load(std::memory_order_seq_cst) != seen;
        });
        sleeping_.fetch_sub(1, std::memory_order_acq_rel);
        epoch = epoch_.load(std::memory_order_acquire);
      }
      if (stop_.load(std::memory_order_relaxed)) return;
      seen = epoch;
      work(self);
    }
  }

  void start_workers(int n) {
    stop_.store(false);
    for (int i = 1; i <= n; ++i) workers_.emplace_back([this, i] { helper(i); });
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lk(sleep_mutex_);
      stop_.store(true);
      sleep_cv_.notify_all();
    }
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  static constexpr int SPIN = 20000;  // about 50-100 us of pause instructions

  std::vector<std::thread> workers_;
  std::mutex run_mutex_, sleep_mutex_;
  std::condition_variable sleep_cv_;
  Part part_[MAX_PARTS];
  std::atomic<uint64_t> epoch_{0};
  std::atomic<int> parts_{1};
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleeping_{0};
  std::atomic<bool> stop_{false};
  bool openmp_ = false;
  Job job_;
  // guarded by run_mutex_
  Stats stats_;
  int window_n_ = 0, serial_left_ = 0, bad_windows_ = 0, serial_len_ = SERIAL_MIN;
  double window_run_ = 0, window_wait_ = 0;
};

}  // namespace sybil
