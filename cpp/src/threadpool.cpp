#include "threadpool.h"

#include <algorithm>

namespace bb {

static void chunk(int64_t n, int64_t align, int parts, int i, int64_t &a, int64_t &b) {
    int64_t units = (n + align - 1) / align;
    int64_t per = units / parts, extra = units % parts;
    int64_t u0 = i * per + std::min<int64_t>(i, extra);
    int64_t u1 = u0 + per + (i < extra ? 1 : 0);
    a = std::min(n, u0 * align);
    b = std::min(n, u1 * align);
}

ThreadPool::ThreadPool(int n_threads) : n_threads_(std::max(1, n_threads)) {
    for (int i = 1; i < n_threads_; i++) threads_.emplace_back(&ThreadPool::worker, this, i);
}

ThreadPool::~ThreadPool() {
    {
        std::lock_guard<std::mutex> lk(mu_);
        stop_ = true;
    }
    cv_start_.notify_all();
    for (auto &t : threads_) t.join();
}

void ThreadPool::worker(int id) {
    uint64_t seen = 0;
    for (;;) {
        const std::function<void(int64_t, int64_t, int)> *job;
        int64_t n, align;
        {
            std::unique_lock<std::mutex> lk(mu_);
            cv_start_.wait(lk, [&] { return stop_ || generation_ != seen; });
            if (stop_) return;
            seen = generation_;
            job = job_;
            n = n_;
            align = align_;
        }
        int64_t a, b;
        chunk(n, align, n_threads_, id, a, b);
        if (a < b) (*job)(a, b, id);
        {
            std::lock_guard<std::mutex> lk(mu_);
            if (--pending_ == 0) cv_done_.notify_one();
        }
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
    {
        std::lock_guard<std::mutex> lk(mu_);
        job_ = &fn;
        n_ = n;
        align_ = align;
        pending_ = n_threads_ - 1;
        generation_++;
    }
    cv_start_.notify_all();
    int64_t a, b;
    chunk(n, align, n_threads_, 0, a, b);
    if (a < b) fn(a, b, 0);
    std::unique_lock<std::mutex> lk(mu_);
    cv_done_.wait(lk, [&] { return pending_ == 0; });
}

}  // namespace bb
