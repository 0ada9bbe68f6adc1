// Fused CPU kernels for inference (see __init__.py for when they run and how they are built).
//
// Each replaces a handful of small aten ops whose dispatch and cache misses, not arithmetic, dominate
// eager decoding on the CPU. RMSNorm, SwiGLU and rotary give torch's results bit for bit: every product
// and sum a torch op rounds to the tensor's dtype is rounded here too, sums run in torch's order, the
// exp is torch's, and the file is built with -ffp-contract=off so no multiply-add is fused behind our
// back. Decode attention (split over keys, then merged) and the GEMV are different algorithms from
// torch's, so they agree to float rounding. The file is built for AVX2, as torch builds those kernels;
// only the GEMV's and attention's inner loops use AVX-512, where the CPU has it, through target attributes.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(SPECFORMER_AVX512)
#include <immintrin.h>
#endif
#ifndef SPECFORMER_SILU_STEP
#define SPECFORMER_SILU_STEP 16
#endif

namespace {

using Vec = at::vec::Vectorized<float>;

// Round to the storage type, as each separate torch op would.
template <typename T> inline T round_to(float x) { return static_cast<T>(x); }

inline float hsum(Vec v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

template <typename T> void require(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == c10::CppTypeToScalarType<T>::value, name, " has dtype ", t.scalar_type());
  TORCH_CHECK(t.dim() == 0 || t.stride(-1) == 1, name, " must be contiguous in its last dimension");
}

template <typename T> inline const float* as_float(const T* src, float* buffer, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    // bfloat16 is float32's upper half: widening is a 16-bit shift, written on the bits so it vectorises.
    const auto* bits = reinterpret_cast<const uint16_t*>(src);
    auto* widened = reinterpret_cast<uint32_t*>(buffer);
    for (int64_t i = 0; i < n; ++i) widened[i] = uint32_t(bits[i]) << 16;
    return buffer;
  }
}

// ---- linear for a few rows (decoding): y = x W^T + b ------------------------------------------------
// Decoding multiplies one row per sequence by every weight matrix: a matrix-vector product bound by
// reading W once. Each thread streams a contiguous band of W's rows, four at a time, and applies them
// to every input row while they are in L1. bfloat16 weights widen to float32 in registers (a 16-bit
// shift) and accumulate in float32, rounding once at the end, as oneDNN's bf16 GEMM does. Streaming
// runs measurably faster with 512-bit loads and a prefetch of the next rows (AVX2: ~20 % slower).
constexpr int64_t kRows = 4;

// acc[r * M + m] = dot(W[n0 + r, :K], x[m, :K]) for full blocks of kRows rows; returns how many columns
// (a multiple of the vector width) it covered, the caller adding the rest.
#if defined(SPECFORMER_AVX512)
#define SPECFORMER_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
SPECFORMER_TARGET inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
SPECFORMER_TARGET inline __m512 load16(const c10::BFloat16* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

template <typename T>
SPECFORMER_TARGET int64_t dot_rows(const T* w, int64_t K, const float* xf, int64_t M, float* acc) {
  const int64_t covered = K / 16 * 16;
  for (int64_t m = 0; m < M; ++m) {
    __m512 sums[kRows] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t k = 0; k < covered; k += 16) {
      const __m512 xv = _mm512_loadu_ps(xf + m * K + k);
      for (int64_t r = 0; r < kRows; ++r) {
        if (m == 0) _mm_prefetch(reinterpret_cast<const char*>(w + (kRows + r) * K + k), _MM_HINT_T1);
        sums[r] = _mm512_fmadd_ps(load16(w + r * K + k), xv, sums[r]);
      }
    }
    for (int64_t r = 0; r < kRows; ++r) acc[r * M + m] = _mm512_reduce_add_ps(sums[r]);
  }
  return covered;
}
#else
template <typename T> int64_t dot_rows(const T* w, int64_t K, const float* xf, int64_t M, float* acc) {
  const int64_t covered = K / Vec::size() * Vec::size();
  float widened[Vec::size()];
  for (int64_t m = 0; m < M; ++m) {
    Vec sums[kRows] = {Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)};
    for (int64_t k = 0; k < covered; k += Vec::size()) {
      const Vec xv = Vec::loadu(xf + m * K + k);
      for (int64_t r = 0; r < kRows; ++r) {
        const float* row = as_float(w + r * K + k, widened, Vec::size());
        sums[r] = at::vec::fmadd(Vec::loadu(row), xv, sums[r]);
      }
    }
    for (int64_t r = 0; r < kRows; ++r) acc[r * M + m] = hsum(sums[r]);
  }
  return covered;
}
#endif

template <typename T>
at::Tensor linear_impl(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const at::Tensor x = input.contiguous();
  require<T>(x, "x");
  require<T>(weight, "weight");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && x.size(-1) == weight.size(1),
              "weight ", weight.sizes(), " does not fit x ", x.sizes());
  const int64_t K = weight.size(1), N = weight.size(0), M = K == 0 ? 0 : x.numel() / K;
  const T* b = nullptr;
  if (bias.has_value()) {
    require<T>(*bias, "bias");
    TORCH_CHECK(bias->numel() == N, "bias has ", bias->numel(), " elements; expected ", N);
    b = bias->const_data_ptr<T>();
  }
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = N;
  at::Tensor out = at::empty(sizes, x.options());
  std::vector<float> xf(M * K);
  const T* xp = x.const_data_ptr<T>();
  for (int64_t i = 0; i < M * K; ++i) xf[i] = float(xp[i]);
  const T* wp = weight.const_data_ptr<T>();
  T* yp = out.data_ptr<T>();
  const int64_t blocks = (N + kRows - 1) / kRows;
  at::parallel_for(0, blocks, std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)), [&](int64_t begin, int64_t end) {
    std::vector<float> acc(kRows * M);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t n0 = block * kRows, rows = std::min<int64_t>(kRows, N - n0);
      std::fill(acc.begin(), acc.end(), 0.f);
      const int64_t covered = rows == kRows ? dot_rows(wp + n0 * K, K, xf.data(), M, acc.data()) : 0;
      for (int64_t r = 0; r < rows; ++r) {
        const T* w = wp + (n0 + r) * K;
        for (int64_t m = 0; m < M; ++m) {
          float sum = acc[r * M + m];
          for (int64_t k = covered; k < K; ++k) sum += float(w[k]) * xf[m * K + k];
          if (b) sum += float(b[n0 + r]);
          yp[m * N + n0 + r] = round_to<T>(sum);
        }
      }
    }
  });
  return out;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  if (x.scalar_type() == at::kBFloat16) return linear_impl<c10::BFloat16>(x, weight, bias);
  return linear_impl<float>(x, weight, bias);
}

// ---- RMSNorm: x * rsqrt(mean(x^2) + eps) * w --------------------------------------------------------
// sum(x^2) in the order torch's sum kernel uses for a contiguous row (SumKernel.cpp: vectors summed as
// four interleaved rows through a four-level cascade, then the scalar tail, then the vector's lanes), so
// the norm is bit for bit F.rms_norm's: a 30-layer model would otherwise drift by 1e-5 in its logits.
inline float torch_sum_of_squares(const float* x, int64_t n) {
  constexpr int64_t ilp = 4, levels = 4;
  const int64_t vectors = n / Vec::size(), rows = vectors / ilp;
  auto square = [&](int64_t v) {
    const Vec x_v = Vec::loadu(x + v * Vec::size());
    return x_v * x_v;
  };
  int64_t log2_rows = 0;
  while ((int64_t(1) << log2_rows) < rows) ++log2_rows;
  const int64_t power = std::max<int64_t>(4, log2_rows / levels), step = int64_t(1) << power, mask = step - 1;
  Vec acc[levels][ilp];
  for (auto& level : acc)
    for (auto& a : level) a = Vec(0.f);
  int64_t i = 0;
  while (i + step <= rows) {
    for (int64_t j = 0; j < step; ++j, ++i)
      for (int64_t k = 0; k < ilp; ++k) acc[0][k] = acc[0][k] + square(i * ilp + k);
    for (int64_t j = 1; j < levels; ++j) {
      for (int64_t k = 0; k < ilp; ++k) {
        acc[j][k] = acc[j][k] + acc[j - 1][k];
        acc[j - 1][k] = Vec(0.f);
      }
      if ((i & (mask << (j * power))) != 0) break;
    }
  }
  for (; i < rows; ++i)
    for (int64_t k = 0; k < ilp; ++k) acc[0][k] = acc[0][k] + square(i * ilp + k);
  for (int64_t j = 1; j < levels; ++j)
    for (int64_t k = 0; k < ilp; ++k) acc[0][k] = acc[0][k] + acc[j][k];
  Vec total = acc[0][0];
  for (int64_t v = rows * ilp; v < vectors; ++v) total = total + square(v);
  for (int64_t k = 1; k < ilp; ++k) total = total + acc[0][k];
  float sum = 0.f;
  for (int64_t t = vectors * Vec::size(); t < n; ++t) sum += x[t] * x[t];
  float lanes[Vec::size()];
  total.store(lanes);
  for (float lane : lanes) sum += lane;
  return sum;
}

template <typename T> at::Tensor rms_norm_impl(const at::Tensor& input, const at::Tensor& weight, double eps) {
  const at::Tensor x = input.contiguous();
  require<T>(x, "x");
  require<T>(weight, "weight");
  const int64_t dim = x.size(-1);
  TORCH_CHECK(weight.numel() == dim, "weight has ", weight.numel(), " elements; expected ", dim);
  at::Tensor out = at::empty_like(x);
  const T* xp = x.const_data_ptr<T>();
  const T* w = weight.const_data_ptr<T>();
  T* yp = out.data_ptr<T>();
  const int64_t rows = dim == 0 ? 0 : x.numel() / dim;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(dim, 1)), [&](int64_t begin, int64_t end) {
    std::vector<float> upcast(std::is_same_v<T, float> ? 0 : dim);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = xp + r * dim;
      T* yr = yp + r * dim;
      const float* xf = as_float(xr, upcast.data(), dim);
      const float inv = 1.f / std::sqrt(torch_sum_of_squares(xf, dim) / float(dim) + float(eps));
      for (int64_t i = 0; i < dim; ++i) {
        if constexpr (std::is_same_v<T, float>) {
          yr[i] = (xr[i] * inv) * w[i];
        } else {  // Llama's order in half precision: normalise in float32, round, then scale
          yr[i] = round_to<T>(float(w[i]) * float(round_to<T>(xf[i] * inv)));
        }
      }
    }
  });
  return out;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  if (x.scalar_type() == at::kBFloat16) return rms_norm_impl<c10::BFloat16>(x, weight, eps);
  return rms_norm_impl<float>(x, weight, eps);
}

// ---- gated activation: silu(gate) * up (SwiGLU) --------------------------------------------------------
// x / (1 + exp(-x)) with torch's vectorised exp, as torch's silu computes it.
template <typename T> at::Tensor silu_mul_impl(const at::Tensor& gate_in, const at::Tensor& up_in) {
  const at::Tensor gate = gate_in.contiguous(), up = up_in.contiguous();
  require<T>(gate, "gate");
  require<T>(up, "up");
  TORCH_CHECK(gate.sizes() == up.sizes(), "gate ", gate.sizes(), " and up ", up.sizes(), " differ");
  at::Tensor out = at::empty_like(gate);
  const T* gp = gate.const_data_ptr<T>();
  const T* up_ = up.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  const Vec one(1.f);
  at::parallel_for(0, gate.numel(), 32768, [&](int64_t begin, int64_t end) {
    // torch's silu loop takes two of its vectors a step (its AVX-512 build is used where the CPU has it)
    // and leaves the rest of its range to scalar std::exp; so does this one.
    const int64_t vectorised = begin + (end - begin) / SPECFORMER_SILU_STEP * SPECFORMER_SILU_STEP;
    float g[Vec::size()], u[Vec::size()], y[Vec::size()];
    for (int64_t i = begin; i < end; i += Vec::size()) {
      const int64_t n = std::min<int64_t>(Vec::size(), end - i);
      for (int64_t j = 0; j < n; ++j) g[j] = float(gp[i + j]), u[j] = float(up_[i + j]);
      if (i < vectorised) {
        const Vec x = Vec::loadu(g);
        (x / (one + x.neg().exp())).store(y);
      } else {
        for (int64_t j = 0; j < n; ++j) y[j] = g[j] / (1.f + std::exp(-g[j]));
      }
      for (int64_t j = 0; j < n; ++j) {
        if constexpr (std::is_same_v<T, float>) {
          op[i + j] = y[j] * u[j];
        } else {  // silu rounds to T, then the product does
          op[i + j] = round_to<T>(float(round_to<T>(y[j])) * u[j]);
        }
      }
    }
  });
  return out;
}

at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  if (gate.scalar_type() == at::kBFloat16) return silu_mul_impl<c10::BFloat16>(gate, up);
  return silu_mul_impl<float>(gate, up);
}

// ---- rotary embedding: x * cos + rotate_half(x) * sin, for q and k in one call ------------------------
// x (B, H, T, D) in any layout with a unit last stride; cos and signed_sin (B or 1, 1, T, D), where
// signed_sin = (-sin1, sin2) so that rotate_half(x) * sin == roll(x, D/2) * signed_sin. Output contiguous.
template <typename T>
at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& ssin) {
  require<T>(x, "q/k");
  const int64_t B = x.size(0), H = x.size(1), L = x.size(2), D = x.size(3), half = D / 2;
  TORCH_CHECK(D % 2 == 0 && cos.size(-1) == D && cos.size(-2) == L, "cos has shape ", cos.sizes());
  at::Tensor out = at::empty(x.sizes(), x.options());
  const T* xp = x.const_data_ptr<T>();
  const T* cp = cos.const_data_ptr<T>();
  const T* sp = ssin.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t cb = cos.size(0) == 1 ? 0 : cos.stride(0), ct = cos.stride(2);
  at::parallel_for(0, B * H * L, std::max<int64_t>(1, 16384 / D), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (H * L), h = row / L % H, t = row % L;
      const T* xr = xp + b * x.stride(0) + h * x.stride(1) + t * x.stride(2);
      const T* c = cp + b * cb + t * ct;
      const T* s = sp + b * cb + t * ct;
      T* o = op + row * D;
      for (int64_t i = 0; i < D; ++i) {
        const T rolled = xr[i < half ? i + half : i - half];
        o[i] = round_to<T>(float(round_to<T>(float(xr[i]) * float(c[i]))) +
                           float(round_to<T>(float(rolled) * float(s[i]))));
      }
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                          const at::Tensor& signed_sin) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && cos.dim() == 4 && signed_sin.sizes() == cos.sizes());
  TORCH_CHECK(cos.strides() == signed_sin.strides(), "cos and signed_sin must share a layout");
  if (q.scalar_type() == at::kBFloat16) {
    require<c10::BFloat16>(cos, "cos");
    return {rotate<c10::BFloat16>(q, cos, signed_sin), rotate<c10::BFloat16>(k, cos, signed_sin)};
  }
  require<float>(cos, "cos");
  return {rotate<float>(q, cos, signed_sin), rotate<float>(k, cos, signed_sin)};
}

// ---- attention for one new query per sequence (decoding) -------------------------------------------
// Keys are split into chunks so that every thread has work even with a few kv heads and batch 1
// (flash-decoding): each chunk yields a running max, a softmax denominator and an unnormalised output
// per query head, and the chunks are merged at the end. Each kv head's keys are read once for all the
// query heads that share it (grouped-query attention).
struct Partial {
  std::vector<float> max, sum, acc;  // (units, G), (units, G), (units, G, D)
};

#if defined(SPECFORMER_AVX512)
// The two loops over the keys with whole rows in registers, for the usual head sizes (64, 128): a kv
// row is read once per query head from L1 and widened in registers if bfloat16.
//
// Sixteen per-lane dot products summed into one vector whose lane i is dots[i]'s total: a transpose
// done as a tree of shuffles and adds (45 instructions, where 16 horizontal sums take ~130).
SPECFORMER_TARGET inline __m512 transpose_sum16(const __m512* d) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] for a = d[2i], b = d[2i+1]
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(d[2 * i], d[2 * i + 1]), _mm512_unpackhi_ps(d[2 * i], d[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the four rows 4i..4i+3, each summed over that lane
    const __m512d x = _mm512_castps_pd(pairs[2 * i]), y = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // sum over the four 128-bit lanes: lane j of the result holds rows 4j..4j+3
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(3, 1, 3, 1)));
}

template <typename T, int64_t NV>
SPECFORMER_TARGET inline __m512 row_dot(const __m512* q, const T* kr) {
  __m512 dot = _mm512_mul_ps(q[0], load16(kr));
  for (int64_t j = 1; j < NV; ++j) dot = _mm512_fmadd_ps(q[j], load16(kr + j * 16), dot);
  return dot;
}

template <typename T, int64_t NV>
SPECFORMER_TARGET void scores_avx512(const float* qf, int64_t G, const T* keys, int64_t key_stride,
                                     const T* values, int64_t value_stride, const bool* allowed, int64_t s0,
                                     int64_t n, float* scores) {
  constexpr int64_t kBlock = 16;
  for (int64_t g = 0; g < G; ++g) {
    __m512 q[NV];
    for (int64_t j = 0; j < NV; ++j) q[j] = _mm512_loadu_ps(qf + (g * NV + j) * 16);
    int64_t s = 0;
    while (s < n) {
      // Sixteen keys at a time; a partial block, or one with masked keys (a static cache's empty
      // slots: never read), goes row by row.
      const bool block = s + kBlock <= n && (!allowed || std::all_of(allowed + s0 + s, allowed + s0 + s + kBlock,
                                                                      [](bool a) { return a; }));
      const int64_t rows = block ? kBlock : 1;
      const bool masked = !block && allowed && !allowed[s0 + s];
      const T* kr = keys + (s0 + s) * key_stride;
      if (g == 0 && !masked) {  // the first pass reads from memory: ask for the keys a block ahead, and these values
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t line = 0; line < NV * 16 * int64_t(sizeof(T)); line += 64) {
            _mm_prefetch(reinterpret_cast<const char*>(kr + (kBlock + r) * key_stride) + line, _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(values + (s0 + s + r) * value_stride) + line, _MM_HINT_T1);
          }
      }
      if (block) {
        __m512 dots[kBlock];
        for (int64_t r = 0; r < kBlock; ++r) dots[r] = row_dot<T, NV>(q, kr + r * key_stride);
        _mm512_storeu_ps(scores + g * n + s, transpose_sum16(dots));
      } else {
        scores[g * n + s] = masked ? -INFINITY : _mm512_reduce_add_ps(row_dot<T, NV>(q, kr));
      }
      s += rows;
    }
  }
}

template <typename T, int64_t NV>
SPECFORMER_TARGET void values_avx512(const float* weights, int64_t G, const T* values, int64_t value_stride,
                                     int64_t s0, int64_t n, float* acc) {
  for (int64_t g = 0; g < G; ++g) {
    __m512 out[NV];
    for (int64_t j = 0; j < NV; ++j) out[j] = _mm512_setzero_ps();
    for (int64_t s = 0; s < n; ++s) {
      const float p = weights[g * n + s];
      if (p == 0.f) continue;
      const __m512 pv = _mm512_set1_ps(p);
      const T* vr = values + (s0 + s) * value_stride;
      for (int64_t j = 0; j < NV; ++j) out[j] = _mm512_fmadd_ps(pv, load16(vr + j * 16), out[j]);
    }
    for (int64_t j = 0; j < NV; ++j) _mm512_storeu_ps(acc + (g * NV + j) * 16, out[j]);
  }
}
#endif

// scores[g * n + s] = q_g . k_(s0 + s), -inf where masked (masked rows are not read).
template <typename T>
void chunk_scores(const float* qf, int64_t G, int64_t D, const T* keys, int64_t key_stride, const T* values,
                  int64_t value_stride, const bool* allowed, int64_t s0, int64_t n, float* scores, float* row) {
#if defined(SPECFORMER_AVX512)
  if (D == 64) return scores_avx512<T, 4>(qf, G, keys, key_stride, values, value_stride, allowed, s0, n, scores);
  if (D == 128) return scores_avx512<T, 8>(qf, G, keys, key_stride, values, value_stride, allowed, s0, n, scores);
#endif
  for (int64_t s = 0; s < n; ++s) {
    if (allowed && !allowed[s0 + s]) {  // e.g. a static cache's empty slots
      for (int64_t g = 0; g < G; ++g) scores[g * n + s] = -INFINITY;
      continue;
    }
    const float* kr = as_float(keys + (s0 + s) * key_stride, row, D);
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = qf + g * D;
      Vec dot(0.f);
      int64_t i = 0;
      for (; i + Vec::size() <= D; i += Vec::size()) dot = dot + Vec::loadu(qg + i) * Vec::loadu(kr + i);
      float d = hsum(dot);
      for (; i < D; ++i) d += qg[i] * kr[i];
      scores[g * n + s] = d;
    }
  }
}

// acc[g, :] = sum_s weights[g * n + s] * v_(s0 + s)
template <typename T>
void chunk_values(const float* weights, int64_t G, int64_t D, const T* values, int64_t value_stride, int64_t s0,
                  int64_t n, float* acc, float* row) {
#if defined(SPECFORMER_AVX512)
  if (D == 64) return values_avx512<T, 4>(weights, G, values, value_stride, s0, n, acc);
  if (D == 128) return values_avx512<T, 8>(weights, G, values, value_stride, s0, n, acc);
#endif
  std::fill_n(acc, G * D, 0.f);
  for (int64_t s = 0; s < n; ++s) {
    const float* vr = as_float(values + (s0 + s) * value_stride, row, D);
    for (int64_t g = 0; g < G; ++g) {
      const float p = weights[g * n + s];
      if (p == 0.f) continue;
      float* a = acc + g * D;
      const Vec vp(p);
      int64_t i = 0;
      for (; i + Vec::size() <= D; i += Vec::size()) (Vec::loadu(a + i) + vp * Vec::loadu(vr + i)).store(a + i);
      for (; i < D; ++i) a[i] += p * vr[i];
    }
  }
}

template <typename T>
void attend_chunk(const float* qf, int64_t G, int64_t D, const T* keys, const T* values, int64_t key_stride,
                  int64_t value_stride, const bool* allowed, int64_t s0, int64_t s1, float* scores, float* row,
                  float* max, float* sum, float* acc) {
  const int64_t n = s1 - s0;
  chunk_scores(qf, G, D, keys, key_stride, values, value_stride, allowed, s0, n, scores, row);
  for (int64_t g = 0; g < G; ++g) {  // softmax numerators in place, with their max and sum
    float* sc = scores + g * n;
    float hi = -INFINITY;  // vectorised: a scalar max is a chain of dependent instructions, 4 cycles each
    int64_t s = 0;
    if (n >= Vec::size()) {
      Vec vhi = Vec::loadu(sc);
      for (s = Vec::size(); s + Vec::size() <= n; s += Vec::size()) vhi = at::vec::maximum(vhi, Vec::loadu(sc + s));
      hi = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vhi);
    }
    for (; s < n; ++s) hi = std::max(hi, sc[s]);
    float total = 0.f;
    if (hi == -INFINITY) {  // the whole chunk is masked
      std::fill_n(sc, n, 0.f);
    } else {
      const Vec vhi(hi);
      Vec vtotal(0.f);
      for (s = 0; s + Vec::size() <= n; s += Vec::size()) {
        const Vec p = (Vec::loadu(sc + s) - vhi).exp_u20();
        p.store(sc + s);
        vtotal = vtotal + p;
      }
      total = hsum(vtotal);
      for (; s < n; ++s) {
        sc[s] = std::exp(sc[s] - hi);
        total += sc[s];
      }
    }
    max[g] = hi;
    sum[g] = total;
  }
  chunk_values(scores, G, D, values, value_stride, s0, n, acc, row);
}

template <typename T>
at::Tensor decode_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& allowed, double scale) {
  require<T>(q, "q");
  require<T>(k, "k");
  require<T>(v, "v");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(q.size(2) == 1, "decode_attention takes one query per sequence, got ", q.size(2));
  TORCH_CHECK(k.size(0) == B && v.sizes() == k.sizes() && k.size(3) == D && H % Hkv == 0,
              "q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(), " do not fit together");
  const bool* mask = nullptr;
  int64_t mask_batch_stride = 0;
  if (allowed.has_value()) {
    TORCH_CHECK(allowed->scalar_type() == at::kBool && allowed->dim() == 2 && allowed->size(1) == S &&
                    allowed->stride(1) == 1 && (allowed->size(0) == 1 || allowed->size(0) == B),
                "allowed must be a (batch or 1, ", S, ") bool mask, got ", allowed->sizes());
    mask = allowed->const_data_ptr<bool>();
    mask_batch_stride = allowed->size(0) == 1 ? 0 : allowed->stride(0);
  }
  const int64_t G = H / Hkv;
  const int64_t heads = B * Hkv;
  const int64_t want = 8 * at::get_num_threads();
  const int64_t splits = std::clamp<int64_t>((want + heads - 1) / heads, 1, std::max<int64_t>(1, (S + 31) / 32));
  const int64_t chunk = (S + splits - 1) / splits;
  const int64_t units = heads * splits;
  Partial part{std::vector<float>(units * G), std::vector<float>(units * G), std::vector<float>(units * G * D)};
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  const float fscale = float(scale);
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), scores(G * chunk), row(D);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t split = u % splits, b = u / splits / Hkv, g = u / splits % Hkv;
      const int64_t s0 = std::min(S, split * chunk), s1 = std::min(S, s0 + chunk);
      for (int64_t j = 0; j < G; ++j) {
        const T* qr = qp + b * q.stride(0) + (g * G + j) * q.stride(1);
        for (int64_t i = 0; i < D; ++i) qf[j * D + i] = float(qr[i]) * fscale;
      }
      if (s0 == s1) {
        std::fill_n(&part.max[u * G], G, -INFINITY);
        std::fill_n(&part.sum[u * G], G, 0.f);
        std::fill_n(&part.acc[u * G * D], G * D, 0.f);
        continue;
      }
      attend_chunk<T>(qf.data(), G, D, kp + b * k.stride(0) + g * k.stride(1), vp + b * v.stride(0) + g * v.stride(1),
                      k.stride(2), v.stride(2), mask ? mask + b * mask_batch_stride : nullptr, s0, s1, scores.data(),
                      row.data(), &part.max[u * G], &part.sum[u * G], &part.acc[u * G * D]);
    }
  });
  at::Tensor out = at::empty({B, H, 1, D}, q.options());
  T* op = out.data_ptr<T>();
  std::vector<float> merged(D);
  for (int64_t bg = 0; bg < heads; ++bg) {
    for (int64_t j = 0; j < G; ++j) {
      float hi = -INFINITY;
      for (int64_t sp = 0; sp < splits; ++sp) hi = std::max(hi, part.max[(bg * splits + sp) * G + j]);
      float total = 0.f;
      std::fill(merged.begin(), merged.end(), 0.f);
      for (int64_t sp = 0; sp < splits; ++sp) {
        const int64_t at = (bg * splits + sp) * G + j;
        if (part.max[at] == -INFINITY) continue;
        const float w = std::exp(part.max[at] - hi);
        total += w * part.sum[at];
        for (int64_t i = 0; i < D; ++i) merged[i] += w * part.acc[at * D + i];
      }
      // A query that may see no key at all gets zeros, not 0/0.
      const float inv = total > 0.f ? 1.f / total : 0.f;
      T* o = op + (bg * G + j) * D;  // (b, g * G + j) in (B, H) order
      for (int64_t i = 0; i < D; ++i) o[i] = round_to<T>(merged[i] * inv);
    }
  }
  return out;
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& allowed, double scale) {
  if (q.scalar_type() == at::kBFloat16) return decode_impl<c10::BFloat16>(q, k, v, allowed, scale);
  return decode_impl<float>(q, k, v, allowed, scale);
}

}  // namespace

TORCH_LIBRARY(specformer_cpu, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  m.def("rotary(Tensor q, Tensor k, Tensor cos, Tensor signed_sin) -> (Tensor, Tensor)");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? allowed, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(specformer_cpu, CPU, m) {
  m.impl("linear", linear);
  m.impl("rms_norm", rms_norm);
  m.impl("silu_mul", silu_mul);
  m.impl("rotary", rotary);
  m.impl("decode_attention", decode_attention);
}
