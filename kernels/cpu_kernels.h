// The math of memcompile's CPU kernels (kernels/reference.py has the same in PyTorch):
// top-k selection over product keys, dot products and the weighted bag of value rows.
// Included by ort_kernels.cc (the ONNX Runtime kernels) and decode_kernels.cc (those of
// torch's ops), which hold the entry points.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

// Internal linkage: each entry-point file has its own copy, and the compiler then inlines
// the comparator into the sorts (in a named namespace the top-k ran 15% slower).
namespace {

struct Item {
  float score;
  int64_t position;
};
// A bfloat16 as torch stores it: the high half of a float32's bits.
struct BFloat16 {
  uint16_t bits;
  operator float() const {
    const uint32_t word = static_cast<uint32_t>(bits) << 16;
    float value;
    std::memcpy(&value, &word, sizeof value);
    return value;
  }
};

// v rounded to the nearest bfloat16 (ties to even), as torch converts; NaN stays NaN.
inline float round_bf16(float v) {
  uint32_t word;
  std::memcpy(&word, &v, sizeof word);
  if ((word & 0x7fffffffu) > 0x7f800000u) return v;
  word = (word + 0x7fffu + ((word >> 16) & 1u)) & 0xffff0000u;
  std::memcpy(&v, &word, sizeof v);
  return v;
}

// f(p as const T*), T the element type that `dtype` names as kernels/cpu.py codes them:
// 0 float32, 1 float16, 2 bfloat16. `with_weights` takes float32 and bfloat16 only (the
// projections and keys), to halve the variants compiled.
template <typename F>
void with_values(int dtype, const void* p, F&& f) {
  if (dtype == 1) f(static_cast<const _Float16*>(p));
  else if (dtype == 2) f(static_cast<const BFloat16*>(p));
  else f(static_cast<const float*>(p));
}
template <typename F>
void with_weights(int dtype, const void* p, F&& f) {
  if (dtype == 2) f(static_cast<const BFloat16*>(p));
  else f(static_cast<const float*>(p));
}

// Higher score first; on ties the lower position, as ONNX TopK orders them. NaN ranks above
// every number, as in torch.topk (and keeps the order strict: std::sort needs that). The
// ordered cases come first: a NaN test on every comparison made the top-k 1.6x slower.
inline bool better(const Item& a, const Item& b) {
  if (a.score > b.score) return true;
  if (a.score < b.score) return false;
  if (a.score == b.score) return a.position < b.position;
  const bool a_nan = std::isnan(a.score), b_nan = std::isnan(b.score);  // unordered: a NaN
  if (a_nan != b_nan) return a_nan;
  return a.position < b.position;
}

// Work buffers of one thread's top-k calls.
struct TopKScratch {
  std::vector<Item> items;
  std::vector<float> kept;         // the scores at or above a threshold, in index order,
  std::vector<int32_t> positions;  // their indices
  std::vector<int32_t> ranks;      // and how many of them beat each
  std::vector<float> sums;         // top_k_sums' candidates
  std::vector<int64_t> pairs;      // and their pairs i * k + j
};

// The least of the maxima of k strided groups of s[0, n): one score from each group is at
// or above it, so k of them are. `top` gets the greatest score, `nan` whether any is NaN.
inline float group_floor(const float* s, int64_t n, int64_t k, float& top, bool& nan) {
  float maxima[64];
  int unordered = 0;
  std::copy(s, s + k, maxima);
  int64_t base = k;
  for (; base + k <= n; base += k) {
#pragma omp simd reduction(| : unordered)
    for (int64_t l = 0; l < k; ++l) {
      const float v = s[base + l];
      unordered |= v != v;
      maxima[l] = maxima[l] < v ? v : maxima[l];
    }
  }
  for (int64_t l = 0; base + l < n; ++l) {
    const float v = s[base + l];
    unordered |= v != v;
    maxima[l] = maxima[l] < v ? v : maxima[l];
  }
  float floor = maxima[0];
  top = maxima[0];
  for (int64_t g = 0; g < k; ++g) {
    unordered |= maxima[g] != maxima[g];
    floor = std::min(floor, maxima[g]);
    top = std::max(top, maxima[g]);
  }
  nan = unordered;
  return floor;
}

inline int64_t count_at_least(const float* s, int64_t n, float threshold) {
  int64_t count = 0;
#pragma omp simd reduction(+ : count)
  for (int64_t i = 0; i < n; ++i) count += s[i] >= threshold;
  return count;
}

// The scores at or above `threshold` and their indices, in index order; returns how many.
inline int64_t keep_at_least(const float* s, int64_t n, float threshold, float* kept,
                             int32_t* positions) {
  int64_t count = 0, i = 0;
#ifdef __AVX512F__
  const __m512 bound = _mm512_set1_ps(threshold);
  __m512i index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(s + i);
    const __mmask16 keep = _mm512_cmp_ps_mask(v, bound, _CMP_GE_OQ);
    _mm512_mask_compressstoreu_ps(kept + count, keep, v);
    _mm512_mask_compressstoreu_epi32(positions + count, keep, index);
    count += __builtin_popcount(keep);
    index = _mm512_add_epi32(index, _mm512_set1_epi32(16));
  }
#endif
  for (; i < n; ++i) {
    kept[count] = s[i], positions[count] = static_cast<int32_t>(i);
    count += s[i] >= threshold;
  }
  return count;
}

// The k best of scores[0..n) (no NaN; k <= 64, n >= 2 k) without a comparison sort,
// whose branches mispredict about every other time. From `floor` (k scores at or above it)
// and the greatest score `top`, a bisection of the threshold by vectorised counts keeps at
// most k + 8 scores where it can; each kept score's rank is then the number of kept scores
// that beat it (higher, or equal at a lower index: `better`), counted a vector at a time.
// 3x faster than the sort on 512 scores, k = 32. Returns false, writing nothing, where
// more than 128 scores tie at the threshold.
inline bool top_k_ranked(const float* scores, int64_t n, int64_t k, float floor, float top,
                         Item* out, TopKScratch& scratch) {
  constexpr int64_t kMaxRanked = 128, kSlack = 8;
  float low = floor, high = top;
  int64_t count = count_at_least(scores, n, low);
  for (int step = 0; step < 12 && count > k + kSlack; ++step) {
    const float middle = 0.5f * low + 0.5f * high;  // halves first: no overflow
    if (!(middle > low)) break;  // adjacent floats, or infinities
    const int64_t at_middle = count_at_least(scores, n, middle);
    if (at_middle >= k) low = middle, count = at_middle;
    else high = middle;
  }
  if (count > kMaxRanked) return false;
  scratch.kept.resize(n), scratch.positions.resize(n), scratch.ranks.assign(count, 0);
  float* kept = scratch.kept.data();
  int32_t* positions = scratch.positions.data();
  keep_at_least(scores, n, low, kept, positions);
  int32_t* ranks = scratch.ranks.data();
  const int32_t m = static_cast<int32_t>(count);
  for (int32_t j = 0; j < m; ++j) {
    const float v = kept[j];
#pragma omp simd
    for (int32_t i = 0; i < m; ++i) ranks[i] += (v > kept[i]) | ((v == kept[i]) & (j < i));
  }
  for (int32_t i = 0; i < m; ++i)
    if (ranks[i] < k) out[ranks[i]] = {kept[i], positions[i]};
  return true;
}

// The k best of scores[0..n) into out[0..k), best first, as (score, index), as torch.topk
// and ONNX TopK pick them (`better`). The maxima of k strided groups of the scores are k
// scores, so the k best are all at or above the least of those maxima (`group_floor`): the
// ranking (`top_k_ranked`) starts from there. With a NaN among the scores, or many ties,
// the scores at or above that floor (all of them with a NaN) go through nth_element.
inline void top_k(const float* scores, int64_t n, int64_t k, Item* out, TopKScratch& scratch) {
  float floor = -INFINITY, top;
  bool nan = true;
  if (k <= 64 && n >= 2 * k && n <= INT32_MAX) {
    floor = group_floor(scores, n, k, top, nan);
    if (!nan && top_k_ranked(scores, n, k, floor, top, out, scratch)) return;
    if (nan) floor = -INFINITY;  // every score goes through: NaN ranks first
  }
  std::vector<Item>& items = scratch.items;
  items.resize(n);
  int64_t count = 0;  // kept in index order, so ties still go to the lower index
  for (int64_t i = 0; i < n; ++i) {
    items[count] = {scores[i], i};
    count += !(scores[i] < floor);
  }
  std::nth_element(items.begin(), items.begin() + (k - 1), items.begin() + count, better);
  std::sort(items.begin(), items.begin() + k, better);
  std::copy(items.begin(), items.begin() + k, out);
}

// The k best sums a[i].score + b[j].score, a and b sorted best first, as (score, i * k + j).
// (i, j) is dominated by the (i + 1) * (j + 1) pairs (i' <= i, j' <= j), so only pairs with
// (i + 1) * (j + 1) <= k can be among the k best: about k * ln(k) of the k * k. They are
// listed in the order of i * k + j, so `top_k` breaks their ties by it.
inline void top_k_sums(const Item* a, const Item* b, int64_t k, Item* out,
                       TopKScratch& scratch) {
  std::vector<float>& sums = scratch.sums;
  std::vector<int64_t>& pairs = scratch.pairs;
  sums.clear(), pairs.clear();
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < k && (i + 1) * (j + 1) <= k; ++j)
      sums.push_back(a[i].score + b[j].score), pairs.push_back(i * k + j);
  top_k(sums.data(), static_cast<int64_t>(sums.size()), k, out, scratch);
  for (int64_t c = 0; c < k; ++c) out[c].position = pairs[out[c].position];
}

// Work buffers of the product-key selection, one per thread.
struct TopKWork {
  explicit TopKWork(int64_t knn) : halves(3 * knn) {}
  std::vector<Item> halves;  // both halves' k best, then the k best sums
  TopKScratch scratch;
};

// The knn best product keys of one (token, head) from work.halves: each half's knn best
// (score, sub-key index), best first, at [0, knn) and [knn, 2 knn). Their sums, best first,
// go to scores, and their rows i * n_keys + j to rows.
inline void best_sums(int64_t n_keys, int64_t knn, TopKWork& work, float* scores,
                      int64_t* rows) {
  Item* halves = work.halves.data();
  Item* pairs = halves + 2 * knn;
  top_k_sums(halves, halves + knn, knn, pairs, work.scratch);
  for (int64_t c = 0; c < knn; ++c) {
    const int64_t i = pairs[c].position / knn, j = pairs[c].position % knn;
    scores[c] = pairs[c].score;
    rows[c] = halves[i].position * n_keys + halves[knn + j].position;
  }
}

// The same from the two halves' scores s0 and s1 (n_keys each).
inline void best_products(const float* s0, const float* s1, int64_t n_keys, int64_t knn,
                          TopKWork& work, float* scores, int64_t* rows) {
  top_k(s0, n_keys, knn, work.halves.data(), work.scratch);
  top_k(s1, n_keys, knn, work.halves.data() + knn, work.scratch);
  best_sums(n_keys, knn, work, scores, rows);
}

// Each (token, head)'s knn best product keys from scores (2H, n, n_keys), row 2h + s for
// head h's half s (`best_products`): their sums, best first, into best (n, H, knn) and their
// rows i * n_keys + j into rows (n, H, knn). The (token, head) pairs are split over the
// calling OpenMP team (one thread outside a parallel region), with a barrier at the end.
inline void best_products_team(const float* scores, int64_t n, int64_t heads, int64_t n_keys,
                               int64_t knn, float* best, int64_t* rows) {
  TopKWork work(knn);
#pragma omp for schedule(dynamic, 16)
  for (int64_t th = 0; th < n * heads; ++th) {
    const int64_t t = th / heads, h = th % heads;
    const float* s0 = scores + (2 * h * n + t) * n_keys;
    best_products(s0, s0 + n * n_keys, n_keys, knn, work, best + th * knn, rows + th * knn);
  }
}

// a . b with 16 running sums, which the compiler keeps in one vector register; b float32
// or 16-bit, widened as it is read.
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  float lanes[16] = {};
  int64_t d = 0;
  for (; d + 16 <= n; d += 16)
    for (int l = 0; l < 16; ++l) lanes[l] += a[d + l] * static_cast<float>(b[d + l]);
  float total = 0.f;
  for (int l = 0; l < 16; ++l) total += lanes[l];
  for (; d < n; ++d) total += a[d] * static_cast<float>(b[d]);
  return total;
}

// scores[t * out_stride + j] = q_t . key_j for n query rows q_t = q + t * q_stride (half
// wide) against keys (n_keys, half): four keys at a time, so that four independent sums keep
// the FMA units busy and each key is read once for all the rows. (A linear layer's rows are
// such keys: y = x W^T.)
template <typename TK>
void score_keys(const float* q, int64_t q_stride, int64_t n, const TK* keys, int64_t n_keys,
                int64_t half, float* scores, int64_t out_stride) {
  if constexpr (!std::is_same_v<TK, float>) {
    if (n > 1) {  // 16-bit keys for several rows: widen four keys once, not once a row
      std::vector<float> block(4 * half);
      for (int64_t j = 0; j < n_keys; j += 4) {
        const int64_t count = std::min<int64_t>(4, n_keys - j);
        for (int64_t d = 0; d < count * half; ++d)
          block[d] = static_cast<float>(keys[j * half + d]);
        score_keys(q, q_stride, n, block.data(), count, half, scores + j, out_stride);
      }
      return;
    }
  }
  int64_t j = 0;
  for (; j + 4 <= n_keys; j += 4) {
    const TK *k0 = keys + j * half, *k1 = k0 + half, *k2 = k1 + half, *k3 = k2 + half;
    for (int64_t t = 0; t < n; ++t) {
      const float* x = q + t * q_stride;
      float a0[16] = {}, a1[16] = {}, a2[16] = {}, a3[16] = {};
      int64_t d = 0;
      for (; d + 16 <= half; d += 16)
        for (int l = 0; l < 16; ++l) {
          const float xv = x[d + l];
          a0[l] += xv * static_cast<float>(k0[d + l]);
          a1[l] += xv * static_cast<float>(k1[d + l]);
          a2[l] += xv * static_cast<float>(k2[d + l]);
          a3[l] += xv * static_cast<float>(k3[d + l]);
        }
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
      for (int l = 0; l < 16; ++l) s0 += a0[l], s1 += a1[l], s2 += a2[l], s3 += a3[l];
      for (; d < half; ++d) {
        const float xv = x[d];
        s0 += xv * static_cast<float>(k0[d]), s1 += xv * static_cast<float>(k1[d]);
        s2 += xv * static_cast<float>(k2[d]), s3 += xv * static_cast<float>(k3[d]);
      }
      float* out = scores + t * out_stride + j;
      out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
    }
  }
  for (; j < n_keys; ++j)
    for (int64_t t = 0; t < n; ++t)
      scores[t * out_stride + j] = dot(q + t * q_stride, keys + j * half, half);
}

// This thread's columns [v0, v1) of v_dim in the calling OpenMP team (all of them outside
// a parallel region), 16-aligned: a thread that owns columns owns every row's share of
// them, so threads never add into the same place.
inline void thread_columns(int64_t v_dim, int64_t& v0, int64_t& v1) {
  int thread = 0, team = 1;
#ifdef _OPENMP
  thread = omp_get_thread_num(), team = omp_get_num_threads();
#endif
  const auto column = [&](int64_t i) { return i == team ? v_dim : v_dim * i / team / 16 * 16; };
  v0 = column(thread), v1 = column(thread + 1);
}

// acc[0, v1 - v0) = sum_b w[b] * values[ids[b]][v0, v1) in float32, four rows at a time so
// that their loads overlap.
template <typename T>
void bag_columns(const T* values, const int64_t* ids, const float* w, int64_t picks,
                 int64_t v_dim, int64_t v0, int64_t v1, float* acc) {
  const int64_t width = v1 - v0;
  std::fill(acc, acc + width, 0.f);
  int64_t b = 0;
  for (; b + 4 <= picks; b += 4) {
    const T *r0 = values + ids[b] * v_dim + v0, *r1 = values + ids[b + 1] * v_dim + v0;
    const T *r2 = values + ids[b + 2] * v_dim + v0, *r3 = values + ids[b + 3] * v_dim + v0;
    const float w0 = w[b], w1 = w[b + 1], w2 = w[b + 2], w3 = w[b + 3];
#pragma omp simd
    for (int64_t v = 0; v < width; ++v)
      acc[v] += w0 * static_cast<float>(r0[v]) + w1 * static_cast<float>(r1[v]) +
                w2 * static_cast<float>(r2[v]) + w3 * static_cast<float>(r3[v]);
  }
  for (; b < picks; ++b) {
    const T* row = values + ids[b] * v_dim + v0;
#pragma omp simd
    for (int64_t v = 0; v < width; ++v) acc[v] += w[b] * static_cast<float>(row[v]);
  }
}

// y[t] = sum_b weights[t, b] * values[idx[t, b]] in float32; `store(t, acc)` writes a
// finished row. Large bags run on `threads` OpenMP threads, a token each.
template <typename T, typename Store>
void bag_rows(const T* values, const int64_t* idx, const float* weights, int64_t n,
              int64_t picks, int64_t v_dim, int threads, Store store) {
#pragma omp parallel num_threads(threads) if (threads > 1 && n * picks * v_dim > (1 << 18))
  {
    std::vector<float> acc(v_dim);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n; ++t) {
      bag_columns(values, idx + t * picks, weights + t * picks, picks, v_dim, 0, v_dim,
                  acc.data());
      store(t, acc.data());
    }
  }
}

}  // namespace
