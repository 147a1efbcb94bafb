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
    // Run fn(i0, i1, thread_id) over [0, n) split into contiguous pieces (about 4 per thread) whose
    // boundaries are multiples of `align` (except the end); threads, the caller's included (id 0), take
    // the next piece until none is left. Returns when every piece is done. A thread that the OS has
    // descheduled (a shared machine) thus delays the call by at most the piece it holds: the others take
    // the rest, where one fixed chunk per thread made the caller wait for a whole time slice. fn must
    // give every index the same result whichever thread runs it (rows of a matrix, heads, tokens) and
    // may run several times on one thread. Not reentrant.
    void parallel_for(int64_t n, int64_t align, const std::function<void(int64_t, int64_t, int)> &fn);

private:
    void worker(int id);
    void run_pieces(int id);   // take and run pieces until none is left
    int n_threads_;
    std::vector<std::thread> threads_;
    std::mutex mu_;
    std::condition_variable cv_start_, cv_done_;
    // work_ = next unit << 32 | units (a unit = `align` indices): a thread owns the units [next, next + k)
    // it moved next past with a compare-exchange. job_, n_, align_ are written by the caller before
    // work_ is stored (release) and read by a thread only after its compare-exchange succeeded
    // (acquire); the caller waits for done_ == units before it writes them again, so they never change
    // under a piece. A thread that woke late can only take pieces of the job that is current then.
    const std::function<void(int64_t, int64_t, int)> *job_ = nullptr;
    int64_t n_ = 0, align_ = 1;
    std::atomic<uint64_t> work_{0};
    std::atomic<int64_t> piece_{1};   // units per piece
    std::atomic<int64_t> done_{0};    // units finished
    std::atomic<uint64_t> generation_{0};   // bumped per call: wakes the workers
    std::atomic<bool> stop_{false};
};

}  // namespace bb
