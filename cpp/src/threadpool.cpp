#include "threadpool.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>

namespace bb {

ThreadPool::ThreadPool(int n_threads) : n_threads_(std::max(1, n_threads)) {
    for (int i = 1; i < n_threads_; i++) threads_.emplace_back(&ThreadPool::worker, this, i);
}

// How long a waiting thread spins before it sleeps, in µs: BITBASIS_SPIN=<µs> (0: sleep at once). A decode
// step hands work to the threads ~150 times (SmolLM2: 5 per layer), a few µs to ~100 µs apart, so a spin
// of 50 µs catches nearly every next job without a futex wake (~10-50 µs each on a VM), while a thread
// whose partner was descheduled (a shared machine) gives its core back after 50 µs, not after a fixed
// count of pause instructions whose length differs 20x between CPUs (Zen 2: ~65 cycles, Skylake-X ~140,
// Zen 1 ~3).
static std::chrono::nanoseconds spin_budget() {
    static const std::chrono::nanoseconds ns = [] {
        const char *e = std::getenv("BITBASIS_SPIN");
        return std::chrono::nanoseconds(1000LL * (e && *e ? std::max(0, std::atoi(e)) : 50));
    }();
    return ns;
}

static inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield");
#endif
}

// Spin until done() or the budget is spent (the clock read once per 32 pauses); true when done().
template <class Done>
static bool spin_until(Done done) {
    const auto budget = spin_budget();
    if (budget.count() == 0) return done();
    const auto end = std::chrono::steady_clock::now() + budget;
    for (;;) {
        for (int i = 0; i < 32; i++) {
            if (done()) return true;
            cpu_relax();
        }
        if (std::chrono::steady_clock::now() >= end) return done();
    }
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lk(mu_);
        stop_.store(true, std::memory_order_release);
    }
    cv_start_.notify_all();
    for (auto &t : threads_) t.join();
}

void ThreadPool::run_pieces(int id) {
    uint64_t w = work_.load(std::memory_order_acquire);
    for (;;) {
        const int64_t next = (int64_t)(w >> 32), units = (int64_t)(w & 0xffffffffu);
        if (next >= units) return;
        const int64_t take = std::min(piece_.load(std::memory_order_relaxed), units - next);
        if (!work_.compare_exchange_weak(w, w + ((uint64_t)take << 32), std::memory_order_acq_rel,
                                         std::memory_order_acquire))
            continue;   // w now holds the current value
        (*job_)(next * align_, std::min(n_, (next + take) * align_), id);
        if (done_.fetch_add(take, std::memory_order_acq_rel) + take == units) {
            std::lock_guard<std::mutex> lk(mu_);   // a caller past its spin waits on cv_done_ under mu_
            cv_done_.notify_one();
        }
        w = work_.load(std::memory_order_acquire);
    }
}

void ThreadPool::worker(int id) {
    uint64_t seen = 0;
    for (;;) {
        auto ready = [&] { return stop_.load(std::memory_order_acquire) || generation_.load(std::memory_order_acquire) != seen; };
        if (!spin_until(ready)) {   // the lock orders this check against the caller's bump of generation_
            std::unique_lock<std::mutex> lk(mu_);
            cv_start_.wait(lk, ready);
        }
        if (stop_.load(std::memory_order_acquire)) return;
        seen = generation_.load(std::memory_order_acquire);
        run_pieces(id);
    }
}

void ThreadPool::parallel_for(int64_t n, int64_t align, const std::function<void(int64_t, int64_t, int)> &fn) {
    if (n <= 0) return;
    align = std::max<int64_t>(1, align);
    // Too little work to be worth waking anyone.
    if (n_threads_ == 1 || n <= align) {
        fn(0, n, 0);
        return;
    }
    while ((n + align - 1) / align > 0x7fffffff) align *= 2;   // units fit work_'s 32 bits
    const int64_t units = (n + align - 1) / align;
    job_ = &fn;
    n_ = n;
    align_ = align;
    piece_.store(std::max<int64_t>(1, units / (4 * n_threads_)), std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    work_.store((uint64_t)units, std::memory_order_release);   // next = 0
    {
        std::lock_guard<std::mutex> lk(mu_);   // a worker past its spin checks generation_ under mu_
        generation_.fetch_add(1, std::memory_order_release);
    }
    cv_start_.notify_all();
    run_pieces(0);
    auto done = [&] { return done_.load(std::memory_order_acquire) == units; };
    if (!spin_until(done)) {
        std::unique_lock<std::mutex> lk(mu_);
        cv_done_.wait(lk, done);
    }
}

}  // namespace bb
