#pragma once
// ---- linear for a few rows over packed integer weights (decoding a quantized model) ------------------
// The layouts are llama.cpp's blocks as quantization/weight_only.py keeps them: int8 weights with one
// scale per group (Q8_0: groups of 32), or 4-bit weights two to a byte, the first half of a group
// in the low nibbles and the second half in the high ones, with a scale and an offset per group
// (w = q * scale + offset: Q4_1 stores its minimum; a symmetric row, Q4_0, stores none and has -8 * scale).
// Scales and offsets are float32 or float16 (int8_dot.h).
//
// Decoding is bound by reading the weights, and these are 4x (int8) or ~7x (int4) smaller than float32.
// Each weight is widened to float32 in registers and multiplied with the float activations: the same
// arithmetic as the dequantised layer up to the order of the sums, with no activation rounding. For
// int4, dot(q, x) * scale + offset * sum(x) per group: the offsets cost one product per group, with the
// sums of x over each group computed once per call.
#include "int8_dot.h"
#include "kernels.h"

#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

#if defined(SPECFORMER_AVX512)
#include <immintrin.h>
#endif

namespace specformer {

#if defined(SPECFORMER_AVX512)
// 16 int8 weights -> floats
SPECFORMER_TARGET inline __m512 widen_i8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
// 16 packed bytes -> the 16 low nibbles and the 16 high nibbles, as floats
SPECFORMER_TARGET inline void widen_u4(const uint8_t* p, __m512* low, __m512* high) {
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  *low = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15)));
  *high = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
}

// One int4 group of 2 * half values as q * d + m, sixteen bytes at a time (their low nibbles, then
// their high ones); multiplied and added separately, as the dequantised layer's float ops round.
template <typename T>
SPECFORMER_TARGET inline void dequantize_u4_group(const uint8_t* bytes, int64_t half, float d, float m, T* out) {
  const __m512 scale = _mm512_set1_ps(d), offset = _mm512_set1_ps(m);
  for (int64_t j = 0; j < half; j += 16) {
    __m512 low, high;
    widen_u4(bytes + j, &low, &high);
    store16_weight(out + j, _mm512_add_ps(_mm512_mul_ps(low, scale), offset));
    store16_weight(out + half + j, _mm512_add_ps(_mm512_mul_ps(high, scale), offset));
  }
}

// One int8 group of `count` (a multiple of 16) values as q * d, plus m where the matrix has offsets.
template <typename T>
SPECFORMER_TARGET inline void dequantize_i8_group(const int8_t* q, int64_t count, float d, const float* m, T* out) {
  for (int64_t j = 0; j < count; j += 16) {
    const __m512 v = _mm512_mul_ps(widen_i8(q + j), _mm512_set1_ps(d));
    store16_weight(out + j, m != nullptr ? _mm512_add_ps(v, _mm512_set1_ps(*m)) : v);
  }
}

// acc[m] += sum_g scale[g] * dot(W_g, x[m]_g) for one int8 row; group a multiple of 16.
template <typename S>
SPECFORMER_TARGET inline void row_i8(const int8_t* w, const S* scales, int64_t K, int64_t group, const float* xf,
                                     int64_t M, float* acc) {
  for (int64_t m = 0; m < M; ++m) {
    __m512 total = _mm512_setzero_ps(), other = _mm512_setzero_ps();
    const float* x = xf + m * K;
    const int64_t groups = K / group;
    int64_t g = 0;
    if (group == 32) {  // Q8_0: two groups a step, on two independent chains
      for (; g + 2 <= groups; g += 2) {
        const int64_t k = g * 32;
        const __m512 a = _mm512_fmadd_ps(widen_i8(w + k + 16), _mm512_loadu_ps(x + k + 16),
                                         _mm512_mul_ps(widen_i8(w + k), _mm512_loadu_ps(x + k)));
        const __m512 b = _mm512_fmadd_ps(widen_i8(w + k + 48), _mm512_loadu_ps(x + k + 48),
                                         _mm512_mul_ps(widen_i8(w + k + 32), _mm512_loadu_ps(x + k + 32)));
        total = _mm512_fmadd_ps(a, _mm512_set1_ps(to_float(scales[g])), total);
        other = _mm512_fmadd_ps(b, _mm512_set1_ps(to_float(scales[g + 1])), other);
      }
    }
    for (; g < groups; ++g) {
      __m512 part = _mm512_setzero_ps();
      for (int64_t k = g * group; k < (g + 1) * group; k += 16)
        part = _mm512_fmadd_ps(widen_i8(w + k), _mm512_loadu_ps(x + k), part);
      total = _mm512_fmadd_ps(part, _mm512_set1_ps(to_float(scales[g])), total);
    }
    acc[m] = _mm512_reduce_add_ps(_mm512_add_ps(total, other));
  }
}

// acc[m] = sum_g scale[g] * dot(q_g, x[m]_g) + offset[g] * xsum[m, g] for one int4 row; group of 32.
template <typename S>
SPECFORMER_TARGET inline void row_u4(const uint8_t* w, const S* scales, const S* offsets, int64_t K,
                                     const float* xf, const float* xsum, int64_t M, float* acc) {
  const int64_t groups = K / 32;
  for (int64_t m = 0; m < M; ++m) {
    __m512 total = _mm512_setzero_ps(), other = _mm512_setzero_ps();
    const float* x = xf + m * K;
    float shift = 0.f;
    int64_t g = 0;
    for (; g + 2 <= groups; g += 2) {  // two groups a step, on two independent chains
      __m512 low, high, low2, high2;
      widen_u4(w + g * 16, &low, &high);
      widen_u4(w + g * 16 + 16, &low2, &high2);
      const __m512 a = _mm512_fmadd_ps(high, _mm512_loadu_ps(x + g * 32 + 16),
                                       _mm512_mul_ps(low, _mm512_loadu_ps(x + g * 32)));
      const __m512 b = _mm512_fmadd_ps(high2, _mm512_loadu_ps(x + g * 32 + 48),
                                       _mm512_mul_ps(low2, _mm512_loadu_ps(x + g * 32 + 32)));
      total = _mm512_fmadd_ps(a, _mm512_set1_ps(to_float(scales[g])), total);
      other = _mm512_fmadd_ps(b, _mm512_set1_ps(to_float(scales[g + 1])), other);
      shift += group_offset(scales, offsets, g) * xsum[m * groups + g] +
               group_offset(scales, offsets, g + 1) * xsum[m * groups + g + 1];
    }
    for (; g < groups; ++g) {
      __m512 low, high;
      widen_u4(w + g * 16, &low, &high);
      const __m512 part = _mm512_fmadd_ps(high, _mm512_loadu_ps(x + g * 32 + 16),
                                          _mm512_mul_ps(low, _mm512_loadu_ps(x + g * 32)));
      total = _mm512_fmadd_ps(part, _mm512_set1_ps(to_float(scales[g])), total);
      shift += group_offset(scales, offsets, g) * xsum[m * groups + g];
    }
    acc[m] = _mm512_reduce_add_ps(_mm512_add_ps(total, other)) + shift;
  }
}
#endif

template <typename S>
inline void row_i8_scalar(const int8_t* w, const S* scales, int64_t K, int64_t group, const float* xf, int64_t M,
                          float* acc) {
  for (int64_t m = 0; m < M; ++m) {
    float total = 0.f;
    for (int64_t g = 0; g * group < K; ++g) {
      float part = 0.f;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) part += float(w[k]) * xf[m * K + k];
      total += part * to_float(scales[g]);
    }
    acc[m] = total;
  }
}

template <typename S>
inline void row_u4_scalar(const uint8_t* w, const S* scales, const S* offsets, int64_t K, int64_t group,
                          const float* xf, const float* xsum, int64_t M, float* acc) {
  const int64_t groups = K / group, half = group / 2;
  for (int64_t m = 0; m < M; ++m) {
    float total = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      float part = 0.f;
      for (int64_t j = 0; j < half; ++j) {
        const uint8_t byte = w[g * half + j];
        part += float(byte & 15) * xf[m * K + g * group + j] + float(byte >> 4) * xf[m * K + g * group + half + j];
      }
      total += part * to_float(scales[g]) + group_offset(scales, offsets, g) * xsum[m * groups + g];
    }
    acc[m] = total;
  }
}

// A weight matrix of the fused decode step: dense in the model's dtype (bits 0), or packed as above.
struct Packed {
  const void* w = nullptr;
  const void* scales = nullptr;   // (N, K / group), float32 or (`half`) float16
  // in the scales' type; null for a symmetric matrix (int4: -8 * scale; int8: none)
  const void* offsets = nullptr;
  int64_t bits = 0, group = 0;
  bool int8_activations = false;  // asked for integer dot products (int8_dot.h)
  bool half = false;

  // Whether rows of K inputs take the integer path: asked for, and groups it covers (int8 rows:
  // multiples of 32, or 16 as Q6_K's without offsets; int4: 32, llama.cpp's Q4 blocks). Other groups
  // widen the weights to float. (Offsets multiply the sums of the activations over blocks of 32.)
  bool integer(int64_t K) const {
    const bool int8_groups = group % kBlock == 0 || (group == 16 && offsets == nullptr);
    return int8_activations && K % kBlock == 0 && (bits == 8 ? int8_groups : group == kBlock);
  }
};

// acc[m] for one packed row n of K inputs: integer dot products with `quantized` (x rounded as
// `p.integer(K)` asks, else null), or the weights widened to float, through the vector kernels where
// the group allows.
template <typename S>
void packed_row_as(const Packed& p, int64_t n, int64_t K, const float* xf, const float* xsum, int64_t M, float* acc,
                   const QuantizedRows* quantized) {
  const int64_t groups = K / p.group;
  const auto* bytes = static_cast<const uint8_t*>(p.w) + n * K * p.bits / 8;
  const S* scales = static_cast<const S*>(p.scales) + n * groups;
  const S* offsets = p.offsets != nullptr ? static_cast<const S*>(p.offsets) + n * groups : nullptr;
  if (quantized != nullptr) {
    const auto* int8_row = reinterpret_cast<const int8_t*>(bytes);
    if (p.bits == 4) {
#if defined(SPECFORMER_AVX512)
      if (has_vnni()) return row_u4_q8(bytes, scales, offsets, K, *quantized, M, acc);
#endif
      return row_u4_q8_scalar(bytes, scales, offsets, K, *quantized, M, acc);
    }
#if defined(SPECFORMER_AVX512)
    if (has_vnni()) row_i8_q8(int8_row, scales, K, p.group, *quantized, M, acc);
    else
#endif
      row_i8_q8_scalar(int8_row, scales, K, p.group, *quantized, M, acc);
    if (offsets != nullptr) add_offsets_q8(offsets, K, p.group, *quantized, M, acc);
    return;
  }
  if (p.bits == 4) {
#if defined(SPECFORMER_AVX512)
    if (p.group == 32) return row_u4(bytes, scales, offsets, K, xf, xsum, M, acc);
#endif
    return row_u4_scalar(bytes, scales, offsets, K, p.group, xf, xsum, M, acc);
  }
  const auto* int8_weights = reinterpret_cast<const int8_t*>(bytes);
#if defined(SPECFORMER_AVX512)
  if (p.group % 16 == 0) row_i8(int8_weights, scales, K, p.group, xf, M, acc);
  else
#endif
    row_i8_scalar(int8_weights, scales, K, p.group, xf, M, acc);
  if (offsets != nullptr)  // each group's offset times the sum of x over it
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < groups; ++g) acc[m] += to_float(offsets[g]) * xsum[m * groups + g];
}

inline void packed_row(const Packed& p, int64_t n, int64_t K, const float* xf, const float* xsum, int64_t M, float* acc,
                       const QuantizedRows* quantized) {
  if (p.half) return packed_row_as<c10::Half>(p, n, K, xf, xsum, M, acc, quantized);
  packed_row_as<float>(p, n, K, xf, xsum, M, acc, quantized);
}

// Up to this many inputs, int4 rows are read several at a time (rows_u4_q8). Measured on one row of
// activations (GB/s of weights, 2 threads): 576 inputs 27-29 against 16-22 row by row, but 1536 inputs
// 20-21 against 27-28: short rows gain from sharing their fixed costs, long ones lose more to reading
// four streams at once than the sharing saves. int8 rows measured slower several at a time at any width.
constexpr int64_t kShortRow = 1024;

// acc[0..kRows) for int4 rows n..n+kRows-1 against one row of quantized activations, through the integer
// kernels' several-row form; false where that form does not apply (the caller goes row by row).
template <typename S>
bool packed_rows_as(const Packed& p, int64_t n, int64_t K, const QuantizedRows& x, float* acc) {
#if defined(SPECFORMER_AVX512)
  if (!has_vnni() || p.bits != 4 || K > kShortRow) return false;
  const int64_t groups = K / p.group;
  const S* scales = static_cast<const S*>(p.scales) + n * groups;
  const S* offsets = p.offsets != nullptr ? static_cast<const S*>(p.offsets) + n * groups : nullptr;
  rows_u4_q8<kRows>(static_cast<const uint8_t*>(p.w) + n * K / 2, scales, offsets, K, x, 0, acc);
  return true;
#else
  return false;
#endif
}

inline bool packed_rows(const Packed& p, int64_t n, int64_t K, const QuantizedRows& x, float* acc) {
  return p.half ? packed_rows_as<c10::Half>(p, n, K, x, acc) : packed_rows_as<float>(p, n, K, x, acc);
}

// Sums of x over each group, once per input: what offsets multiply (int4's, and int8 Q5_1/Q5_K's).
inline void group_sums(const float* xf, int64_t M, int64_t K, int64_t group, float* xsum) {
  const int64_t groups = K / group;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.f;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) s += xf[m * K + k];
      xsum[m * groups + g] = s;
    }
}

// A packed (N, K) matrix over `weight`, `scales` and `offsets` as the kernels read them (float16 scales
// as stored, any other float type as float32; offsets in the scales' type, absent for a symmetric int4
// matrix); `keep` holds any converted copies for as long as the view is used.
inline Packed packed_view(const at::Tensor& weight, const at::Tensor& scales_in,
                          const std::optional<at::Tensor>& offsets_in, int64_t bits, int64_t K, at::Tensor (&keep)[2]) {
  keep[0] = (scales_in.scalar_type() == at::kHalf ? scales_in : scales_in.to(at::kFloat)).contiguous();
  if (offsets_in.has_value()) {
    TORCH_CHECK(offsets_in->sizes() == scales_in.sizes(), "offsets ", offsets_in->sizes(), " do not match scales ",
                scales_in.sizes());
    keep[1] = offsets_in->to(keep[0].scalar_type()).contiguous();
  }
  Packed p;
  p.w = weight.const_data_ptr();
  p.scales = keep[0].const_data_ptr();
  p.offsets = keep[1].defined() ? keep[1].const_data_ptr() : nullptr;
  p.bits = bits;
  p.group = K / scales_in.size(1);
  p.half = keep[0].scalar_type() == at::kHalf;
  return p;
}

// y = x W^T + b for packed W; bits 8 (weight int8 (N, K)) or 4 (weight uint8 (N, K/2)), offsets optional.
template <typename T>
at::Tensor packed_linear_impl(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& scales_in,
                              const std::optional<at::Tensor>& offsets_in, const std::optional<at::Tensor>& bias,
                              int64_t bits, bool int8_activations) {
  const at::Tensor x = input.contiguous();
  require<T>(x, "x");
  TORCH_CHECK(bits == 8 || bits == 4, "bits is ", bits, "; expected 8 or 4");
  TORCH_CHECK(weight.is_contiguous() && scales_in.dim() == 2, "packed weight and scales must be contiguous");
  const int64_t N = weight.size(0), groups = scales_in.size(1);
  const int64_t K = x.size(-1), M = K == 0 ? 0 : x.numel() / K;
  TORCH_CHECK(groups > 0 && K % groups == 0, "scales ", scales_in.sizes(), " do not group ", K, " inputs");
  TORCH_CHECK(weight.numel() == N * K * bits / 8, "weight ", weight.sizes(), " does not hold ", N, " x ", K,
              " values of ", bits, " bits");
  at::Tensor keep[2];
  Packed p = packed_view(weight, scales_in, offsets_in, bits, K, keep);
  p.int8_activations = int8_activations;
  std::vector<float> xf(M * K), xsum(M * groups, 0.f);
  const T* xp = x.const_data_ptr<T>();
  for (int64_t i = 0; i < M * K; ++i) xf[i] = float(xp[i]);
  QuantizedRows quantized;
  if (p.integer(K)) quantize_rows(xf.data(), M, K, bits == 4, &quantized);
  else if (bits == 4 || p.offsets != nullptr) group_sums(xf.data(), M, K, p.group, xsum.data());
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = N;
  at::Tensor out = at::empty(sizes, x.options());
  T* yp = out.data_ptr<T>();
  at::Tensor bias_c;
  if (bias.has_value()) {
    bias_c = bias->contiguous();
    require<T>(bias_c, "bias");
    TORCH_CHECK(bias_c.numel() == N, "bias has ", bias_c.numel(), " elements; expected ", N);
  }
  const T* b = bias.has_value() ? bias_c.const_data_ptr<T>() : nullptr;
  const int64_t row_bytes = K * bits / 8;
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / std::max<int64_t>(row_bytes, 1)), [&](int64_t begin, int64_t end) {
    std::vector<float> acc(std::max<int64_t>(M, kRows));
    int64_t n = begin;
    if (M == 1 && p.integer(K))  // one sequence decoding: several weight rows at a time
      for (; n + kRows <= end && packed_rows(p, n, K, quantized, acc.data()); n += kRows)
        for (int64_t r = 0; r < kRows; ++r) yp[n + r] = round_to<T>(acc[r] + (b ? float(b[n + r]) : 0.f));
    for (; n < end; ++n) {
      packed_row(p, n, K, xf.data(), xsum.data(), M, acc.data(), p.integer(K) ? &quantized : nullptr);
      for (int64_t m = 0; m < M; ++m) yp[m * N + n] = round_to<T>(acc[m] + (b ? float(b[n]) : 0.f));
    }
  });
  return out;
}

// Rows n0..n1 of a packed matrix dequantised into `out` (row stride K): w = q * scale (+ offset).
template <typename S, typename T>
void dequantize_rows_as(const Packed& p, int64_t K, int64_t n0, int64_t n1, T* out) {
  const int64_t groups = K / p.group, half = p.group / 2;
  for (int64_t n = n0; n < n1; ++n) {
    T* row = out + (n - n0) * K;
    const S* scales = static_cast<const S*>(p.scales) + n * groups;
    const S* offsets = p.offsets != nullptr ? static_cast<const S*>(p.offsets) + n * groups : nullptr;
    if (p.bits == 8) {
      const auto* q = static_cast<const int8_t*>(p.w) + n * K;
      for (int64_t g = 0; g < groups; ++g) {
        const float d = to_float(scales[g]);
        const float m = offsets != nullptr ? to_float(offsets[g]) : 0.f;
#if defined(SPECFORMER_AVX512)
        if (p.group % 16 == 0) {
          dequantize_i8_group(q + g * p.group, p.group, d, offsets != nullptr ? &m : nullptr, row + g * p.group);
          continue;
        }
#endif
        for (int64_t j = g * p.group; j < (g + 1) * p.group; ++j)
          row[j] = T(offsets != nullptr ? float(q[j]) * d + m : float(q[j]) * d);
      }
      continue;
    }
    const uint8_t* q = static_cast<const uint8_t*>(p.w) + n * K / 2;
    for (int64_t g = 0; g < groups; ++g) {
      const float d = to_float(scales[g]), m = group_offset(scales, offsets, g);
      const uint8_t* bytes = q + g * half;
      T* values = row + g * p.group;
#if defined(SPECFORMER_AVX512)
      if (half % 16 == 0) {
        dequantize_u4_group(bytes, half, d, m, values);
        continue;
      }
#endif
      for (int64_t j = 0; j < half; ++j) {
        values[j] = T(float(bytes[j] & 15) * d + m);
        values[half + j] = T(float(bytes[j] >> 4) * d + m);
      }
    }
  }
}

template <typename T> void dequantize_rows(const Packed& p, int64_t K, int64_t n0, int64_t n1, T* out) {
  if (p.half) return dequantize_rows_as<c10::Half>(p, K, n0, n1, out);
  dequantize_rows_as<float>(p, K, n0, n1, out);
}

// The float weight of a packed matrix (N, K) written into `out` (float32 or bfloat16, N * K values), in
// one pass split over rows.
inline void dequantize_packed_into(at::Tensor& out, const at::Tensor& weight, const at::Tensor& scales_in,
                                   const std::optional<at::Tensor>& offsets_in, int64_t bits) {
  TORCH_CHECK(bits == 8 || bits == 4, "bits is ", bits, "; expected 8 or 4");
  const auto dtype = out.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dequantize_packed: float32 or bfloat16 only");
  const int64_t N = weight.size(0), groups = scales_in.size(1), K = weight.numel() / std::max<int64_t>(N, 1) * 8 / bits;
  TORCH_CHECK(weight.is_contiguous() && scales_in.size(0) == N && groups > 0 && K % groups == 0,
              "weight ", weight.sizes(), " and scales ", scales_in.sizes(), " do not describe one matrix");
  TORCH_CHECK(out.is_contiguous() && out.numel() == N * K, "dequantize_packed: out holds ", out.numel(),
              " values; expected ", N, " x ", K, ", contiguous");
  at::Tensor keep[2];
  const Packed p = packed_view(weight, scales_in, offsets_in, bits, K, keep);
  auto fill = [&](auto* y) {
    at::parallel_for(0, N, std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)), [&](int64_t begin, int64_t end) {
      dequantize_rows(p, K, begin, end, y + begin * K);
    });
  };
  if (dtype == at::kFloat) fill(out.data_ptr<float>());
  else fill(out.data_ptr<c10::BFloat16>());
}

inline at::Tensor dequantize_packed(const at::Tensor& weight, const at::Tensor& scales,
                                    const std::optional<at::Tensor>& offsets, int64_t bits, at::ScalarType dtype) {
  const int64_t N = weight.size(0), K = weight.numel() / std::max<int64_t>(N, 1) * 8 / bits;
  at::Tensor out = at::empty({N, K}, weight.options().dtype(dtype));
  dequantize_packed_into(out, weight, scales, offsets, bits);
  return out;
}

inline at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                                const std::optional<at::Tensor>& offsets, const std::optional<at::Tensor>& bias,
                                int64_t bits, bool int8_activations) {
  if (x.scalar_type() == at::kBFloat16)
    return packed_linear_impl<c10::BFloat16>(x, weight, scales, offsets, bias, bits, int8_activations);
  return packed_linear_impl<float>(x, weight, scales, offsets, bias, bits, int8_activations);
}

}  // namespace specformer
