// The building blocks of specformer's CPU kernels: GEMV rows, torch-ordered sums, SwiGLU, and the
// chunks of single-query attention. decode.cpp makes torch ops of them and decode_step.h a whole decode
// step; decode.cpp's header says how they round and how they are built.

#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
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

namespace specformer {

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
  } else if constexpr (std::is_same_v<T, c10::Half>) {  // a float16 KV cache's rows
    for (int64_t i = 0; i < n; ++i) buffer[i] = float(src[i]);
    return buffer;
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
// runs faster with 512-bit loads and a prefetch of the next rows where AVX-512 is there.
constexpr int64_t kRows = 4;
static_assert(kRows * 4 == 16, "dot_rows sums kRows x 4 dot products in one 16-lane vector");

// acc[r * M + m] = dot(W[n0 + r, :K], x[m, :K]) for full blocks of kRows rows; returns how many columns
// (a multiple of the vector width) it covered, the caller adding the rest.
#if defined(SPECFORMER_AVX512_BF16)
#define SPECFORMER_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#elif defined(SPECFORMER_AVX512)
#define SPECFORMER_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#endif
#if defined(SPECFORMER_AVX512)
SPECFORMER_TARGET inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
SPECFORMER_TARGET inline __m512 load16(const c10::BFloat16* p) {
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
SPECFORMER_TARGET inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
SPECFORMER_TARGET inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
// Rounded to nearest even, NaN to c10's quiet NaN: c10::BFloat16's own conversion, sixteen at a time.
SPECFORMER_TARGET inline void store16(c10::BFloat16* p, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
}
// A dequantised weight (q * scale + offset) stored: bfloat16 by the CPU's own conversion where it has
// one, a single instruction for store16's nine. It rounds to nearest even as store16 does but flushes
// denormals, which no such weight is: float16 scales (and float32 products of them with 6-bit integers)
// put every nonzero weight at 2^-47 or more.
SPECFORMER_TARGET inline void store16_weight(float* p, __m512 v) { store16(p, v); }
SPECFORMER_TARGET inline void store16_weight(c10::BFloat16* p, __m512 v) {
#if defined(SPECFORMER_AVX512_BF16)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
#else
  store16(p, v);
#endif
}

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

template <typename T>
SPECFORMER_TARGET int64_t dot_rows(const T* w, int64_t K, const float* xf, int64_t M, float* acc) {
  const int64_t covered = K / 16 * 16;
  int64_t m0 = 0;
  // Four rows of x at a time (batched decoding): each weight vector is loaded, and widened, once for all
  // four, and the sixteen dot products end in one vector. Row by row, loads bound the loop from M ~ 4.
  for (; m0 + 4 <= M; m0 += 4) {
    __m512 sums[kRows * 4];  // sums[r * 4 + i]: W row r with x row m0 + i
    for (auto& sum : sums) sum = _mm512_setzero_ps();
    for (int64_t k = 0; k < covered; k += 16) {
      __m512 wv[kRows];
      for (int64_t r = 0; r < kRows; ++r) {
        if (m0 == 0) _mm_prefetch(reinterpret_cast<const char*>(w + (kRows + r) * K + k), _MM_HINT_T1);
        wv[r] = load16(w + r * K + k);
      }
      for (int64_t i = 0; i < 4; ++i) {
        const __m512 xv = _mm512_loadu_ps(xf + (m0 + i) * K + k);
        for (int64_t r = 0; r < kRows; ++r) sums[r * 4 + i] = _mm512_fmadd_ps(wv[r], xv, sums[r * 4 + i]);
      }
    }
    float totals[16];
    _mm512_storeu_ps(totals, transpose_sum16(sums));
    for (int64_t r = 0; r < kRows; ++r)
      for (int64_t i = 0; i < 4; ++i) acc[r * M + m0 + i] = totals[r * 4 + i];
  }
  for (int64_t m = m0; m < M; ++m) {
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

// ---- gated activation: silu(gate) * up (SwiGLU) --------------------------------------------------------
// x / (1 + exp(-x)) with torch's vectorised exp, as torch's silu computes it.
// out[i] = silu(gate[i]) * up[i] for i in [begin, end). torch's silu loop takes two of its vectors a step
// (its AVX-512 build is used where the CPU has it) and leaves the rest of its range to scalar std::exp;
// so does this one.
template <typename T> void silu_mul_range(const T* gp, const T* up_, T* op, int64_t begin, int64_t end) {
  const Vec one(1.f);
  const int64_t vectorised = begin + (end - begin) / SPECFORMER_SILU_STEP * SPECFORMER_SILU_STEP;
  int64_t i = begin;
  if constexpr (std::is_same_v<T, float>) {  // straight from and to memory: a prompt's rows are long
    for (; i < vectorised; i += Vec::size()) {
      const Vec x = Vec::loadu(gp + i);
      ((x / (one + x.neg().exp())) * Vec::loadu(up_ + i)).store(op + i);
    }
  }
  float g[Vec::size()], u[Vec::size()], y[Vec::size()];
  for (; i < end; i += Vec::size()) {
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

// out[i] = gelu_tanh(gate[i]) * up[i] (GeGLU, Gemma's), with the tanh approximation in torch's formula.
template <typename T> void gelu_tanh_mul_range(const T* gp, const T* up_, T* op, int64_t begin, int64_t end) {
  constexpr float kBeta = float(M_SQRT2 * M_2_SQRTPI * 0.5), kKappa = 0.044715f;
  float g[Vec::size()], u[Vec::size()], y[Vec::size()];
  for (int64_t i = begin; i < end; i += Vec::size()) {
    const int64_t n = std::min<int64_t>(Vec::size(), end - i);
    for (int64_t j = 0; j < n; ++j) g[j] = float(gp[i + j]), u[j] = float(up_[i + j]);
    if (n == Vec::size()) {
      const Vec x = Vec::loadu(g);
      const Vec inner = Vec(kBeta) * (x + Vec(kKappa) * (x * x * x));
      (Vec(0.5f) * x * (Vec(1.f) + inner.tanh())).store(y);
    } else {
      for (int64_t j = 0; j < n; ++j)
        y[j] = 0.5f * g[j] * (1.f + std::tanh(kBeta * (g[j] + kKappa * (g[j] * g[j] * g[j]))));
    }
    for (int64_t j = 0; j < n; ++j) op[i + j] = round_to<T>(float(round_to<T>(y[j])) * u[j]);
  }
}

// One head's rotary: x * cos + roll(x, D/2) * signed_sin (signed_sin = (-sin1, sin2), so the roll is
// rotate_half), each product and the sum rounded to T as torch's three ops round them.
template <typename T> inline void rotate_head(const T* x, const T* c, const T* s, int64_t D, T* out) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < D; ++i) {
    const T rolled = x[i < half ? i + half : i - half];
    out[i] = round_to<T>(float(round_to<T>(float(x[i]) * float(c[i]))) + float(round_to<T>(float(rolled) * float(s[i]))));
  }
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
  if (n == 0) {  // a chunk past the keys: nothing to merge
    std::fill_n(max, G, -INFINITY);
    std::fill_n(sum, G, 0.f);
    std::fill_n(acc, G * D, 0.f);
    return;
  }
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

}  // namespace specformer
