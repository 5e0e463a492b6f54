// The ONNX Runtime kernels of com.memcompile::PkTopK and com.memcompile::Bag
// (passes/lower_onnx.py defines the nodes; runtime/ort.py registers them). The math is in
// cpu_kernels.h; kernels/native.py builds this file and decode_kernels.cc into one library.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_kernels.h"

extern "C" {
struct OrtStatus; struct OrtValue; struct OrtKernelInfo; struct OrtKernelContext;
struct OrtSessionOptions; struct OrtCustomOpDomain; struct OrtShapeInfo; struct OrtApi;
struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)();
};
// The OrtCustomOp struct up to its version-20 fields; `version` below says which are read.
struct OrtCustomOp {
  uint32_t version;
  void* (*CreateKernel)(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*);
  const char* (*GetName)(const OrtCustomOp*);
  const char* (*GetExecutionProviderType)(const OrtCustomOp*);
  int (*GetInputType)(const OrtCustomOp*, size_t);
  size_t (*GetInputTypeCount)(const OrtCustomOp*);
  int (*GetOutputType)(const OrtCustomOp*, size_t);
  size_t (*GetOutputTypeCount)(const OrtCustomOp*);
  void (*KernelCompute)(void*, OrtKernelContext*);
  void (*KernelDestroy)(void*);
  int (*GetInputCharacteristic)(const OrtCustomOp*, size_t);
  int (*GetOutputCharacteristic)(const OrtCustomOp*, size_t);
  int (*GetInputMemoryType)(const OrtCustomOp*, size_t);
  int (*GetVariadicInputMinArity)(const OrtCustomOp*);
  int (*GetVariadicInputHomogeneity)(const OrtCustomOp*);
  int (*GetVariadicOutputMinArity)(const OrtCustomOp*);
  int (*GetVariadicOutputHomogeneity)(const OrtCustomOp*);
  OrtStatus* (*CreateKernelV2)(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*, void**);
  OrtStatus* (*KernelComputeV2)(void*, OrtKernelContext*);
  OrtStatus* (*InferOutputShapeFn)(const OrtCustomOp*, void*);
  int (*GetStartVersion)(const OrtCustomOp*);
  int (*GetEndVersion)(const OrtCustomOp*);
  size_t (*GetMayInplace)(int**, int**);
  void (*ReleaseMayInplace)(int*, int*);
  size_t (*GetAliasMap)(int**, int**);
  void (*ReleaseAliasMap)(int*, int*);
};
}

namespace {


// Slots of the version-1 OrtApi table.
enum Slot {
  kCreateStatus = 0, kCreateCustomOpDomain = 26, kCustomOpDomainAdd = 27,
  kAddCustomOpDomain = 28, kGetTensorMutableData = 51, kGetTensorElementType = 60,
  kGetDimensionsCount = 61, kGetDimensions = 62, kGetTensorTypeAndShape = 65,
  kKernelInfoGetAttributeInt64 = 86, kGetInput = 90, kGetOutput = 91,
  kReleaseShapeInfo = 99,
};
enum DType { kUndefined = 0, kFloat = 1, kInt64 = 7, kFloat16 = 10 };
enum ErrorCode { kFail = 1, kInvalidArgument = 2 };

const void* const* g_api = nullptr;
std::atomic<uint64_t> g_calls{0};    // ONNX Runtime kernel calls
// OpenMP threads of a kernel call: the session's intra-op count, which ort_session passes
// (memcompile_ort_threads). One otherwise: a pool the session did not ask for would add
// threads beside ONNX Runtime's own, and would hang a child forked after it ran.
std::atomic<int> g_threads{1};
template <typename F> F api(Slot slot) { return reinterpret_cast<F>(g_api[slot]); }

OrtStatus* error(const std::string& message) {
  return api<OrtStatus* (*)(int, const char*)>(kCreateStatus)(kInvalidArgument, message.c_str());
}
#define RETURN_IF(status) if (OrtStatus* s_ = (status)) return s_

struct Tensor {
  void* data = nullptr;
  int dtype = kUndefined;
  std::vector<int64_t> shape;
};

OrtStatus* input(OrtKernelContext* context, size_t index, Tensor* tensor) {
  const OrtValue* value = nullptr;
  RETURN_IF((api<OrtStatus* (*)(const OrtKernelContext*, size_t, const OrtValue**)>(kGetInput)(
      context, index, &value)));
  OrtShapeInfo* info = nullptr;
  RETURN_IF((api<OrtStatus* (*)(const OrtValue*, OrtShapeInfo**)>(kGetTensorTypeAndShape)(
      value, &info)));
  size_t rank = 0;
  OrtStatus* status =
      api<OrtStatus* (*)(const OrtShapeInfo*, int*)>(kGetTensorElementType)(info, &tensor->dtype);
  if (!status)
    status = api<OrtStatus* (*)(const OrtShapeInfo*, size_t*)>(kGetDimensionsCount)(info, &rank);
  tensor->shape.resize(rank);
  if (!status)
    status = api<OrtStatus* (*)(const OrtShapeInfo*, int64_t*, size_t)>(kGetDimensions)(
        info, tensor->shape.data(), rank);
  api<void (*)(OrtShapeInfo*)>(kReleaseShapeInfo)(info);
  RETURN_IF(status);
  return api<OrtStatus* (*)(OrtValue*, void**)>(kGetTensorMutableData)(
      const_cast<OrtValue*>(value), &tensor->data);
}

OrtStatus* output(OrtKernelContext* context, size_t index, const std::vector<int64_t>& shape,
                  void** data) {
  OrtValue* value = nullptr;
  RETURN_IF((api<OrtStatus* (*)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**)>(
      kGetOutput)(context, index, shape.data(), shape.size(), &value)));
  return api<OrtStatus* (*)(OrtValue*, void**)>(kGetTensorMutableData)(value, data);
}

bool is_float(const Tensor& t) { return t.dtype == kFloat || t.dtype == kFloat16; }

inline float load(const void* data, int dtype, int64_t i) {
  if (dtype == kFloat16) return static_cast<float>(static_cast<const _Float16*>(data)[i]);
  return static_cast<const float*>(data)[i];
}

// A float32 view of t: t's own data, or a converted copy in buffer.
const float* as_float(const Tensor& t, int64_t count, std::vector<float>& buffer) {
  if (t.dtype == kFloat) return static_cast<const float*>(t.data);
  buffer.resize(count);
  for (int64_t i = 0; i < count; ++i) buffer[i] = load(t.data, t.dtype, i);
  return buffer.data();
}

struct PkTopKKernel { int64_t knn = 0; };

OrtStatus* pk_create(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** out) {
  auto* kernel = new PkTopKKernel;
  *out = kernel;
  return api<OrtStatus* (*)(const OrtKernelInfo*, const char*, int64_t*)>(
      kKernelInfoGetAttributeInt64)(info, "knn", &kernel->knn);
}

constexpr int64_t kRows = 4;    // query rows per score tile
constexpr int64_t kCols = 64;   // keys per score tile

// Keys transposed for the score tiles: (H, 2, half, n_pad) float32, zero-padded to kCols.
std::vector<float> transposed_keys(const Tensor& keys, int64_t n_pad) {
  const int64_t heads = keys.shape[0], n_keys = keys.shape[2], half = keys.shape[3];
  std::vector<float> out(heads * 2 * half * n_pad, 0.f);
  for (int64_t hs = 0; hs < heads * 2; ++hs)
    for (int64_t j = 0; j < n_keys; ++j)
      for (int64_t d = 0; d < half; ++d)
        out[(hs * half + d) * n_pad + j] =
            load(keys.data, keys.dtype, (hs * n_keys + j) * half + d);
  return out;
}

// scores[r][j] = q[r] . key_j for kRows query rows (half wide) against keys kt (half, n_pad).
void score_tile(const float* const* q, const float* kt, int64_t half, int64_t n_pad,
                float* scores) {
  for (int64_t j0 = 0; j0 < n_pad; j0 += kCols) {
    float acc[kRows][kCols] = {};
    for (int64_t d = 0; d < half; ++d) {
      const float* k = kt + d * n_pad + j0;
      for (int64_t r = 0; r < kRows; ++r) {
        const float qv = q[r][d];
#pragma omp simd
        for (int64_t c = 0; c < kCols; ++c) acc[r][c] += qv * k[c];
      }
    }
    for (int64_t r = 0; r < kRows; ++r) std::memcpy(scores + r * n_pad + j0, acc[r], sizeof acc[r]);
  }
}

// Transposing the keys pays from this many (token, head) rows on.
constexpr int64_t kTransposeRows = 32;

// q (N, H, k_dim), keys (H, 2, n_keys, k_dim/2) -> scores float32, indices int64 (N, H, knn).
OrtStatus* pk_compute(void* raw, OrtKernelContext* context) {
  ++g_calls;
  const int64_t knn = static_cast<PkTopKKernel*>(raw)->knn;
  Tensor q, keys;
  RETURN_IF(input(context, 0, &q));
  RETURN_IF(input(context, 1, &keys));
  if (!is_float(q) || !is_float(keys) || q.shape.size() != 3 || keys.shape.size() != 4)
    return error("PkTopK: q (N, H, k_dim) and keys (H, 2, n_keys, k_dim/2), float32 or float16");
  const int64_t n = q.shape[0], heads = q.shape[1], k_dim = q.shape[2];
  const int64_t n_keys = keys.shape[2], half = keys.shape[3];
  if (keys.shape[0] != heads || keys.shape[1] != 2 || 2 * half != k_dim)
    return error("PkTopK: keys do not match q");
  if (knn < 1 || knn > n_keys) return error("PkTopK: knn must be in 1..n_keys");
  std::vector<int64_t> shape{n, heads, knn};
  void *scores_out = nullptr, *indices_out = nullptr;
  RETURN_IF(output(context, 0, shape, &scores_out));
  RETURN_IF(output(context, 1, shape, &indices_out));
  auto* scores = static_cast<float*>(scores_out);
  auto* indices = static_cast<int64_t*>(indices_out);
  std::vector<float> q_buffer;
  const float* qf = as_float(q, n * heads * k_dim, q_buffer);
  const int64_t n_pad = (n_keys + kCols - 1) / kCols * kCols;
  const bool tiled = n * heads >= kTransposeRows;
  std::vector<float> key_buffer;
  const std::vector<float> kt = tiled ? transposed_keys(keys, n_pad) : std::vector<float>();
  const float* kf = tiled ? nullptr : as_float(keys, heads * 2 * n_keys * half, key_buffer);
  const std::vector<float> zeros(half, 0.f);
  const int64_t blocks = (n + kRows - 1) / kRows;
  const int threads = g_threads;
  const bool big = n * heads * n_keys * k_dim > (1 << 20);
#pragma omp parallel num_threads(threads) if (threads > 1 && big)
  {
    std::vector<float> s(2 * kRows * n_pad);
    TopKWork work(knn);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < heads * blocks; ++task) {
      const int64_t h = task % heads, t0 = task / heads * kRows;
      for (int64_t side = 0; side < 2; ++side) {
        const float* rows[kRows];
        for (int64_t r = 0; r < kRows; ++r)
          rows[r] = t0 + r < n ? qf + ((t0 + r) * heads + h) * k_dim + side * half : zeros.data();
        float* out = s.data() + side * kRows * n_pad;
        if (tiled)
          score_tile(rows, kt.data() + (h * 2 + side) * half * n_pad, half, n_pad, out);
        else
          score_keys(qf + (t0 * heads + h) * k_dim + side * half, heads * k_dim,
                     std::min(kRows, n - t0), kf + (h * 2 + side) * n_keys * half, n_keys, half,
                     out, n_pad);  // few rows: straight from the keys, no transpose
      }
      for (int64_t r = 0; r < kRows && t0 + r < n; ++r) {
        const int64_t row = (t0 + r) * heads + h;
        best_products(s.data() + r * n_pad, s.data() + (kRows + r) * n_pad, n_keys, knn, work,
                      scores + row * knn, indices + row * knn);
      }
    }
  }
  return nullptr;
}

// values (rows, v_dim), indices int64 and weights float32 (N, B) -> (N, v_dim), values' dtype.
OrtStatus* bag_compute(void*, OrtKernelContext* context) {
  ++g_calls;
  Tensor values, indices, weights;
  RETURN_IF(input(context, 0, &values));
  RETURN_IF(input(context, 1, &indices));
  RETURN_IF(input(context, 2, &weights));
  if (!is_float(values) || values.shape.size() != 2 || indices.shape.size() != 2 ||
      indices.shape != weights.shape)
    return error("Bag: values (rows, v_dim) float32 or float16, indices and weights (N, B)");
  const int64_t rows = values.shape[0], v_dim = values.shape[1];
  const int64_t n = indices.shape[0], picks = indices.shape[1];
  const auto* idx = static_cast<const int64_t*>(indices.data);
  for (int64_t i = 0; i < n * picks; ++i)
    if (idx[i] < 0 || idx[i] >= rows) return error("Bag: index out of range");
  void* out = nullptr;
  RETURN_IF(output(context, 0, {n, v_dim}, &out));
  const auto* w = static_cast<const float*>(weights.data);
  if (values.dtype == kFloat) {
    auto* y = static_cast<float*>(out);
    bag_rows(static_cast<const float*>(values.data), idx, w, n, picks, v_dim, g_threads,
             [&](int64_t t, const float* acc) { std::memcpy(y + t * v_dim, acc, v_dim * 4); });
  } else {
    auto* y = static_cast<_Float16*>(out);
    bag_rows(static_cast<const _Float16*>(values.data), idx, w, n, picks, v_dim, g_threads,
             [&](int64_t t, const float* acc) {
               for (int64_t v = 0; v < v_dim; ++v) y[t * v_dim + v] = (_Float16)acc[v];
             });
  }
  return nullptr;
}

OrtStatus* bag_create(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*, void** out) {
  *out = nullptr;
  return nullptr;
}
void pk_destroy(void* kernel) { delete static_cast<PkTopKKernel*>(kernel); }
void bag_destroy(void*) {}
const char* cpu(const OrtCustomOp*) { return "CPUExecutionProvider"; }
const char* pk_name(const OrtCustomOp*) { return "PkTopK"; }
const char* bag_name(const OrtCustomOp*) { return "Bag"; }
size_t one(const OrtCustomOp*) { return 1; }
size_t two(const OrtCustomOp*) { return 2; }
size_t three(const OrtCustomOp*) { return 3; }
// PkTopK: q and keys of any float type; Bag: values of any float type, int64 indices and
// float32 weights (a softmax in float32), and an output of the values' type.
int pk_input_type(const OrtCustomOp*, size_t) { return kUndefined; }
int pk_output_type(const OrtCustomOp*, size_t i) { return i == 0 ? kFloat : kInt64; }
int bag_input_type(const OrtCustomOp*, size_t i) {
  return i == 0 ? kUndefined : i == 1 ? kInt64 : kFloat;
}
int bag_output_type(const OrtCustomOp*, size_t) { return kUndefined; }
int required(const OrtCustomOp*, size_t) { return 0; }
int default_memory(const OrtCustomOp*, size_t) { return 0; }
int one_int(const OrtCustomOp*) { return 1; }
size_t no_alias(int**, int**) { return 0; }
void release_nothing(int*, int*) {}

// Version 16: the V2 create/compute, which return a status, replace the V1 ones.
constexpr uint32_t kVersion = 16;
const OrtCustomOp kPkTopK{kVersion, nullptr, pk_name, cpu, pk_input_type, two, pk_output_type,
                          two, nullptr, pk_destroy, required, required, default_memory, one_int,
                          one_int, one_int, one_int, pk_create, pk_compute, nullptr, one_int,
                          nullptr, no_alias, release_nothing, no_alias, release_nothing};
const OrtCustomOp kBag{kVersion, nullptr, bag_name, cpu, bag_input_type, three, bag_output_type,
                       one, nullptr, bag_destroy, required, required, default_memory, one_int,
                       one_int, one_int, one_int, bag_create, bag_compute, nullptr, one_int,
                       nullptr, no_alias, release_nothing, no_alias, release_nothing};

}  // namespace

extern "C" {
__attribute__((visibility("default"))) uint64_t memcompile_kernel_calls() { return g_calls; }
__attribute__((visibility("default"))) void memcompile_ort_threads(int threads) {
  g_threads = threads > 1 ? threads : 1;
}
__attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(
    OrtSessionOptions* options, const OrtApiBase* base) {
  g_api = reinterpret_cast<const void* const*>(base->GetApi(1));
  OrtCustomOpDomain* domain = nullptr;
  RETURN_IF((api<OrtStatus* (*)(const char*, OrtCustomOpDomain**)>(kCreateCustomOpDomain)(
      "com.memcompile", &domain)));
  using Add = OrtStatus* (*)(OrtCustomOpDomain*, const OrtCustomOp*);
  RETURN_IF(api<Add>(kCustomOpDomainAdd)(domain, &kPkTopK));
  RETURN_IF(api<Add>(kCustomOpDomainAdd)(domain, &kBag));
  return api<OrtStatus* (*)(OrtSessionOptions*, OrtCustomOpDomain*)>(kAddCustomOpDomain)(
      options, domain);
}
}
