// The fused one-token decode step (runtime/fused_decode.py drives it), made of kernels.h's blocks.

#pragma once

#include "kernels.h"
#include "packed_gemv.h"

#include <torch/custom_class.h>

#include <cmath>
#include <limits>
#include <mutex>
#include <optional>
#include <string>

namespace specformer {

// ---- a whole decode step of a pre-norm rotary decoder, in one parallel region -----------------------
// Op by op, a one-token step of a 30-layer model is hundreds of kernel calls: each pays its launch, and each
// parallel region ends with both threads waiting for the slower one while the memory bus idles. Here the
// threads enter one OpenMP region per step and stream every weight matrix back to back, split by rows,
// meeting at a barrier only where the next phase needs all of the previous one's output (five a layer).
// The small per-token work (norms of one row, rotary of one position, the attention merge) is done by
// every thread on its own copy rather than shared behind another barrier. Each phase rounds to the
// model's dtype where the op-by-op model does, with the kernels above, so bfloat16 follows it closely.
// A projection's weights: dense in the model's dtype, or packed integer blocks (a quantized model's).
template <typename T> struct Matrix {
  const T* dense = nullptr;
  Packed packed;
};

// y[m, n0:n1] = x[m] W[n0:n1]^T + b for either kind of matrix; `xsum` is room for x's group sums,
// `quantized` x's int8 forms (reset whenever xf changes).
template <typename T>
void gemv_matrix(const Matrix<T>& w, const T* bias, int64_t K, const float* xf, int64_t M, T* y, int64_t y_stride,
                 int64_t n0, int64_t n1, float* acc, float* xsum, QuantizedInput& quantized) {
  if (w.dense != nullptr) return gemv_share(w.dense, bias, K, xf, M, y, y_stride, n0, n1, acc);
  const QuantizedRows* rows = w.packed.integer(K) ? &quantized.get(xf, M, K, w.packed.bits == 4) : nullptr;
  if ((w.packed.bits == 4 || w.packed.offsets != nullptr) && rows == nullptr) group_sums(xf, M, K, w.packed.group, xsum);
  int64_t n = n0;
  if (M == 1 && rows != nullptr)  // one sequence: several weight rows at a time
    for (; n + kRows <= n1 && packed_rows(w.packed, n, K, *rows, acc); n += kRows)
      for (int64_t r = 0; r < kRows; ++r) y[n + r] = round_to<T>(acc[r] + (bias ? float(bias[n + r]) : 0.f));
  for (; n < n1; ++n) {
    packed_row(w.packed, n, K, xf, xsum, M, acc, rows);
    for (int64_t m = 0; m < M; ++m) y[m * y_stride + n] = round_to<T>(acc[m] + (bias ? float(bias[n]) : 0.f));
  }
}

// x[m, n0:n1] += y[m, n0:n1], rounded to T: the residual, for the rows this thread computed.
template <typename T> void add_rows(T* x, const T* y, int64_t M, int64_t H, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = n0; n < n1; ++n) x[m * H + n] = round_to<T>(float(x[m * H + n]) + float(y[m * H + n]));
}

template <typename T> struct LayerWeights {
  const T *input_norm, *post_norm;
  Matrix<T> q, k, v, o, gate, up, down;
  const T *q_bias, *k_bias, *v_bias, *o_bias, *gate_bias, *up_bias, *down_bias;
  void *keys, *values;  // (B, Hkv, S, D) in the cache's dtype: float32, float16 or bfloat16
  const bool* allowed = nullptr;  // (B, slot + 1): which cache slots each row's query may see, this step
  // a mixture of experts in place of gate/up/down: the router (E, H), every expert's gate and up
  // (E, 2I, H) and down (E, H, I), stacked as runtime/moe.py keeps them; null for a dense MLP
  const T *router = nullptr, *experts_gate_up = nullptr, *experts_down = nullptr;
};

// How a mixture-of-experts layer routes: each row's top_k experts by softmax probability, their
// probabilities rescaled to sum to one when `normalize` (runtime/moe.py's Router).
struct Routing {
  int64_t top_k = 0;
  bool normalize = false;
};

// One row's top_k experts (`chosen`, best first) and their weights rounded to T, as Router computes them:
// logits x W^T rounded to T, softmax in float32, the top_k kept (ties to the lower index), rescaled to
// sum to one when asked. `probs` has room for E + top_k floats.
template <typename T>
void route(const T* router, int64_t E, int64_t H, const float* xf, const Routing& routing, T* logits, float* probs,
           float* acc, int64_t* chosen, T* weights) {
  gemv_share(router, static_cast<const T*>(nullptr), H, xf, 1, logits, E, 0, E, acc);
  float top = -std::numeric_limits<float>::infinity(), total = 0.f;
  for (int64_t e = 0; e < E; ++e) top = std::max(top, float(logits[e]));
  for (int64_t e = 0; e < E; ++e) total += probs[e] = std::exp(float(logits[e]) - top);
  for (int64_t e = 0; e < E; ++e) probs[e] /= total;
  float* picked = probs + E;
  float kept = 0.f;
  for (int64_t j = 0; j < routing.top_k; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; ++e)
      if (probs[e] >= 0.f && (best < 0 || probs[e] > probs[best])) best = e;
    chosen[j] = best;
    kept += picked[j] = probs[best];
    probs[best] = -1.f;  // taken
  }
  for (int64_t j = 0; j < routing.top_k; ++j)
    weights[j] = round_to<T>(routing.normalize ? picked[j] / kept : picked[j]);
}

// This thread's rows of an N-row matrix: whole kRows blocks, split evenly. (Handing out small chunks
// from a shared counter, so a core the machine slows down takes fewer, measured slower on SmolLM2:
// each chunk restarts the hardware prefetcher and the counter's cache line moves between cores.)
inline std::pair<int64_t, int64_t> share(int64_t N, int64_t thread, int64_t threads) {
  const int64_t blocks = (N + kRows - 1) / kRows;
  return {std::min(N, blocks * thread / threads * kRows), std::min(N, blocks * (thread + 1) / threads * kRows)};
}


// RMSNorm of M rows of x into float32, rounded to T where the model's norm rounds: Llama's (x * w,
// normalised in float32 and rounded before the scale) as rms_norm_impl, or Gemma's unit-offset one
// (x * (1 + w), all in float32, rounded once).
template <typename T>
void norm_rows(const T* x, const T* weight, bool unit_offset, int64_t M, int64_t dim, float eps, float* out,
               float* upcast) {
  for (int64_t m = 0; m < M; ++m) {
    const T* xr = x + m * dim;
    const float* xf = as_float(xr, upcast, dim);
    const float inv = 1.f / std::sqrt(torch_sum_of_squares(xf, dim) / float(dim) + eps);
    for (int64_t i = 0; i < dim; ++i) {
      if (unit_offset) {
        out[m * dim + i] = float(round_to<T>((xf[i] * inv) * (1.f + float(weight[i]))));
      } else if constexpr (std::is_same_v<T, float>) {
        out[m * dim + i] = (xr[i] * inv) * weight[i];
      } else {
        out[m * dim + i] = float(round_to<T>(float(weight[i]) * float(round_to<T>(xf[i] * inv))));
      }
    }
  }
}

// Sizes of one step, read off the inputs: M rows of width H; per layer Nq query rows (Hq heads of D),
// Nkv key and value rows (Hkv heads), I MLP rows (each expert's, in a mixture of E experts); S cache
// slots; V vocabulary rows.
struct StepShape {
  int64_t L, M, H, Hkv, S, D, Nq, Nkv, I, Hq, G, V, E;
};

// Each layer's tensors arrive by name: a dict per layer with these weights and, where the model has them,
// these biases (`q_bias`...); a mixture-of-experts layer has `router`, `experts_gate_up` and
// `experts_down` in place of gate, up and down. Any other key is an error, so a misspelt name cannot go
// unnoticed.
using Layer = c10::Dict<std::string, at::Tensor>;
constexpr int64_t kPerLayer = 9, kBiases = 7, kExpertParts = 3, kFirstMlp = 6;  // gate, up, down: 6, 7, 8
constexpr const char* kWeightNames[kPerLayer] = {"input_norm", "q", "k", "v", "o", "post_norm", "gate", "up", "down"};
constexpr const char* kBiasNames[kBiases] = {"q_bias", "k_bias", "v_bias", "o_bias", "gate_bias", "up_bias", "down_bias"};
constexpr const char* kExpertNames[kExpertParts] = {"router", "experts_gate_up", "experts_down"};

inline const at::Tensor& weight(const Layer& layer, int64_t l, const char* name) {
  const auto found = layer.find(name);
  TORCH_CHECK(found != layer.end(), "decode_step: layer ", l, " has no `", name, "` weight");
  return found->value();
}

inline void check_names(const Layer& layer, int64_t l) {
  for (const auto& item : layer) {
    const std::string& key = item.key();
    bool known = false;
    for (const char* name : kWeightNames)
      known = known || key == name || key == std::string(name) + "_scales" || key == std::string(name) + "_offsets";
    for (const char* name : kBiasNames) known = known || key == name;
    for (const char* name : kExpertNames) known = known || key == name;
    TORCH_CHECK(known, "decode_step: layer ", l, " has an unknown tensor `", key, "`");
  }
}

// A packed (N, K) matrix from its weight (int8 (N, K) or uint8 holding N * K / 2 bytes) and the
// `<name>_scales` (float32 or float16) and, for a matrix with offsets (w = q * scale + offset: Q4_1, Q4_K,
// Q5_1, Q5_K), `<name>_offsets` (the scales' dtype) beside it, each checked; an int4 matrix without
// offsets is symmetric (Q4_0: -8 * scale), an int8 one has none.
inline Packed packed_matrix(const Layer& layer, int64_t l, const std::string& name, const at::Tensor& t, int64_t N,
                            int64_t K, bool int8_activations) {
  Packed p;
  p.int8_activations = int8_activations;
  p.bits = t.scalar_type() == at::kChar ? 8 : 4;
  TORCH_CHECK(t.is_contiguous() && t.size(0) == N && t.numel() == N * K * p.bits / 8, "decode_step: layer ", l, "'s ",
              name, " packed weight has shape ", t.sizes(), "; expected ", N, " rows of ", K, " values");
  const auto scales = layer.find(name + "_scales");
  TORCH_CHECK(scales != layer.end(), "decode_step: layer ", l, "'s packed ", name, " has no `", name, "_scales`");
  const at::Tensor& s = scales->value();
  const auto dtype = s.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kHalf) && s.is_contiguous() && s.dim() == 2 && s.size(0) == N &&
                  s.size(1) > 0 && K % s.size(1) == 0,
              "decode_step: layer ", l, "'s ", name, "_scales must be float32 or float16 (", N, ", groups), got ",
              s.scalar_type(), " ", s.sizes());
  p.w = t.const_data_ptr();
  p.scales = s.const_data_ptr();
  p.half = dtype == at::kHalf;
  p.group = K / s.size(1);
  const auto offsets = layer.find(name + "_offsets");
  if (offsets != layer.end()) {
    const at::Tensor& o = offsets->value();
    TORCH_CHECK(o.sizes() == s.sizes() && o.scalar_type() == dtype && o.is_contiguous(), "decode_step: layer ", l,
                "'s ", name, "_offsets must be shaped and typed like its scales");
    p.offsets = o.const_data_ptr();
  }
  return p;
}

// Every layer's pointers, after checking each tensor's dtype, shape and layout against the step's.
template <typename T>
std::vector<LayerWeights<T>> layer_weights(const StepShape& z, const c10::List<Layer>& given,
                                           const std::vector<at::Tensor>& keys, const std::vector<at::Tensor>& values,
                                           bool int8_activations) {
  std::vector<LayerWeights<T>> layers(z.L);
  const int64_t shapes[kPerLayer][2] = {{z.H, 0},    {z.Nq, z.H}, {z.Nkv, z.H}, {z.Nkv, z.H}, {z.H, z.Nq},
                                        {z.H, 0},    {z.I, z.H},  {z.I, z.H},   {z.H, z.I}};
  const int64_t bias_rows[kBiases] = {z.Nq, z.Nkv, z.Nkv, z.H, z.I, z.I, z.H};
  for (int64_t l = 0; l < z.L; ++l) {
    const Layer layer = given.get(l);
    check_names(layer, l);
    const bool experts = layer.contains("router");
    TORCH_CHECK(experts == (z.E > 0), "decode_step: layer ", l, experts ? " has" : " has no",
                " experts, unlike layer 0: one kind of MLP per step");
    Matrix<T> w[kPerLayer];
    for (int64_t i = 0; i < kPerLayer; ++i) {
      if (experts && i >= kFirstMlp) continue;
      const at::Tensor& t = weight(layer, l, kWeightNames[i]);
      if (shapes[i][1] != 0 && (t.scalar_type() == at::kChar || t.scalar_type() == at::kByte)) {
        w[i].packed = packed_matrix(layer, l, kWeightNames[i], t, shapes[i][0], shapes[i][1], int8_activations);
        continue;
      }
      require<T>(t, kWeightNames[i]);
      const bool fits = shapes[i][1] == 0 ? t.numel() == shapes[i][0]
                                          : t.dim() == 2 && t.size(0) == shapes[i][0] && t.size(1) == shapes[i][1];
      TORCH_CHECK(fits && t.is_contiguous(), "decode_step: layer ", l, "'s ", kWeightNames[i], " weight has shape ",
                  t.sizes(), "; expected (", shapes[i][0], shapes[i][1] ? ", " + std::to_string(shapes[i][1]) : "",
                  "), contiguous");
      w[i].dense = t.const_data_ptr<T>();
    }
    const T* b[kBiases];
    for (int64_t i = 0; i < kBiases; ++i) {
      const auto found = layer.find(kBiasNames[i]);
      b[i] = nullptr;
      TORCH_CHECK(!experts || i < 4 || found == layer.end(), "decode_step: layer ", l, " has experts and a `",
                  kBiasNames[i], "`");
      if (found != layer.end()) {
        const at::Tensor& bias = found->value();
        require<T>(bias, kBiasNames[i]);
        TORCH_CHECK(bias.numel() == bias_rows[i] && bias.is_contiguous(), "decode_step: layer ", l, "'s ",
                    kBiasNames[i], " has shape ", bias.sizes(), "; expected (", bias_rows[i], ")");
        b[i] = bias.const_data_ptr<T>();
      }
    }
    for (const at::Tensor* cache : {&keys[l], &values[l]}) {
      const auto dtype = cache->scalar_type();
      TORCH_CHECK(cache->device().is_cpu() && dtype == keys[0].scalar_type() &&
                      (dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16),
                  "decode_step: layer ", l, " cache has dtype ", dtype,
                  "; expected float32, float16 or bfloat16, the same in every layer, on the CPU");
      TORCH_CHECK(cache->dim() == 4 && cache->size(0) == z.M && cache->size(1) == z.Hkv && cache->size(2) == z.S &&
                      cache->size(3) == z.D && cache->is_contiguous(),
                  "decode_step: layer ", l, " cache has shape ", cache->sizes(), "; expected (", z.M, ", ", z.Hkv, ", ",
                  z.S, ", ", z.D, "), contiguous");
    }
    layers[l] = {w[0].dense, w[5].dense, w[1], w[2], w[3], w[4], w[6], w[7], w[8],
                 b[0], b[1], b[2], b[3], b[4], b[5], b[6],
                 keys[l].data_ptr(), values[l].data_ptr()};
    if (experts) {
      const std::vector<int64_t> shapes[kExpertParts] = {{z.E, z.H}, {z.E, 2 * z.I, z.H}, {z.E, z.H, z.I}};
      const T* parts[kExpertParts];
      for (int64_t i = 0; i < kExpertParts; ++i) {
        const at::Tensor& t = weight(layer, l, kExpertNames[i]);
        require<T>(t, kExpertNames[i]);
        TORCH_CHECK(t.sizes() == at::IntArrayRef(shapes[i]) && t.is_contiguous(), "decode_step: layer ", l, "'s ",
                    kExpertNames[i], " has shape ", t.sizes(), "; expected ", at::IntArrayRef(shapes[i]),
                    ", contiguous");
        parts[i] = t.const_data_ptr<T>();
      }
      layers[l].router = parts[0];
      layers[l].experts_gate_up = parts[1];
      layers[l].experts_down = parts[2];
    }
  }
  return layers;
}

// The mixture-of-experts MLP of every row, this thread's share: each row routed (by every thread, for
// itself), then for each of its top_k experts this thread's rows of that expert's gate and up and their
// gated product; after a barrier, this thread's rows of each chosen expert's down projection, weighted
// and summed in the order runtime/moe.py's Experts adds them (by expert index), rounded as it rounds.
// Only the chosen experts' weights are read.
template <typename T>
void experts_mlp(const LayerWeights<T>& w, const Routing& routing, int64_t M, int64_t H, int64_t I, int64_t E,
                 int64_t t, int64_t nt, float* xf, float* acc, T* logits, float* probs, int64_t* chosen, T* weights,
                 T* gate, T* up, T* expert_out, T* projected, bool gelu) {
  const int64_t K = routing.top_k;
  const T* no_bias = nullptr;
  for (int64_t m = 0; m < M; ++m)
    route(w.router, E, H, xf + m * H, routing, logits, probs, acc, chosen + m * K, weights + m * K);
  auto [i0, i1] = share(I, t, nt);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < K; ++j) {
      const T* gate_up = w.experts_gate_up + chosen[m * K + j] * 2 * I * H;
      T* g = gate + (m * K + j) * I;
      T* u = up + (m * K + j) * I;
      gemv_share(gate_up, no_bias, H, xf + m * H, 1, g, I, i0, i1, acc);
      gemv_share(gate_up + I * H, no_bias, H, xf + m * H, 1, u, I, i0, i1, acc);
      gelu ? gelu_tanh_mul_range(g, u, g, i0, i1) : silu_mul_range(g, u, g, i0, i1);
    }
#pragma omp barrier
  for (int64_t i = 0; i < M * K * I; ++i) xf[i] = float(gate[i]);
  auto [h0, h1] = share(H, t, nt);
  for (int64_t m = 0; m < M; ++m) {
    T* out = projected + m * H;
    std::fill(out + h0, out + h1, T(0.f));
    for (int64_t e = 0; e < E; ++e)
      for (int64_t j = 0; j < K; ++j) {
        if (chosen[m * K + j] != e) continue;
        gemv_share(w.experts_down + e * H * I, no_bias, I, xf + (m * K + j) * I, 1, expert_out, H, h0, h1, acc);
        const float weight = float(weights[m * K + j]);
        for (int64_t h = h0; h < h1; ++h)
          out[h] = round_to<T>(float(out[h]) + float(round_to<T>(float(expert_out[h]) * weight)));
      }
  }
}

// A step's checked pointers: the model's (validated once per plan) and this step's caches and masks.
template <typename T> struct Prepared {
  using Scalar = T;
  StepShape z;
  std::vector<LayerWeights<T>> layers;
  Matrix<T> head, embedding;  // the embedding: dense rows, or a packed matrix's (a tied, packed head's)
  int64_t vocabulary = 0;     // the embedding's rows
  const T* final_norm = nullptr;
  std::vector<const void*> caches;  // every layer's keys and values storage, when prepared
};

// A matrix given as a tensor of the model's dtype or packed blocks with their `<name>_scales` (and
// offsets) in `parts`, checked to be (N, K) (N: -1 for any).
template <typename T>
Matrix<T> model_matrix(const at::Tensor& t, const Layer& parts, const char* name, int64_t N, int64_t K,
                       bool int8_activations) {
  Matrix<T> m;
  if (t.scalar_type() == at::kChar || t.scalar_type() == at::kByte) {
    m.packed = packed_matrix(parts, -1, name, t, N < 0 ? t.size(0) : N, K, int8_activations);
    return m;
  }
  require<T>(t, name);
  TORCH_CHECK(t.dim() == 2 && (N < 0 || t.size(0) == N) && t.size(1) == K && t.is_contiguous(), "decode_step: ",
              name, " has shape ", t.sizes(), "; expected (", N < 0 ? "rows" : std::to_string(N), ", ", K,
              "), contiguous");
  m.dense = t.const_data_ptr<T>();
  return m;
}

// What a model's step is made of, as DecodePlan holds it.
struct StepModel {
  c10::List<Layer> layers;
  at::Tensor final_norm, head, embedding;
  Layer head_parts, embedding_parts;
  std::vector<int64_t> windows;  // each layer's sliding attention window; 0: none
  bool int8_activations;
  Routing routing;
};

// Everything about a step that its model decides, checked against its inputs (M rows, and the caches):
// the layers' tensors, the embedding, the head, the final norm, the caches' shapes.
template <typename T>
Prepared<T> prepare(const StepModel& model, int64_t M, const std::vector<at::Tensor>& keys,
                    const std::vector<at::Tensor>& values) {
  const int64_t L = int64_t(keys.size());
  const c10::List<Layer>& given = model.layers;
  const Routing& routing = model.routing;
  TORCH_CHECK(L > 0 && int64_t(given.size()) == L && int64_t(values.size()) == L &&
                  int64_t(model.windows.size()) == L,
              "decode_step: ", given.size(), " layers, ", keys.size(), " keys, ", values.size(), " values and ",
              model.windows.size(), " windows do not describe the same layers");
  require<T>(model.final_norm, "norm");
  const int64_t H = model.final_norm.numel();
  const int64_t Hkv = keys[0].size(1), S = keys[0].size(2), D = keys[0].size(3);
  const Layer first = given.get(0);
  const int64_t Nq = weight(first, 0, "q").size(0), Nkv = weight(first, 0, "k").size(0);
  const bool moe = first.contains("router");
  const int64_t E = moe ? weight(first, 0, "router").size(0) : 0;
  const int64_t I = moe ? weight(first, 0, "experts_gate_up").size(1) / 2 : weight(first, 0, "gate").size(0);
  TORCH_CHECK(!moe || (routing.top_k >= 1 && routing.top_k <= E), "decode_step: top_k is ", routing.top_k,
              "; expected 1 to the layers' ", E, " experts");
  const int64_t Hq = Nq / D, G = Hq / Hkv, V = model.head.size(0);
  TORCH_CHECK(Nq % D == 0 && Hq % Hkv == 0 && Nkv == Hkv * D && D % 2 == 0,
              "decode_step: q rows ", Nq, ", kv rows ", Nkv, " and head size ", D, " do not fit together");
  Prepared<T> p;
  p.z = {L, M, H, Hkv, S, D, Nq, Nkv, I, Hq, G, V, E};
  p.layers = layer_weights<T>(p.z, given, keys, values, model.int8_activations);
  p.final_norm = model.final_norm.const_data_ptr<T>();
  p.head = model_matrix<T>(model.head, model.head_parts, "head", V, H, model.int8_activations);
  p.embedding = model_matrix<T>(model.embedding, model.embedding_parts, "embedding", -1, H, model.int8_activations);
  p.vocabulary = model.embedding.size(0);
  for (int64_t l = 0; l < L; ++l) p.caches.insert(p.caches.end(), {keys[l].const_data_ptr(), values[l].const_data_ptr()});
  return p;
}

// A plan's prepared step for this step's inputs: kept when the batch and every cache storage are those it
// was prepared for; false when something changed and the step must be prepared anew.
template <typename T>
bool still_fits(const Prepared<T>& p, int64_t M, const std::vector<at::Tensor>& keys,
                const std::vector<at::Tensor>& values) {
  const int64_t L = p.z.L;
  if (M != p.z.M || int64_t(keys.size()) != L || int64_t(values.size()) != L) return false;
  for (int64_t l = 0; l < L; ++l)
    if (keys[l].const_data_ptr() != p.caches[2 * l] || values[l].const_data_ptr() != p.caches[2 * l + 1]) return false;
  return true;
}

// One integer per row, (M) or (M, 1): this step's token ids or positions, each checked to be in [0, limit).
inline std::vector<int64_t> row_values(const at::Tensor& t, const char* name, int64_t M, int64_t limit,
                                       const char* what) {
  const bool wide = t.scalar_type() == at::kLong;
  TORCH_CHECK((wide || t.scalar_type() == at::kInt) && t.numel() == M &&
                  (t.dim() == 1 || (t.dim() == 2 && t.size(1) == 1)),
              "decode_step: ", name, " must be ", M, " int64 or int32 values, one per row, got ", t.scalar_type(), " ",
              t.sizes());
  std::vector<int64_t> out(M);
  for (int64_t m = 0; m < M; ++m) {
    out[m] = wide ? t.const_data_ptr<int64_t>()[m * t.stride(0)] : t.const_data_ptr<int32_t>()[m * t.stride(0)];
    TORCH_CHECK(out[m] >= 0 && out[m] < limit, "decode_step: row ", m, "'s ", name, " is ", out[m], "; expected 0 to ",
                limit - 1, " (", what, ")");
  }
  return out;
}

// The step's input: each row's token embedding, from dense rows or dequantised from packed blocks (as
// PackedEmbedding dequantises them), times `scale` rounded to T where the embedding scales.
template <typename T>
at::Tensor embed(const Prepared<T>& p, const std::vector<int64_t>& ids, const std::optional<double>& scale,
                 const at::TensorOptions& options) {
  const int64_t M = p.z.M, H = p.z.H;
  at::Tensor x = at::empty({M, H}, options);
  T* xp = x.data_ptr<T>();
  for (int64_t m = 0; m < M; ++m) {
    T* row = xp + m * H;
    if (p.embedding.dense != nullptr) std::copy_n(p.embedding.dense + ids[m] * H, H, row);
    else dequantize_rows(p.embedding.packed, H, ids[m], ids[m] + 1, row);
    if (scale.has_value()) {
      const float factor = float(round_to<T>(float(*scale)));
      for (int64_t h = 0; h < H; ++h) row[h] = round_to<T>(float(row[h]) * factor);
    }
  }
  return x;
}

// Which cache slots each row's query may see, for each distinct window among the layers (pointed to by
// the layers): the slots written so far whose attention_mask column is set, within the window; a row
// that may see none (a left-padding position) sees them all instead, as runtime/attention.py's
// AttentionMask lets it (its output is never used). Column s of the mask is cache slot s.
template <typename T>
std::vector<at::Tensor> point_masks(Prepared<T>& p, const std::vector<int64_t>& windows, const at::Tensor& mask_in,
                                    int64_t slot) {
  const int64_t M = p.z.M, visible = slot + 1;
  TORCH_CHECK(mask_in.dim() == 2 && (mask_in.size(0) == 1 || mask_in.size(0) == M) && mask_in.size(1) >= visible,
              "decode_step: attention_mask must have ", M == 1 ? "1 row" : std::to_string(M) + " rows or 1",
              " and a column for each of the cache's first ", visible, " slots, got ", mask_in.sizes());
  const at::Tensor mask = (mask_in.scalar_type() == at::kBool ? mask_in : mask_in.ne(0)).contiguous();
  const bool* given = mask.const_data_ptr<bool>();
  const int64_t row_stride = mask.size(0) == 1 ? 0 : mask.size(1);
  std::vector<at::Tensor> kept;
  std::vector<int64_t> seen;
  for (int64_t l = 0; l < p.z.L; ++l) {
    const int64_t window = windows[l];
    const auto found = std::find(seen.begin(), seen.end(), window);
    if (found == seen.end()) {
      at::Tensor allowed = at::empty({M, visible}, mask.options().dtype(at::kBool));
      bool* out = allowed.data_ptr<bool>();
      for (int64_t m = 0; m < M; ++m) {
        bool* row = out + m * visible;
        bool any = false;
        for (int64_t s = 0; s < visible; ++s)
          any |= row[s] = given[m * row_stride + s] && (window == 0 || slot - s < window);
        if (!any) std::fill_n(row, visible, true);
      }
      seen.push_back(window);
      kept.push_back(allowed);
    }
    p.layers[l].allowed = kept[std::find(seen.begin(), seen.end(), window) - seen.begin()].const_data_ptr<bool>();
  }
  return kept;
}

// The step itself, over prepared pointers: the next token's logits. Row m's rotary tables are rows
// positions[m] of cos and signed_sin.
template <typename T, typename C>
at::Tensor run_step(const Prepared<T>& prepared, const at::Tensor& x, const at::Tensor& cos,
                    const at::Tensor& signed_sin, const std::vector<int64_t>& positions, int64_t slot, double eps_,
                    double scale_, bool unit_offset, bool gelu, const Routing& routing) {
  const auto [L, M, H, Hkv, S, D, Nq, Nkv, I, Hq, G, V, E] = prepared.z;
  TORCH_CHECK(slot >= 0 && slot < S, "decode_step: slot ", slot, " is outside the cache's ", S, " slots");
  const std::vector<LayerWeights<T>>& layers = prepared.layers;
  const Matrix<T>& head_matrix = prepared.head;

  at::Tensor logits = at::empty({M, V}, x.options());
  T* xp = x.data_ptr<T>();  // the residual stream, updated in place layer by layer
  // Shared between the threads: this step's q/k/v rows, attention partials, MLP activations.
  const int64_t K = std::max<int64_t>(1, routing.top_k);  // MLPs a row runs: its experts, or the one
  std::vector<T> qkv(M * (Nq + 2 * Nkv)), gate(M * K * I), up(M * K * I), projected(M * H);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t kv_heads = M * Hkv, visible = slot + 1;  // slots past this step's hold nothing yet
  const int64_t splits = std::clamp<int64_t>((8 * threads + kv_heads - 1) / kv_heads, 1, std::max<int64_t>(1, (visible + 31) / 32));
  const int64_t chunk = (visible + splits - 1) / splits, units = kv_heads * splits;
  Partial part{std::vector<float>(units * G), std::vector<float>(units * G), std::vector<float>(units * G * D)};
  const float eps = float(eps_), scale = float(scale_);
  const T* cp = cos.const_data_ptr<T>();
  const T* sp = signed_sin.const_data_ptr<T>();
  const int64_t q_stride = Nq + 2 * Nkv;

#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    std::vector<float> xf(M * std::max({H, K * I, Nq})), upcast(H), acc(kRows * M), xsum(M * std::max({H, I, Nq}));
    std::vector<float> qf(G * D), scores(G * chunk), row(D), merged(D);
    std::vector<T> y(M * Nq), rotated(D);
    // routing, each thread for itself (E dot products a row: less than one row of a projection)
    std::vector<T> logits_e(E), expert_weights(M * K), expert_out(H);
    std::vector<float> probs(E + K);
    std::vector<int64_t> chosen(M * K);
    QuantizedInput quantized;
    for (int64_t l = 0; l < L; ++l) {
      const LayerWeights<T>& w = layers[l];
      // q, k, v of the normalised residual
      norm_rows(xp, w.input_norm, unit_offset, M, H, eps, xf.data(), upcast.data());
      quantized.reset();
      auto [q0, q1] = share(Nq, t, nt);
      gemv_matrix(w.q, w.q_bias, H, xf.data(), M, qkv.data(), q_stride, q0, q1, acc.data(), xsum.data(), quantized);
      auto [k0, k1] = share(Nkv, t, nt);
      gemv_matrix(w.k, w.k_bias, H, xf.data(), M, qkv.data() + Nq, q_stride, k0, k1, acc.data(), xsum.data(),
                  quantized);
      gemv_matrix(w.v, w.v_bias, H, xf.data(), M, qkv.data() + Nq + Nkv, q_stride, k0, k1, acc.data(), xsum.data(),
                  quantized);
#pragma omp barrier
      // attention: this thread's share of (row, kv head, key chunk) units. The one unit whose chunk
      // holds the new position writes its rotated key and its value into the cache first: no other
      // unit reads that slot, so no barrier is needed between the write and the reads.
      for (int64_t u = units * t / nt; u < units * (t + 1) / nt; ++u) {
        const int64_t split = u % splits, b = u / splits / Hkv, h = u / splits % Hkv;
        const int64_t s0 = std::min(visible, split * chunk), s1 = std::min(visible, s0 + chunk);
        C* const keys = static_cast<C*>(w.keys) + (b * Hkv + h) * S * D;
        C* const values = static_cast<C*>(w.values) + (b * Hkv + h) * S * D;
        if (s0 <= slot && slot < s1) {  // rounded to the cache's dtype as the cache's update rounds
          const T* kr = qkv.data() + b * q_stride + Nq + h * D;
          rotate_head(kr, cp + positions[b] * D, sp + positions[b] * D, D, rotated.data());
          for (int64_t i = 0; i < D; ++i) {
            keys[slot * D + i] = round_to<C>(float(rotated[i]));
            values[slot * D + i] = round_to<C>(float(kr[Nkv + i]));
          }
        }
        for (int64_t j = 0; j < G; ++j) {
          rotate_head(qkv.data() + b * q_stride + (h * G + j) * D, cp + positions[b] * D, sp + positions[b] * D, D,
                      rotated.data());
          for (int64_t i = 0; i < D; ++i) qf[j * D + i] = float(rotated[i]) * scale;
        }
        attend_chunk<C>(qf.data(), G, D, keys, values, D, D,
                        w.allowed + b * visible, s0, s1, scores.data(), row.data(), &part.max[u * G],
                        &part.sum[u * G], &part.acc[u * G * D]);
      }
#pragma omp barrier
      // every thread merges all heads for itself (a few kilobytes), then projects its share of rows
      for (int64_t bh = 0; bh < kv_heads; ++bh)
        for (int64_t j = 0; j < G; ++j)
          merge_partials(part, bh, j, splits, G, D, merged.data(), y.data() + (bh / Hkv) * Nq + (bh % Hkv * G + j) * D);
      for (int64_t i = 0; i < M * Nq; ++i) xf[i] = float(y[i]);
      quantized.reset();
      auto [h0, h1] = share(H, t, nt);
      gemv_matrix(w.o, w.o_bias, Nq, xf.data(), M, projected.data(), H, h0, h1, acc.data(), xsum.data(), quantized);
      add_rows(xp, projected.data(), M, H, h0, h1);  // the residual, for the rows this thread owns
#pragma omp barrier
      norm_rows(xp, w.post_norm, unit_offset, M, H, eps, xf.data(), upcast.data());
      if (w.router != nullptr) {
        experts_mlp(w, routing, M, H, I, E, t, nt, xf.data(), acc.data(), logits_e.data(), probs.data(),
                    chosen.data(), expert_weights.data(), gate.data(), up.data(), expert_out.data(), projected.data(),
                    gelu);
        add_rows(xp, projected.data(), M, H, h0, h1);
#pragma omp barrier
        continue;
      }
      // the gated MLP
      quantized.reset();
      auto [i0, i1] = share(I, t, nt);
      gemv_matrix(w.gate, w.gate_bias, H, xf.data(), M, gate.data(), I, i0, i1, acc.data(), xsum.data(), quantized);
      gemv_matrix(w.up, w.up_bias, H, xf.data(), M, up.data(), I, i0, i1, acc.data(), xsum.data(), quantized);
      for (int64_t m = 0; m < M; ++m) {
        T* g = gate.data() + m * I;
        gelu ? gelu_tanh_mul_range(g, up.data() + m * I, g, i0, i1) : silu_mul_range(g, up.data() + m * I, g, i0, i1);
      }
#pragma omp barrier
      for (int64_t i = 0; i < M * I; ++i) xf[i] = float(gate[i]);
      quantized.reset();
      gemv_matrix(w.down, w.down_bias, I, xf.data(), M, projected.data(), H, h0, h1, acc.data(), xsum.data(),
                  quantized);
      add_rows(xp, projected.data(), M, H, h0, h1);
#pragma omp barrier
    }
    norm_rows(xp, prepared.final_norm, unit_offset, M, H, eps, xf.data(), upcast.data());
    quantized.reset();
    auto [v0, v1] = share(V, t, nt);
    gemv_matrix(head_matrix, static_cast<const T*>(nullptr), H, xf.data(), M, logits.data_ptr<T>(), V, v0, v1,
                acc.data(), xsum.data(), quantized);
  }
  return logits;
}

inline bool gelu_activation(c10::string_view activation) {
  TORCH_CHECK(activation == "silu" || activation == "gelu_tanh", "decode_step: activation `", activation,
              "`; expected silu or gelu_tanh");
  return activation == "gelu_tanh";
}

// A model's side of the fused step, given once (runtime/fused_decode.py keeps one per decoder): the
// layers' tensors by name, the final norm, the head and the token embedding (dense, or a packed matrix
// with its parts), each layer's window, and how the step computes. Converting and checking the layers'
// dicts on every call cost ~15 us a layer (a third of a millisecond a token for a 30-layer model); a plan
// checks them on its first step and again only when the batch or a cache's storage changes. A step
// takes only what changes: the tokens, their positions, the attention mask and the caches. The
// embedding lookup, the rotary rows and the masks are done here because as torch ops, each a few
// microseconds warm, they cost ~0.4 ms a token after the step has streamed the weights through the caches.
struct DecodePlan : torch::CustomClassHolder {
  StepModel model;
  std::optional<double> embedding_scale;
  double eps, scale;
  bool unit_offset, gelu;
  std::optional<Prepared<float>> as_float;
  std::optional<Prepared<c10::BFloat16>> as_bfloat16;
  std::mutex busy;  // one step at a time: a step points the prepared layers at its masks

  DecodePlan(c10::List<Layer> layers, at::Tensor final_norm, at::Tensor head, Layer head_parts, at::Tensor embedding,
             Layer embedding_parts, std::optional<double> embedding_scale, std::vector<int64_t> windows, double eps,
             double scale, bool unit_offset, std::string activation, bool int8_activations, int64_t top_k,
             bool normalize_top_k)
      : model{std::move(layers),          std::move(final_norm),      std::move(head), std::move(embedding),
              std::move(head_parts),      std::move(embedding_parts), std::move(windows), int8_activations,
              Routing{top_k, normalize_top_k}},
        embedding_scale(embedding_scale), eps(eps), scale(scale), unit_offset(unit_offset),
        gelu(gelu_activation(activation)) {
    for (const int64_t window : model.windows)
      TORCH_CHECK(window >= 0, "decode_step: window ", window, "; expected a positive size, or 0 for none");
  }

  // The logits after each row's token `ids` at `positions` (rows of the rotary tables `cos` and
  // `signed_sin`, (positions, head_size)), its key and value written to cache slot `slot`.
  at::Tensor step(at::Tensor ids, at::Tensor positions, at::Tensor attention_mask, std::vector<at::Tensor> keys,
                  std::vector<at::Tensor> values, at::Tensor cos, at::Tensor signed_sin, int64_t slot) {
    std::lock_guard<std::mutex> lock(busy);
    const int64_t M = ids.numel();
    auto run = [&](auto& prepared) {
      using T = typename std::decay_t<decltype(*prepared)>::Scalar;
      if (!prepared || !still_fits(*prepared, M, keys, values)) prepared = prepare<T>(model, M, keys, values);
      const int64_t D = prepared->z.D;
      require<T>(cos, "cos");
      require<T>(signed_sin, "signed_sin");
      TORCH_CHECK(cos.dim() == 2 && cos.size(1) == D && cos.is_contiguous() && signed_sin.sizes() == cos.sizes() &&
                      signed_sin.is_contiguous(),
                  "decode_step: cos and signed_sin must be (positions, ", D, "), contiguous, got ", cos.sizes(), " and ",
                  signed_sin.sizes());
      const auto tokens = row_values(ids, "token id", M, prepared->vocabulary, "the embedding's rows");
      const auto rows = row_values(positions, "position", M, cos.size(0), "the rotary tables' rows");
      TORCH_CHECK(slot >= 0 && slot < prepared->z.S, "decode_step: slot ", slot, " is outside the cache's ",
                  prepared->z.S, " slots");
      const auto masks = point_masks(*prepared, model.windows, attention_mask, slot);
      const at::Tensor x = embed(*prepared, tokens, embedding_scale, model.final_norm.options());
      // the cache's dtype, checked by prepare: every layer alike
      const auto step = keys[0].scalar_type() == at::kHalf       ? run_step<T, c10::Half>
                        : keys[0].scalar_type() == at::kBFloat16 ? run_step<T, c10::BFloat16>
                                                                 : run_step<T, float>;
      return step(*prepared, x, cos, signed_sin, rows, slot, eps, scale, unit_offset, gelu, model.routing);
    };
    return model.final_norm.scalar_type() == at::kBFloat16 ? run(as_bfloat16) : run(as_float);
  }
};

}  // namespace specformer
