// The CPU kernels of the separate, differentiable ops that a memory layer runs when it needs
// gradients: memcompile_pk_topk (the forward of memcompile::pk_topk, after torch's matmul of
// the half scores) and memcompile_bag_backward (memcompile::bag_backward). kernels/cpu.py
// calls them through ctypes; the math is in cpu_kernels.h. Threads as in decode_kernels.cc:
// torch's own OpenMP pool where the library shares torch's runtime, else one.
#include <atomic>
#include <cstdint>

#include "cpu_kernels.h"

namespace {

std::atomic<uint64_t> g_training{0};  // memcompile_pk_topk and memcompile_bag_backward calls

}  // namespace

extern "C" {
__attribute__((visibility("default"))) uint64_t memcompile_training_calls() { return g_training; }

// memcompile::pk_topk's product keys (`best_products_team`), after torch's matmul of the
// half scores.
__attribute__((visibility("default"))) void memcompile_pk_topk(
    const float* scores, int64_t n, int64_t heads, int64_t n_keys, int64_t knn, float* best,
    int64_t* rows, int threads) {
  ++g_training;
#pragma omp parallel num_threads(threads) if (threads > 1)
  best_products_team(scores, n, heads, n_keys, knn, best, rows);
}

// The gradients of y[t] = sum_b w[t, b] values[ids[t, b]] for g = dL/dy (n, v_dim), all
// float32: grad_w[t, b] = values[ids[t, b]] . g[t], and grad_values (the table's shape,
// zeroed by the caller) += w[t, b] g[t] at row ids[t, b]. The tokens' dot products are split
// over the threads; the table's gradient by columns, each thread adding every pair to its
// own columns in pair order: no atomics, and the same bits on any number of threads.
__attribute__((visibility("default"))) void memcompile_bag_backward(
    const float* grad_out, const float* values, const int64_t* ids, const float* w, int64_t n,
    int64_t picks, int64_t v_dim, float* grad_values, float* grad_w, int threads) {
  ++g_training;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
#pragma omp for schedule(static) nowait
    for (int64_t p = 0; p < n * picks; ++p)
      grad_w[p] = dot(values + ids[p] * v_dim, grad_out + p / picks * v_dim, v_dim);
    int64_t v0, v1;
    thread_columns(v_dim, v0, v1);
    for (int64_t p = 0; p < n * picks && v0 < v1; ++p) {
      const float weight = w[p];
      const float* g = grad_out + p / picks * v_dim + v0;
      float* row = grad_values + ids[p] * v_dim + v0;
#pragma omp simd
      for (int64_t v = 0; v < v1 - v0; ++v) row[v] += weight * g[v];
    }
  }
}
}
