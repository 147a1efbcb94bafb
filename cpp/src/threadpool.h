// A small fixed thread pool for splitting the rows of a matrix (or heads of attention) over N
// threads. A decode step is ~200 short parallel_for calls, so a hand-off through a condition variable
// alone (futex wake + sleep per call) costs more than the matmuls on a small machine: workers and the
// caller first spin on atomics for a short while (50 µs by the clock; BITBASIS_SPIN=<µs>), and only then
// sleep on the condition variables, so no core is burnt between generations.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace bb {

class ThreadPool {
public:
    explicit ThreadPool(int n_threads);
    ~ThreadPool();
    ThreadPool(const ThreadPool &) = delete;
    ThreadPool &operator=(const ThreadPool &) = delete;

    int size() const { return n_threads_; }
    // Run fn(i0, i1, thread_id) over [0, n) split into contiguous chunks, one per thread; chunk
    // boundaries are multiples of `align` (except the end). The caller's thread does chunk 0.
    // Returns when every chunk is done. Not reentrant.
    void parallel_for(int64_t n, int64_t align, const std::function<void(int64_t, int64_t, int)> &fn);

private:
    void worker(int id);
    int n_threads_;
    std::vector<std::thread> threads_;
    std::mutex mu_;
    std::condition_variable cv_start_, cv_done_;
    // job_, n_, align_ are written by the caller before generation_ is bumped (release) and read by a
    // worker after it sees the new generation (acquire); the caller waits for pending_ == 0 before
    // the next write, so they never change under a running worker.
    const std::function<void(int64_t, int64_t, int)> *job_ = nullptr;
    int64_t n_ = 0, align_ = 1;
    std::atomic<uint64_t> generation_{0};
    std::atomic<int> pending_{0};
    std::atomic<bool> stop_{false};
};

}  // namespace bb
