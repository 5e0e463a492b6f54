// The CPU kernels of torch's memcompile ops (kernels/cpu.py calls them through ctypes):
// memcompile_lookup and memcompile_lookup_scored, of memcompile::pk_lookup, and
// memcompile_decode, a whole memory layer's forward for a few tokens. The math is in
// cpu_kernels.h; kernels/native.py builds this file and ort_kernels.cc into one library.
//
// Threads: the entries run on `threads` OpenMP threads, where kernels/cpu.py passes more
// than one only when this library shares torch's OpenMP runtime, so the threads are torch's
// own pool (sized by torch.set_num_threads, which DataLoader workers set to 1: a second pool
// would fight torch's for the cores and hang a forked child).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_kernels.h"

namespace {

std::atomic<uint64_t> g_lookups{0};  // memcompile_lookup and memcompile_lookup_scored calls
std::atomic<uint64_t> g_decodes{0};  // memcompile_decode calls

// w[0, k) = the softmax of the scores w[0, k), best first: shifted by the best, w[0].
void softmax_sorted(float* w, int64_t k) {
  const float top = w[0];
  float total = 0.f;
  for (int64_t c = 0; c < k; ++c) total += (w[c] = std::exp(w[c] - top));
  for (int64_t c = 0; c < k; ++c) w[c] /= total;
}

// y[0, count) = bag[0, count) * silu(gate[0, count)): the Memory+ gating.
void silu_gate(const float* bag, const float* gate, int64_t count, float* y) {
  for (int64_t v = 0; v < count; ++v) y[v] = bag[v] * (gate[v] / (1.f + std::exp(-gate[v])));
}

// Each (token, head)'s knn best product keys from its halves' knn best: `best` and
// `best_ids` (H, 2, n, knn) hold each half's best scores, best first, and their sub-key
// indices. Writes rows (n, H * knn), the value rows i * n_keys + j, and weights
// (n, H * knn), each head's softmax over its knn sums: about k ln k sums a token and head,
// where the PyTorch reference materialises all k * k. The (token, head) pairs are split
// over the calling OpenMP team (one thread outside a parallel region), with a barrier at
// the end.
void select_products(const float* best, const int64_t* best_ids, int64_t n, int64_t heads,
                     int64_t n_keys, int64_t knn, int64_t* rows, float* weights) {
  TopKWork work(knn);
#pragma omp for schedule(static)
  for (int64_t th = 0; th < n * heads; ++th) {
    const int64_t t = th / heads, h = th % heads;
    for (int64_t side = 0; side < 2; ++side) {
      const int64_t from = ((2 * h + side) * n + t) * knn;
      for (int64_t c = 0; c < knn; ++c)
        work.halves[side * knn + c] = {best[from + c], best_ids[from + c]};
    }
    float* w = weights + (t * heads + h) * knn;
    best_sums(n_keys, knn, work, w, rows + (t * heads + h) * knn);
    softmax_sorted(w, knn);
  }
}

// The rest of the lookup for many tokens, from scores (2H, n, n_keys), row 2h + s for head
// h's half s (torch's batched matmul made them): for each token, each head's knn best
// product keys and their softmax, then the weighted bag of the heads' picks into out
// (n, v_dim) float32, times silu(gate) when gate (n, v_dim) is given. The tokens are split
// over the calling OpenMP team, and each token's picks stay in its thread's cache between
// the selection and the bag.
template <typename T>
void lookup_scored_team(const float* scores, int64_t n, int64_t heads, int64_t n_keys,
                        int64_t knn, const T* values, int64_t v_dim, const float* gate,
                        float* out) {
  TopKWork work(knn);
  std::vector<float> weights(heads * knn);
  std::vector<int64_t> rows(heads * knn);
#pragma omp for schedule(dynamic, 4)
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      const float* s0 = scores + (2 * h * n + t) * n_keys;
      float* w = weights.data() + h * knn;
      best_products(s0, s0 + n * n_keys, n_keys, knn, work, w, rows.data() + h * knn);
      softmax_sorted(w, knn);
    }
    float* y = out + t * v_dim;
    bag_columns(values, rows.data(), weights.data(), heads * knn, v_dim, 0, v_dim, y);
    if (gate != nullptr) silu_gate(y, gate + t * v_dim, v_dim, y);
  }
}

// What the threads of one lookup share: each half's knn best, then the picked rows and
// their weights.
struct Picks {
  Picks(int64_t n, int64_t heads, int64_t knn)
      : best(heads * 2 * n * knn), weights(n * heads * knn), best_ids(best.size()),
        rows(weights.size()) {}
  std::vector<float> best, weights;
  std::vector<int64_t> best_ids, rows;
};

// out (n, v_dim) float32 = the lookup of q (n, H, 2 * half) in keys (H, 2, n_keys, half),
// both float32: the half scores, each half's knn best, the products, the softmax and the
// weighted bag of the picked rows of values (n_keys^2, v_dim; float32, or float16 with
// `values_half`), times silu(gate) when gate (n, v_dim) is given. Run by every thread of
// the calling OpenMP team (or by one thread outside a parallel region); q and gate must be
// complete before, and out is complete only after the team's next barrier.
void lookup_team(Picks& picks, const float* q, const float* keys, int64_t n, int64_t heads,
                 int64_t n_keys, int64_t half, int64_t knn, const void* values, int values_half,
                 int64_t v_dim, const float* gate, float* out) {
  std::vector<float> scores(n * n_keys);
  TopKScratch scratch;
  std::vector<Item> top(knn);
#pragma omp for schedule(static)
  for (int64_t hs = 0; hs < heads * 2; ++hs) {  // (head, half): 2 * half wide slices of q
    score_keys(q + hs * half, heads * 2 * half, n, keys + hs * n_keys * half, n_keys, half,
               scores.data(), n_keys);
    for (int64_t t = 0; t < n; ++t) {
      top_k(scores.data() + t * n_keys, n_keys, knn, top.data(), scratch);
      for (int64_t c = 0; c < knn; ++c) {
        picks.best[(hs * n + t) * knn + c] = top[c].score;
        picks.best_ids[(hs * n + t) * knn + c] = top[c].position;
      }
    }
  }
  select_products(picks.best.data(), picks.best_ids.data(), n, heads, n_keys, knn,
                  picks.rows.data(), picks.weights.data());
  // Each thread sums its own columns of every picked row, so the rows' reads split evenly
  // and no partial sums need adding up.
  int64_t v0, v1;
  thread_columns(v_dim, v0, v1);
  const int64_t count = heads * knn;
  for (int64_t t = 0; t < n && v0 < v1; ++t) {
    const int64_t* rows = picks.rows.data() + t * count;
    const float* weights = picks.weights.data() + t * count;
    float* y = out + t * v_dim + v0;
    if (values_half)
      bag_columns(static_cast<const _Float16*>(values), rows, weights, count, v_dim, v0, v1, y);
    else
      bag_columns(static_cast<const float*>(values), rows, weights, count, v_dim, v0, v1, y);
    if (gate != nullptr) silu_gate(y, gate + t * v_dim + v0, v1 - v0, y);
  }
}

constexpr int64_t kLinearBlock = 16;  // rows of a weight a thread takes at a time

// y (n, rows) = x (n, cols) W^T + b for W (rows, cols) float32 and an optional bias b,
// split over the calling OpenMP team by blocks of rows, with no barrier at the end.
void linear_team(const float* x, int64_t n, const float* w, const float* b, int64_t rows,
                 int64_t cols, float* y) {
#pragma omp for schedule(static) nowait
  for (int64_t r0 = 0; r0 < rows; r0 += kLinearBlock) {
    const int64_t count = std::min(kLinearBlock, rows - r0);
    score_keys(x, cols, n, w + r0 * cols, count, cols, y + r0, rows);
    if (b != nullptr)
      for (int64_t t = 0; t < n; ++t)
        for (int64_t r = r0; r < r0 + count; ++r) y[t * rows + r] += b[r];
  }
}

}  // namespace

extern "C" {
__attribute__((visibility("default"))) uint64_t memcompile_lookup_calls() { return g_lookups; }
__attribute__((visibility("default"))) uint64_t memcompile_decode_calls() { return g_decodes; }

// memcompile::pk_lookup for many tokens, after torch's matmul of the half scores
// (`lookup_scored_team`).
__attribute__((visibility("default"))) void memcompile_lookup_scored(
    const float* scores, int64_t n, int64_t heads, int64_t n_keys, int64_t knn,
    const void* values, int values_half, int64_t v_dim, const float* gate, float* out,
    int threads) {
  ++g_lookups;
#pragma omp parallel num_threads(threads) if (threads > 1)
  if (values_half)
    lookup_scored_team(scores, n, heads, n_keys, knn, static_cast<const _Float16*>(values),
                       v_dim, gate, out);
  else
    lookup_scored_team(scores, n, heads, n_keys, knn, static_cast<const float*>(values), v_dim,
                       gate, out);
}

// The top-k of each of `rows` rows of n scores (`top_k`, which every kernel here and in
// ort_kernels.cc uses), for tests against a brute force.
__attribute__((visibility("default"))) void memcompile_top_k(
    const float* scores, int64_t rows, int64_t n, int64_t k, float* best, int64_t* best_ids) {
  TopKScratch scratch;
  std::vector<Item> top(k);
  for (int64_t r = 0; r < rows; ++r) {
    top_k(scores + r * n, n, k, top.data(), scratch);
    for (int64_t c = 0; c < k; ++c)
      best[r * k + c] = top[c].score, best_ids[r * k + c] = top[c].position;
  }
}

// memcompile::pk_lookup for few tokens, whole (`lookup_team`).
__attribute__((visibility("default"))) void memcompile_lookup(
    const float* q, const float* keys, int64_t n, int64_t heads, int64_t n_keys, int64_t half,
    int64_t knn, const void* values, int values_half, int64_t v_dim, const float* gate,
    float* out, int threads) {
  ++g_lookups;
  Picks picks(n, heads, knn);
#pragma omp parallel num_threads(threads) if (threads > 1)
  lookup_team(picks, q, keys, n, heads, n_keys, half, knn, values, values_half, v_dim, gate,
              out);
}

// A memory layer's forward for few tokens x (n, d_in), all float32 but the values: the
// query projection (wq (H * 2 * half, d_in), bias bq), the Memory+ gate's projection when
// ws (v_dim, d_in) is given, the lookup (`lookup_team`), and the output projection when wo
// (d_out, v_dim) is given; y is (n, d_out), or (n, v_dim) without wo. Biases may be null.
__attribute__((visibility("default"))) void memcompile_decode(
    const float* x, int64_t n, int64_t d_in, const float* wq, const float* bq, const float* ws,
    const float* bs, const float* wo, const float* bo, int64_t d_out, const float* keys,
    int64_t heads, int64_t n_keys, int64_t half, int64_t knn, const void* values,
    int values_half, int64_t v_dim, float* y, int threads) {
  ++g_decodes;
  Picks picks(n, heads, knn);
  std::vector<float> q(n * heads * 2 * half), gate(ws ? n * v_dim : 0), bag(wo ? n * v_dim : 0);
  float* looked_up = wo ? bag.data() : y;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    linear_team(x, n, wq, bq, heads * 2 * half, d_in, q.data());
    if (ws != nullptr) linear_team(x, n, ws, bs, v_dim, d_in, gate.data());
#pragma omp barrier
    lookup_team(picks, q.data(), keys, n, heads, n_keys, half, knn, values, values_half, v_dim,
                ws ? gate.data() : nullptr, looked_up);
    if (wo != nullptr) {
#pragma omp barrier
      linear_team(looked_up, n, wo, bo, d_out, v_dim, y);
    }
  }
}
}
