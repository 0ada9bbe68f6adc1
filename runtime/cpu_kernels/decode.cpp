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
#include <omp.h>
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

// y[m, n] = x[m, :] . W[n, :] + b[n] for rows [n0, n1) of W (n0 a multiple of kRows), rounded to T once
// from float32. xf holds the M input rows in float32.
template <typename T>
void gemv_share(const T* w, const T* bias, int64_t K, const float* xf, int64_t M, T* y, int64_t y_stride, int64_t n0,
                int64_t n1, float* acc) {
  for (int64_t n = n0; n < n1; n += kRows) {
    const int64_t rows = std::min<int64_t>(kRows, n1 - n);
    std::fill_n(acc, kRows * M, 0.f);
    const int64_t covered = rows == kRows ? dot_rows(w + n * K, K, xf, M, acc) : 0;
    for (int64_t r = 0; r < rows; ++r) {
      const T* wr = w + (n + r) * K;
      for (int64_t m = 0; m < M; ++m) {
        float sum = acc[r * M + m];
        for (int64_t k = covered; k < K; ++k) sum += float(wr[k]) * xf[m * K + k];
        if (bias) sum += float(bias[n + r]);
        y[m * y_stride + n + r] = round_to<T>(sum);
      }
    }
  }
}

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
    gemv_share(wp, b, K, xf.data(), M, yp, N, begin * kRows, std::min(N, end * kRows), acc.data());
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
// out[i] = silu(gate[i]) * up[i] for i in [begin, end). torch's silu loop takes two of its vectors a step
// (its AVX-512 build is used where the CPU has it) and leaves the rest of its range to scalar std::exp;
// so does this one.
template <typename T> void silu_mul_range(const T* gp, const T* up_, T* op, int64_t begin, int64_t end) {
  const Vec one(1.f);
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
}

template <typename T> at::Tensor silu_mul_impl(const at::Tensor& gate_in, const at::Tensor& up_in) {
  const at::Tensor gate = gate_in.contiguous(), up = up_in.contiguous();
  require<T>(gate, "gate");
  require<T>(up, "up");
  TORCH_CHECK(gate.sizes() == up.sizes(), "gate ", gate.sizes(), " and up ", up.sizes(), " differ");
  at::Tensor out = at::empty_like(gate);
  const T* gp = gate.const_data_ptr<T>();
  const T* up_ = up.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, gate.numel(), 32768, [&](int64_t begin, int64_t end) { silu_mul_range(gp, up_, op, begin, end); });
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

// Query head j of kv head bg (b * Hkv + g): its chunks' partial softmaxes merged into one output row.
template <typename T>
void merge_partials(const Partial& part, int64_t bg, int64_t j, int64_t splits, int64_t G, int64_t D, float* merged,
                    T* out) {
  float hi = -INFINITY;
  for (int64_t sp = 0; sp < splits; ++sp) hi = std::max(hi, part.max[(bg * splits + sp) * G + j]);
  float total = 0.f;
  std::fill_n(merged, D, 0.f);
  for (int64_t sp = 0; sp < splits; ++sp) {
    const int64_t at = (bg * splits + sp) * G + j;
    if (part.max[at] == -INFINITY) continue;
    const float w = std::exp(part.max[at] - hi);
    total += w * part.sum[at];
    for (int64_t i = 0; i < D; ++i) merged[i] += w * part.acc[at * D + i];
  }
  // A query that may see no key at all gets zeros, not 0/0.
  const float inv = total > 0.f ? 1.f / total : 0.f;
  for (int64_t i = 0; i < D; ++i) out[i] = round_to<T>(merged[i] * inv);
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
  for (int64_t bg = 0; bg < heads; ++bg)
    for (int64_t j = 0; j < G; ++j)  // (b, g * G + j) in (B, H) order
      merge_partials(part, bg, j, splits, G, D, merged.data(), op + (bg * G + j) * D);
  return out;
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& allowed, double scale) {
  if (q.scalar_type() == at::kBFloat16) return decode_impl<c10::BFloat16>(q, k, v, allowed, scale);
  return decode_impl<float>(q, k, v, allowed, scale);
}


// ---- a whole decode step of a pre-norm rotary decoder, in one parallel region -----------------------
// Op by op, a one-token step of a 30-layer model is ~400 kernel calls: each pays its launch, and each
// parallel region ends with both threads waiting for the slower one while the memory bus idles. Here the
// threads enter one OpenMP region per step and stream every weight matrix back to back, split by rows,
// meeting at a barrier only where the next phase needs all of the previous one's output (six a layer).
// The small per-token work (norms of one row, rotary of one position, the attention merge) is done by
// every thread on its own copy rather than shared behind another barrier. Each phase rounds to the
// model's dtype where the op-by-op model does, with the kernels above, so bfloat16 follows it closely.
template <typename T> struct LayerWeights {
  const T *input_norm, *q, *k, *v, *o, *post_norm, *gate, *up, *down;
  const T *q_bias, *k_bias, *v_bias, *o_bias, *gate_bias, *up_bias, *down_bias;
  T *keys, *values;
  const bool* allowed;  // (B|1, S): which cache slots each row's query may see
  int64_t allowed_batch_stride;
};

// This thread's rows of an N-row matrix: whole kRows blocks, split evenly.
inline std::pair<int64_t, int64_t> share(int64_t N, int64_t thread, int64_t threads) {
  const int64_t blocks = (N + kRows - 1) / kRows;
  return {std::min(N, blocks * thread / threads * kRows), std::min(N, blocks * (thread + 1) / threads * kRows)};
}

// RMSNorm of M rows of x into float32 (rounded to T first where the model rounds), as rms_norm_impl.
template <typename T>
void norm_rows(const T* x, const T* weight, int64_t M, int64_t dim, float eps, float* out, float* upcast) {
  for (int64_t m = 0; m < M; ++m) {
    const T* xr = x + m * dim;
    const float* xf = as_float(xr, upcast, dim);
    const float inv = 1.f / std::sqrt(torch_sum_of_squares(xf, dim) / float(dim) + eps);
    for (int64_t i = 0; i < dim; ++i) {
      if constexpr (std::is_same_v<T, float>) {
        out[m * dim + i] = (xr[i] * inv) * weight[i];
      } else {
        out[m * dim + i] = float(round_to<T>(float(weight[i]) * float(round_to<T>(xf[i] * inv))));
      }
    }
  }
}

// One head's rotary, as `rotate` does it.
template <typename T> inline void rotate_head(const T* x, const T* c, const T* s, int64_t D, T* out) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < D; ++i) {
    const T rolled = x[i < half ? i + half : i - half];
    out[i] = round_to<T>(float(round_to<T>(float(x[i]) * float(c[i]))) + float(round_to<T>(float(rolled) * float(s[i]))));
  }
}

template <typename T>
at::Tensor decode_step_impl(const at::Tensor& hidden, const std::vector<at::Tensor>& weights,
                            const std::vector<std::optional<at::Tensor>>& biases, const std::vector<at::Tensor>& keys,
                            const std::vector<at::Tensor>& values, const std::vector<at::Tensor>& allowed,
                            const at::Tensor& cos, const at::Tensor& signed_sin, int64_t slot, double eps_,
                            double scale_) {
  constexpr int64_t kPerLayer = 9, kBiases = 7;
  const int64_t L = int64_t(keys.size());
  TORCH_CHECK(L > 0 && int64_t(weights.size()) == kPerLayer * L + 2 && int64_t(biases.size()) == kBiases * L &&
                  int64_t(values.size()) == L && int64_t(allowed.size()) == L,
              "decode_step: ", weights.size(), " weights, ", biases.size(), " biases, ", keys.size(), " keys, ",
              values.size(), " values and ", allowed.size(), " masks do not describe whole layers");
  const at::Tensor x0 = hidden.contiguous();
  require<T>(x0, "hidden");
  TORCH_CHECK(x0.dim() == 2, "hidden must be (batch, hidden_size), got ", x0.sizes());
  const int64_t M = x0.size(0), H = x0.size(1);
  const int64_t Hkv = keys[0].size(1), S = keys[0].size(2), D = keys[0].size(3);
  const int64_t Nq = weights[1].size(0), Nkv = weights[2].size(0), I = weights[6].size(0);
  const int64_t Hq = Nq / D, G = Hq / Hkv, V = weights[kPerLayer * L + 1].size(0);
  TORCH_CHECK(slot >= 0 && slot < S, "decode_step: slot ", slot, " is outside the cache's ", S, " slots");
  TORCH_CHECK(Nq % D == 0 && Hq % Hkv == 0 && Nkv == Hkv * D && D % 2 == 0,
              "decode_step: q rows ", Nq, ", kv rows ", Nkv, " and head size ", D, " do not fit together");
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == D && (cos.size(0) == 1 || cos.size(0) == M) && cos.is_contiguous() &&
                  signed_sin.sizes() == cos.sizes() && signed_sin.is_contiguous(),
              "decode_step: cos and signed_sin must be (batch or 1, ", D, "), got ", cos.sizes());
  require<T>(cos, "cos");
  require<T>(signed_sin, "signed_sin");
  std::vector<LayerWeights<T>> layers(L);
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = &weights[kPerLayer * l];
    const int64_t shapes[kPerLayer][2] = {{H, 1}, {Nq, H}, {Nkv, H}, {Nkv, H}, {H, Nq}, {H, 1}, {I, H}, {I, H}, {H, I}};
    for (int64_t i = 0; i < kPerLayer; ++i) {
      require<T>(w[i], "weight");
      const bool fits = shapes[i][1] == 1 ? w[i].numel() == shapes[i][0]
                                          : w[i].dim() == 2 && w[i].size(0) == shapes[i][0] && w[i].size(1) == shapes[i][1];
      TORCH_CHECK(fits && w[i].is_contiguous(), "decode_step: layer ", l, " weight ", i, " has shape ", w[i].sizes());
    }
    const T* b[kBiases];
    const int64_t bias_rows[kBiases] = {Nq, Nkv, Nkv, H, I, I, H};
    for (int64_t i = 0; i < kBiases; ++i) {
      const auto& bias = biases[kBiases * l + i];
      b[i] = nullptr;
      if (bias.has_value()) {
        require<T>(*bias, "bias");
        TORCH_CHECK(bias->numel() == bias_rows[i] && bias->is_contiguous(), "decode_step: layer ", l, " bias ", i,
                    " has shape ", bias->sizes());
        b[i] = bias->const_data_ptr<T>();
      }
    }
    for (const at::Tensor* cache : {&keys[l], &values[l]}) {
      require<T>(*cache, "cache");
      TORCH_CHECK(cache->dim() == 4 && cache->size(0) == M && cache->size(1) == Hkv && cache->size(2) == S &&
                      cache->size(3) == D && cache->is_contiguous(),
                  "decode_step: layer ", l, " cache has shape ", cache->sizes(), "; expected (", M, ", ", Hkv, ", ", S,
                  ", ", D, ")");
    }
    const at::Tensor& mask = allowed[l];
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(1) > slot && mask.size(1) <= S &&
                    mask.stride(1) == 1 && (mask.size(0) == 1 || mask.size(0) == M),
                "decode_step: layer ", l, " mask must be a (batch or 1, ", slot + 1, " to ", S, ") bool mask over the ",
                "cache's slots, got ", mask.sizes());
    layers[l] = {w[0].const_data_ptr<T>(), w[1].const_data_ptr<T>(), w[2].const_data_ptr<T>(),
                 w[3].const_data_ptr<T>(), w[4].const_data_ptr<T>(), w[5].const_data_ptr<T>(),
                 w[6].const_data_ptr<T>(), w[7].const_data_ptr<T>(), w[8].const_data_ptr<T>(),
                 b[0], b[1], b[2], b[3], b[4], b[5], b[6],
                 keys[l].data_ptr<T>(), values[l].data_ptr<T>(), mask.const_data_ptr<bool>(),
                 mask.size(0) == 1 ? 0 : mask.stride(0)};
  }
  const at::Tensor& final_norm = weights[kPerLayer * L];
  const at::Tensor& head = weights[kPerLayer * L + 1];
  require<T>(final_norm, "norm");
  require<T>(head, "lm_head");
  TORCH_CHECK(final_norm.numel() == H && head.dim() == 2 && head.size(1) == H && head.is_contiguous(),
              "decode_step: final norm ", final_norm.sizes(), " or lm_head ", head.sizes(), " does not fit ", H);

  at::Tensor x = x0.clone();  // the residual stream, updated in place layer by layer
  at::Tensor logits = at::empty({M, V}, x0.options());
  T* xp = x.data_ptr<T>();
  // Shared between the threads: this step's q/k/v rows, attention partials, MLP activations.
  std::vector<T> qkv(M * (Nq + 2 * Nkv)), gate(M * I), up(M * I), projected(M * H);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t kv_heads = M * Hkv, visible = slot + 1;  // slots past this step's hold nothing yet
  const int64_t splits = std::clamp<int64_t>((8 * threads + kv_heads - 1) / kv_heads, 1, std::max<int64_t>(1, (visible + 31) / 32));
  const int64_t chunk = (visible + splits - 1) / splits, units = kv_heads * splits;
  Partial part{std::vector<float>(units * G), std::vector<float>(units * G), std::vector<float>(units * G * D)};
  const float eps = float(eps_), scale = float(scale_);
  const T* cp = cos.const_data_ptr<T>();
  const T* sp = signed_sin.const_data_ptr<T>();
  const int64_t rope_stride = cos.size(0) == 1 ? 0 : D;
  const int64_t q_stride = Nq + 2 * Nkv;

#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    std::vector<float> xf(M * std::max({H, I, Nq})), upcast(H), acc(kRows * M);
    std::vector<float> qf(G * D), scores(G * chunk), row(D), merged(D);
    std::vector<T> y(M * Nq), rotated(D);
    for (int64_t l = 0; l < L; ++l) {
      const LayerWeights<T>& w = layers[l];
      // q, k, v of the normalised residual
      norm_rows(xp, w.input_norm, M, H, eps, xf.data(), upcast.data());
      auto [q0, q1] = share(Nq, t, nt);
      gemv_share(w.q, w.q_bias, H, xf.data(), M, qkv.data(), q_stride, q0, q1, acc.data());
      auto [k0, k1] = share(Nkv, t, nt);
      gemv_share(w.k, w.k_bias, H, xf.data(), M, qkv.data() + Nq, q_stride, k0, k1, acc.data());
      gemv_share(w.v, w.v_bias, H, xf.data(), M, qkv.data() + Nq + Nkv, q_stride, k0, k1, acc.data());
#pragma omp barrier
      // the new position's rotated key and its value into the cache
      for (int64_t bh = t; bh < kv_heads; bh += nt) {
        const int64_t b = bh / Hkv, h = bh % Hkv;
        const T* kr = qkv.data() + b * q_stride + Nq + h * D;
        const T* vr = kr + Nkv;
        T* kc = w.keys + ((b * Hkv + h) * S + slot) * D;
        rotate_head(kr, cp + b * rope_stride, sp + b * rope_stride, D, kc);
        std::copy_n(vr, D, w.values + ((b * Hkv + h) * S + slot) * D);
      }
#pragma omp barrier
      // attention: this thread's share of (row, kv head, key chunk) units
      for (int64_t u = units * t / nt; u < units * (t + 1) / nt; ++u) {
        const int64_t split = u % splits, b = u / splits / Hkv, h = u / splits % Hkv;
        const int64_t s0 = std::min(visible, split * chunk), s1 = std::min(visible, s0 + chunk);
        if (s0 == s1) {
          std::fill_n(&part.max[u * G], G, -INFINITY);
          std::fill_n(&part.sum[u * G], G, 0.f);
          std::fill_n(&part.acc[u * G * D], G * D, 0.f);
          continue;
        }
        for (int64_t j = 0; j < G; ++j) {
          rotate_head(qkv.data() + b * q_stride + (h * G + j) * D, cp + b * rope_stride, sp + b * rope_stride, D,
                      rotated.data());
          for (int64_t i = 0; i < D; ++i) qf[j * D + i] = float(rotated[i]) * scale;
        }
        const int64_t cache_offset = (b * Hkv + h) * S * D;
        attend_chunk<T>(qf.data(), G, D, w.keys + cache_offset, w.values + cache_offset, D, D,
                        w.allowed + b * w.allowed_batch_stride, s0, s1, scores.data(), row.data(), &part.max[u * G],
                        &part.sum[u * G], &part.acc[u * G * D]);
      }
#pragma omp barrier
      // every thread merges all heads for itself (a few kilobytes), then projects its share of rows
      for (int64_t bh = 0; bh < kv_heads; ++bh)
        for (int64_t j = 0; j < G; ++j)
          merge_partials(part, bh, j, splits, G, D, merged.data(), y.data() + (bh / Hkv) * Nq + (bh % Hkv * G + j) * D);
      for (int64_t i = 0; i < M * Nq; ++i) xf[i] = float(y[i]);
      auto [h0, h1] = share(H, t, nt);
      gemv_share(w.o, w.o_bias, Nq, xf.data(), M, projected.data(), H, h0, h1, acc.data());
      for (int64_t m = 0; m < M; ++m)  // the residual, for the rows this thread owns
        for (int64_t n = h0; n < h1; ++n) xp[m * H + n] = round_to<T>(float(xp[m * H + n]) + float(projected[m * H + n]));
#pragma omp barrier
      // the gated MLP
      norm_rows(xp, w.post_norm, M, H, eps, xf.data(), upcast.data());
      auto [i0, i1] = share(I, t, nt);
      gemv_share(w.gate, w.gate_bias, H, xf.data(), M, gate.data(), I, i0, i1, acc.data());
      gemv_share(w.up, w.up_bias, H, xf.data(), M, up.data(), I, i0, i1, acc.data());
      for (int64_t m = 0; m < M; ++m) silu_mul_range(gate.data() + m * I, up.data() + m * I, gate.data() + m * I, i0, i1);
#pragma omp barrier
      for (int64_t i = 0; i < M * I; ++i) xf[i] = float(gate[i]);
      gemv_share(w.down, w.down_bias, I, xf.data(), M, projected.data(), H, h0, h1, acc.data());
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = h0; n < h1; ++n) xp[m * H + n] = round_to<T>(float(xp[m * H + n]) + float(projected[m * H + n]));
#pragma omp barrier
    }
    norm_rows(xp, final_norm.const_data_ptr<T>(), M, H, eps, xf.data(), upcast.data());
    auto [v0, v1] = share(V, t, nt);
    gemv_share(head.const_data_ptr<T>(), static_cast<const T*>(nullptr), H, xf.data(), M, logits.data_ptr<T>(), V,
               v0, v1, acc.data());
  }
  return logits;
}

at::Tensor decode_step(const at::Tensor& hidden, const std::vector<at::Tensor>& weights,
                       const std::vector<std::optional<at::Tensor>>& biases, const std::vector<at::Tensor>& keys,
                       const std::vector<at::Tensor>& values, const std::vector<at::Tensor>& allowed,
                       const at::Tensor& cos, const at::Tensor& signed_sin, int64_t slot, double eps, double scale) {
  if (hidden.scalar_type() == at::kBFloat16)
    return decode_step_impl<c10::BFloat16>(hidden, weights, biases, keys, values, allowed, cos, signed_sin, slot, eps, scale);
  return decode_step_impl<float>(hidden, weights, biases, keys, values, allowed, cos, signed_sin, slot, eps, scale);
}

}  // namespace

TORCH_LIBRARY(specformer_cpu, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  m.def("rotary(Tensor q, Tensor k, Tensor cos, Tensor signed_sin) -> (Tensor, Tensor)");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? allowed, float scale) -> Tensor");
  m.def(
      "decode_step(Tensor hidden, Tensor[] weights, Tensor?[] biases, Tensor(a!)[] keys, Tensor(b!)[] values, "
      "Tensor[] allowed, Tensor cos, Tensor signed_sin, int slot, float eps, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(specformer_cpu, CPU, m) {
  m.impl("linear", linear);
  m.impl("rms_norm", rms_norm);
  m.impl("silu_mul", silu_mul);
  m.impl("rotary", rotary);
  m.impl("decode_attention", decode_attention);
  m.impl("decode_step", decode_step);
}
