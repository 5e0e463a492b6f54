// The CPU kernels of torch's memcompile ops (kernels/cpu.py calls them through ctypes):
// memcompile_lookup and memcompile_lookup_scored, of memcompile::pk_lookup, and
// memcompile_decode, a whole memory layer's forward for a few tokens. The math is in
// cpu_kernels.h; kernels/native.py builds this file, training_kernels.cc and ort_kernels.cc
// into one library.
//
// Threads: the entries run on `threads` OpenMP threads, where kernels/cpu.py passes more
// than one only when this library shares torch's OpenMP runtime, so the threads are torch's
// own pool (sized by torch.set_num_threads, which DataLoader workers set to 1: a second pool
// would fight torch's for the cores and hang a forked child).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>
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

// The same where the layer is bfloat16, rounded where its ops round: the bag (in the
// table's dtype), silu(gate) and the product, each to bfloat16.
void silu_gate_bf16(const float* bag, const float* gate, int64_t count, float* y) {
  for (int64_t v = 0; v < count; ++v)
    y[v] = round_bf16(round_bf16(bag[v]) * round_bf16(gate[v] / (1.f + std::exp(-gate[v]))));
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

// What the threads of one lookup share: the half scores, then the picked rows and their
// weights.
struct Picks {
  Picks(int64_t n, int64_t heads, int64_t n_keys, int64_t knn)
      : scores(heads * 2 * n * n_keys), weights(n * heads * knn), rows(weights.size()) {}
  std::vector<float> scores, weights;
  std::vector<int64_t> rows;
};

// The lookup of q (n, H, 2 * half) float32 in keys (H, 2, n_keys, half), float32 or
// bfloat16, up to the picks: the half scores, each (token, head)'s product keys and their
// softmax into `picks`. Run by every thread of the calling OpenMP team (or by one thread
// outside a parallel region), q complete before; `picks` is complete after it returns.
template <typename TK>
void pick_team(Picks& picks, const float* q, const TK* keys, int64_t n, int64_t heads,
               int64_t n_keys, int64_t half, int64_t knn) {
#pragma omp for schedule(static)
  for (int64_t hs = 0; hs < heads * 2; ++hs)  // (head, half): 2 * half wide slices of q
    score_keys(q + hs * half, heads * 2 * half, n, keys + hs * n_keys * half, n_keys, half,
               picks.scores.data() + hs * n * n_keys, n_keys);
  best_products_team(picks.scores.data(), n, heads, n_keys, knn, picks.weights.data(),
                     picks.rows.data());
#pragma omp for schedule(static)
  for (int64_t th = 0; th < n * heads; ++th) softmax_sorted(picks.weights.data() + th * knn, knn);
}

// out (n, v_dim) float32 = the weighted bag of the picked rows of values (n_keys^2, v_dim;
// float32, float16 or bfloat16), times silu(gate) when gate (n, v_dim) is given. Each
// thread of the team sums its own columns of every picked row, so the rows' reads split
// evenly and no partial sums need adding up; out is complete after the team's next barrier.
// With `bf16`, rounded where a bfloat16 layer's ops round (`silu_gate_bf16`, or the bag).
template <typename TV>
void bag_team(const Picks& picks, int64_t n, int64_t count, const TV* values, int64_t v_dim,
              const float* gate, float* out, bool bf16 = false) {
  int64_t v0, v1;
  thread_columns(v_dim, v0, v1);
  for (int64_t t = 0; t < n && v0 < v1; ++t) {
    float* y = out + t * v_dim + v0;
    bag_columns(values, picks.rows.data() + t * count, picks.weights.data() + t * count,
                count, v_dim, v0, v1, y);
    if (gate != nullptr && bf16) silu_gate_bf16(y, gate + t * v_dim + v0, v1 - v0, y);
    else if (gate != nullptr) silu_gate(y, gate + t * v_dim + v0, v1 - v0, y);
    else if (bf16) std::transform(y, y + (v1 - v0), y, round_bf16);
  }
}

constexpr int64_t kLinearBlock = 16;  // rows of a weight a thread takes at a time

// y (n, rows) = x (n, cols) W^T + b for W (rows, cols), float32 or bfloat16 like the
// optional bias b, split over the calling OpenMP team by blocks of rows, with no barrier at
// the end.
// A bfloat16 projection's outputs are rounded to bfloat16, as its ops give them.
template <typename TW>
void linear_team(const float* x, int64_t n, const TW* w, const TW* b, int64_t rows,
                 int64_t cols, float* y) {
#pragma omp for schedule(static) nowait
  for (int64_t r0 = 0; r0 < rows; r0 += kLinearBlock) {
    const int64_t count = std::min(kLinearBlock, rows - r0);
    score_keys(x, cols, n, w + r0 * cols, count, cols, y + r0, rows);
    for (int64_t t = 0; t < n; ++t)
      for (int64_t r = r0; r < r0 + count; ++r) {
        float& out = y[t * rows + r];
        if (b != nullptr) out += static_cast<float>(b[r]);
        if constexpr (std::is_same_v<TW, BFloat16>) out = round_bf16(out);
      }
  }
}

}  // namespace

extern "C" {
__attribute__((visibility("default"))) uint64_t memcompile_lookup_calls() { return g_lookups; }
__attribute__((visibility("default"))) uint64_t memcompile_decode_calls() { return g_decodes; }

// memcompile::pk_lookup for many tokens, after torch's matmul of the half scores
// (`lookup_scored_team`).
// `values_dtype`: 0 float32, 1 float16, 2 bfloat16 (`with_values`).
__attribute__((visibility("default"))) void memcompile_lookup_scored(
    const float* scores, int64_t n, int64_t heads, int64_t n_keys, int64_t knn,
    const void* values, int values_dtype, int64_t v_dim, const float* gate, float* out,
    int threads) {
  ++g_lookups;
#pragma omp parallel num_threads(threads) if (threads > 1)
  with_values(values_dtype, values, [&](auto table) {
    lookup_scored_team(scores, n, heads, n_keys, knn, table, v_dim, gate, out);
  });
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

// memcompile::pk_lookup for few tokens, whole (`pick_team`, `bag_team`); keys float32 or
// bfloat16 (`keys_dtype`), values any of the three (`values_dtype`).
__attribute__((visibility("default"))) void memcompile_lookup(
    const float* q, const void* keys, int keys_dtype, int64_t n, int64_t heads, int64_t n_keys,
    int64_t half, int64_t knn, const void* values, int values_dtype, int64_t v_dim,
    const float* gate, float* out, int threads) {
  ++g_lookups;
  Picks picks(n, heads, n_keys, knn);
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    with_weights(keys_dtype, keys,
                 [&](auto k) { pick_team(picks, q, k, n, heads, n_keys, half, knn); });
    with_values(values_dtype, values,
                [&](auto v) { bag_team(picks, n, heads * knn, v, v_dim, gate, out); });
  }
}

// A memory layer's forward for few tokens x (n, d_in) float32: the query projection (wq
// (H * 2 * half, d_in), bias bq), the Memory+ gate's projection when ws (v_dim, d_in) is
// given, the lookup in keys (H, 2, n_keys, half), and the output projection when wo
// (d_out, v_dim) is given; y is (n, d_out) float32, or (n, v_dim) without wo. The
// projections, biases (each may be null) and keys are all float32 or all bfloat16
// (`weights_dtype`), the values any of the three (`values_dtype`).
__attribute__((visibility("default"))) void memcompile_decode(
    const float* x, int64_t n, int64_t d_in, const void* wq, const void* bq, const void* ws,
    const void* bs, const void* wo, const void* bo, int64_t d_out, const void* keys,
    int weights_dtype, int64_t heads, int64_t n_keys, int64_t half, int64_t knn,
    const void* values, int values_dtype, int64_t v_dim, float* y, int threads) {
  ++g_decodes;
  Picks picks(n, heads, n_keys, knn);
  std::vector<float> q(n * heads * 2 * half), gate(ws ? n * v_dim : 0), bag(wo ? n * v_dim : 0);
  float* looked_up = wo ? bag.data() : y;
#pragma omp parallel num_threads(threads) if (threads > 1)
  with_weights(weights_dtype, wq, [&](auto weight) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(weight)>>;
    const auto as_weights = [](const void* p) { return static_cast<const T*>(p); };
    linear_team(x, n, weight, as_weights(bq), heads * 2 * half, d_in, q.data());
    if (ws != nullptr)
      linear_team(x, n, as_weights(ws), as_weights(bs), v_dim, d_in, gate.data());
#pragma omp barrier
    pick_team(picks, q.data(), as_weights(keys), n, heads, n_keys, half, knn);
    with_values(values_dtype, values, [&](auto table) {
      bag_team(picks, n, heads * knn, table, v_dim, ws ? gate.data() : nullptr, looked_up,
               std::is_same_v<T, BFloat16>);
    });
    if (wo != nullptr) {
#pragma omp barrier
      linear_team(looked_up, n, as_weights(wo), as_weights(bo), d_out, v_dim, y);
    }
  });
}
}
