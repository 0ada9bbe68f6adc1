#pragma once
// ---- packed rows times int8 activations: integer dot products (llama.cpp's arithmetic) ---------------
// Widening every 4-bit weight to float32 costs more instructions than reading it: decoding a Q4 model
// that way is bound by the core, not by memory. llama.cpp instead rounds the activations to int8 per
// block of 32 (a float scale each, as its Q8_0 blocks) and multiplies integers: AVX-512 VNNI's `vpdpbusd`
// sums four u8 x s8 products into each int32 lane, 64 weights an instruction, exactly. Each block's
// integer sum is then scaled by its weight scale times its activation scale. The activations' rounding
// (a relative error of up to 1/254 of each block's largest value) is the only change from the float path:
// the integer sums are exact. int4 offsets (Q4_0's -8 * scale, Q4_1's minimum) multiply the sum of the
// rounded x over the group, as llama.cpp's Q8_1 blocks carry it: the product is then exactly that of the
// dequantised weights and the rounded activations. (With the exact sum of x instead, the rounding errors
// are weighted by q * scale, all of one sign, rather than by the weights, and stop cancelling: SmolLM2
// answered a question in French.)
//
// Layouts: an int8 row is read in its natural order, so its activations are too. An int4 group of 32
// keeps values 0..15 in the low nibbles of its 16 bytes and 16..31 in the high ones; four groups (64
// bytes) are one 512-bit load whose low nibbles are the four groups' first halves. The activations for
// int4 rows are stored in that order (per four blocks: the four first halves, then the four second
// halves), so one load of weights meets one load of activations. Rows of activations are padded with
// zeros to a multiple of four blocks, and a row's last, partial four are read with masked loads.
//
// Scales (and offsets) are float32, or float16 as GGUF's Q8_0/Q4_0/Q4_1 blocks store them: decoding reads
// every byte of them, and two fewer per group of 32 int4 weights is a tenth of the traffic. A symmetric
// int4 row (Q4_0) stores no offsets at all: its offset is -8 * scale, computed from the scale.
#include "kernels.h"

#include <c10/util/Half.h>

#include <cstdint>
#include <vector>

namespace specformer {

constexpr int64_t kBlock = 32;  // activation block: llama.cpp's Q8_0
constexpr float kSymmetricZero = 8.f;  // a symmetric int4 weight is (q - 8) * scale

inline float to_float(float v) { return v; }
inline float to_float(c10::Half v) { return float(v); }

// The offset of group g: stored, or -8 * scale for a symmetric row (offsets null).
template <typename S> inline float group_offset(const S* scales, const S* offsets, int64_t g) {
  return offsets != nullptr ? to_float(offsets[g]) : -kSymmetricZero * to_float(scales[g]);
}

// x rounded to int8 per block of 32 with a float scale each, in the order one kind of row reads it;
// each row padded with zero blocks to a multiple of four.
struct QuantizedRows {
  std::vector<int8_t> q;    // M rows of `blocks` * 32
  std::vector<float> d;     // M rows of `blocks`
  std::vector<float> sums;  // M rows of `blocks`: d times the sum of the block's q (what int4 offsets multiply)
  int64_t blocks = 0;       // per row, padded
  bool nibble_order = false;

  const int8_t* row(int64_t m) const { return q.data() + m * blocks * kBlock; }
};

// Where the i-th value of a row sits in the nibble order (see above).
inline int64_t nibble_position(int64_t i) {
  const int64_t b = i / kBlock, j = i % kBlock;
  return b / 4 * 4 * kBlock + (j / 16) * 64 + (b % 4) * 16 + j % 16;
}

#if defined(SPECFORMER_AVX512)
#if defined(SPECFORMER_AVX512_BF16)  // a superset of SPECFORMER_TARGET's, so its functions inline here
#define SPECFORMER_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16")))
#else
#define SPECFORMER_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#endif

// One block's 32 values rounded: the first 16 to `low`, the last 16 to `high`; its scale into `d` and
// the sum of its rounded values into `sum`.
SPECFORMER_VNNI inline void quantize_block(const float* x, int8_t* low, int8_t* high, float* d, int32_t* sum) {
  const __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
  *d = amax / 127.f;
  const __m512 inverse = _mm512_set1_ps(*d != 0.f ? 1.f / *d : 0.f);
  // round to nearest even (the default rounding mode); |x| * inverse <= 127, so no saturation happens
  const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inverse)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inverse));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(low), _mm512_cvtsepi32_epi8(qa));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(high), _mm512_cvtsepi32_epi8(qb));
  *sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
}
#else
inline void quantize_block(const float* x, int8_t* low, int8_t* high, float* d, int32_t* sum) {
  float amax = 0.f;
  for (int64_t j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(x[j]));
  *d = amax / 127.f;
  const float inverse = *d != 0.f ? 1.f / *d : 0.f;
  *sum = 0;
  for (int64_t j = 0; j < 16; ++j) {
    low[j] = int8_t(std::nearbyint(x[j] * inverse));
    high[j] = int8_t(std::nearbyint(x[16 + j] * inverse));
    *sum += low[j] + high[j];
  }
}
#endif

// d = max|x| / 127 per block, q = round-half-even(x / d) (as x * (1 / d)); a block of zeros has d = 0.
inline void quantize_rows(const float* xf, int64_t M, int64_t K, bool nibble_order, QuantizedRows* out) {
  const int64_t blocks = K / kBlock, padded = (blocks + 3) / 4 * 4;
  out->q.assign(M * padded * kBlock, 0);
  out->d.assign(M * padded, 0.f);
  out->sums.assign(M * padded, 0.f);
  out->blocks = padded;
  out->nibble_order = nibble_order;
  for (int64_t m = 0; m < M; ++m) {
    int8_t* q = out->q.data() + m * padded * kBlock;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t low = nibble_order ? nibble_position(b * kBlock) : b * kBlock;
      const int64_t high = nibble_order ? nibble_position(b * kBlock + 16) : b * kBlock + 16;
      int32_t sum = 0;
      float& d = out->d[m * padded + b];
      quantize_block(xf + m * K + b * kBlock, q + low, q + high, &d, &sum);
      out->sums[m * padded + b] = d * float(sum);
    }
  }
}

// The quantized forms of one input, made when a row first asks for them: the fused step's q, k and v
// (or gate and up) read the same input; `reset` when the input changes.
class QuantizedInput {
 public:
  const QuantizedRows& get(const float* xf, int64_t M, int64_t K, bool nibble_order) {
    if (!fresh_[nibble_order]) quantize_rows(xf, M, K, nibble_order, &rows_[nibble_order]);
    fresh_[nibble_order] = true;
    return rows_[nibble_order];
  }
  void reset() { fresh_[0] = fresh_[1] = false; }

 private:
  QuantizedRows rows_[2];
  bool fresh_[2] = {false, false};
};

// The weight scale of activation block b: groups of `group` inputs (a multiple of 32) share one.
template <typename S> inline float weight_scale(const S* scales, int64_t group, int64_t b) {
  return to_float(scales[b * kBlock / group]);
}

template <typename S>
inline void row_i8_q8_scalar(const int8_t* w, const S* scales, int64_t K, int64_t group, const QuantizedRows& x,
                             int64_t M, float* acc) {
  const int64_t blocks = K / kBlock, part = std::min(group, kBlock);  // part: inputs under one weight scale
  for (int64_t m = 0; m < M; ++m) {
    float total = 0.f;
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t j0 = b * kBlock; j0 < (b + 1) * kBlock; j0 += part) {
        int32_t dot = 0;
        for (int64_t j = j0; j < j0 + part; ++j) dot += int32_t(w[j]) * int32_t(x.row(m)[j]);
        total += float(dot) * (to_float(scales[j0 / group]) * x.d[m * x.blocks + b]);
      }
    acc[m] = total;
  }
}

template <typename S>
inline void row_u4_q8_scalar(const uint8_t* w, const S* scales, const S* offsets, int64_t K,
                             const QuantizedRows& x, int64_t M, float* acc) {
  const int64_t blocks = K / kBlock;
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* q = x.row(m);
    float total = 0.f, shift = 0.f;
    for (int64_t b = 0; b < blocks; ++b) {
      int32_t dot = 0;
      for (int64_t j = 0; j < 16; ++j) {
        const uint8_t byte = w[b * 16 + j];
        const int64_t low = b * kBlock + j, high = low + 16;
        dot += int32_t(byte & 15) * q[x.nibble_order ? nibble_position(low) : low] +
               int32_t(byte >> 4) * q[x.nibble_order ? nibble_position(high) : high];
      }
      total += float(dot) * (to_float(scales[b]) * x.d[m * x.blocks + b]);
      shift += group_offset(scales, offsets, b) * x.sums[m * x.blocks + b];
    }
    acc[m] = total + shift;
  }
}

#if defined(SPECFORMER_AVX512)
inline bool has_vnni() {
  static const bool yes = __builtin_cpu_supports("avx512vnni");
  return yes;
}

// 16 lanes from 4 floats: lanes 4i..4i+3 hold v[i], the scale of the block whose int32 sums they hold.
SPECFORMER_VNNI inline __m512 spread4(__m128 v) {
  return _mm512_permutexvar_ps(_mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
                               _mm512_castps128_ps512(v));
}

// The first `count` (<= 16) values at p as floats, the others zero.
SPECFORMER_VNNI inline __m512 load_floats(const float* p, int64_t count) {
  return _mm512_maskz_loadu_ps(__mmask16((1u << count) - 1), p);
}
SPECFORMER_VNNI inline __m512 load_floats(const c10::Half* p, int64_t count) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(__mmask16((1u << count) - 1), p));
}

// The weight scales of blocks b..b+count-1 (count <= 4; the others zero).
template <typename S>
SPECFORMER_VNNI inline __m128 weight_scales4(const S* scales, int64_t group, int64_t b, int64_t count) {
  if (group == kBlock) return _mm512_castps512_ps128(load_floats(scales + b, count));
  float s[4] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t i = 0; i < count; ++i) s[i] = weight_scale(scales, group, b + i);
  return _mm_loadu_ps(s);
}

// The first `bytes` (<= 64) bytes at p.
SPECFORMER_VNNI inline __m512i load_bytes(const void* p, int64_t bytes) {
  return _mm512_maskz_loadu_epi8(bytes >= 64 ? ~__mmask64(0) : (__mmask64(1) << bytes) - 1, p);
}

// s8 x s8 as VNNI's u8 x s8: |w| times x with w's sign moved onto it.
SPECFORMER_VNNI inline __m512i dot_i8(__m512i w, __m512i x) {
  const __m512i signed_x = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
  return _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(w), signed_x);
}

// acc[m] += the offsets' share of an int8 row with offsets (w = q * scale + offset: Q5_1's, Q5_K's):
// each group's offset times the sum of the rounded activations over it, as for int4 rows.
template <typename S>
SPECFORMER_VNNI inline void add_offsets_q8(const S* offsets, int64_t K, int64_t group, const QuantizedRows& x,
                                           int64_t M, float* acc) {
  const int64_t blocks = K / kBlock;
  for (int64_t m = 0; m < M; ++m) {
    const float* sums = x.sums.data() + m * x.blocks;
    if (group == kBlock) {  // sixteen groups a step
      __m512 shift = _mm512_setzero_ps();
      for (int64_t g = 0; g < blocks; g += 16) {
        const int64_t count = std::min<int64_t>(16, blocks - g);
        shift = _mm512_fmadd_ps(load_floats(offsets + g, count), load_floats(sums + g, count), shift);
      }
      acc[m] += _mm512_reduce_add_ps(shift);
      continue;
    }
    float shift = 0.f;
    for (int64_t b = 0; b < blocks; ++b) shift += weight_scale(offsets, group, b) * sums[b];
    acc[m] += shift;
  }
}

// A row times TM rows of activations at once (m0..m0+TM-1): each weight load and widening is shared
// by the TM dot products, which is what makes a prompt's many rows cheaper per row than decoding's one.
// Four blocks a step, the last step masked; two accumulators per activation row keep the float adds
// off one dependency chain.
//
// Blocks b..b+count-1 of an int8 row (groups a multiple of 32, or 16: Q6_K's) against TM rows'
// activations, into sum. A 64-byte load is two blocks, eight lanes each; with groups of 16 each four
// lanes have their own weight scale.
template <int TM, typename S>
SPECFORMER_VNNI __attribute__((always_inline)) inline void four_i8(const int8_t* w, const S* scales,
                                                                   int64_t group, const QuantizedRows& x,
                                                                   int64_t m0, int64_t b, int64_t count,
                                                                   __m512 (&sum)[TM]) {
  const __m512i low_pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i high_pair = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2);
  const __m512i first = load_bytes(w + b * kBlock, std::min<int64_t>(64, count * kBlock));
  const __m512i second = load_bytes(w + b * kBlock + 64, std::max<int64_t>(0, count * kBlock - 64));
  if (group == 16) {
    const __m512 w_first = spread4(_mm512_castps512_ps128(load_floats(scales + 2 * b, std::min<int64_t>(4, 2 * count))));
    const __m512 w_second =
        spread4(_mm512_castps512_ps128(load_floats(scales + 2 * b + 4, std::max<int64_t>(0, 2 * count - 4))));
    for (int i = 0; i < TM; ++i) {
      const int8_t* q = x.row(m0 + i) + b * kBlock;
      const __m512 d = _mm512_castps128_ps512(_mm_loadu_ps(x.d.data() + (m0 + i) * x.blocks + b));
      const __m512 a = _mm512_cvtepi32_ps(dot_i8(first, _mm512_loadu_si512(q)));
      const __m512 c = _mm512_cvtepi32_ps(dot_i8(second, _mm512_loadu_si512(q + 64)));
      sum[i] = _mm512_fmadd_ps(c, _mm512_mul_ps(w_second, _mm512_permutexvar_ps(high_pair, d)),
                               _mm512_fmadd_ps(a, _mm512_mul_ps(w_first, _mm512_permutexvar_ps(low_pair, d)), sum[i]));
    }
    return;
  }
  const __m128 w_scales = weight_scales4(scales, group, b, count);
  for (int i = 0; i < TM; ++i) {
    const int8_t* q = x.row(m0 + i) + b * kBlock;
    const __m512 s = _mm512_castps128_ps512(_mm_mul_ps(w_scales, _mm_loadu_ps(x.d.data() + (m0 + i) * x.blocks + b)));
    const __m512 a = _mm512_cvtepi32_ps(dot_i8(first, _mm512_loadu_si512(q)));
    const __m512 c = _mm512_cvtepi32_ps(dot_i8(second, _mm512_loadu_si512(q + 64)));
    sum[i] = _mm512_fmadd_ps(c, _mm512_permutexvar_ps(high_pair, s),
                             _mm512_fmadd_ps(a, _mm512_permutexvar_ps(low_pair, s), sum[i]));
  }
}

// Blocks b..b+count-1 of an int4 row (64 bytes of weights for four) against TM rows' activations in
// nibble order, into sum.
template <int TM, typename S>
SPECFORMER_VNNI __attribute__((always_inline)) inline void four_u4(const uint8_t* w, const S* scales,
                                                                   const QuantizedRows& x, int64_t m0, int64_t b,
                                                                   int64_t count, __m512 (&sum)[TM]) {
  const __m512i nibble = _mm512_set1_epi8(15), v = load_bytes(w + b * 16, count * 16);
  const __m512i low = _mm512_and_si512(v, nibble), high = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
  const __m128 w_scales = weight_scales4(scales, kBlock, b, count);
  for (int i = 0; i < TM; ++i) {
    const int8_t* q = x.row(m0 + i) + b * kBlock;
    __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), low, _mm512_loadu_si512(q));
    dot = _mm512_dpbusd_epi32(dot, high, _mm512_loadu_si512(q + 64));
    const __m512 s = spread4(_mm_mul_ps(w_scales, _mm_loadu_ps(x.d.data() + (m0 + i) * x.blocks + b)));
    sum[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, sum[i]);
  }
}

// acc[i] = sum_b (w_b . q_b) * scale_b * d_b over an int8 row.
template <int TM, typename S>
SPECFORMER_VNNI inline void tile_i8_q8(const int8_t* w, const S* scales, int64_t K, int64_t group,
                                       const QuantizedRows& x, int64_t m0, float* acc) {
  const int64_t blocks = K / kBlock;
  __m512 total[TM], other[TM];
  for (int i = 0; i < TM; ++i) total[i] = other[i] = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= blocks; b += 8) {
    four_i8<TM, S>(w, scales, group, x, m0, b, 4, total);
    four_i8<TM, S>(w, scales, group, x, m0, b + 4, 4, other);
  }
  for (; b < blocks; b += 4) four_i8<TM, S>(w, scales, group, x, m0, b, std::min<int64_t>(4, blocks - b), total);
  for (int i = 0; i < TM; ++i) acc[i] = _mm512_reduce_add_ps(_mm512_add_ps(total[i], other[i]));
}

// acc[i] = sum_b (q_b . x_b) * scale_b * d_b + offset_b * d_b * sum(x_b) over an int4 row of groups of 32.
template <int TM, typename S>
SPECFORMER_VNNI inline void tile_u4_q8(const uint8_t* w, const S* scales, const S* offsets, int64_t K,
                                       const QuantizedRows& x, int64_t m0, float* acc) {
  const int64_t blocks = K / kBlock;
  __m512 total[TM], other[TM];
  for (int i = 0; i < TM; ++i) total[i] = other[i] = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= blocks; b += 8) {
    four_u4<TM, S>(w, scales, x, m0, b, 4, total);
    four_u4<TM, S>(w, scales, x, m0, b + 4, 4, other);
  }
  for (; b < blocks; b += 4) four_u4<TM, S>(w, scales, x, m0, b, std::min<int64_t>(4, blocks - b), total);
  for (int i = 0; i < TM; ++i) {
    const float* sums = x.sums.data() + (m0 + i) * x.blocks;
    __m512 shift = _mm512_setzero_ps();  // the offsets' share: one product per group
    for (int64_t g = 0; g < blocks; g += 16) {
      const int64_t count = std::min<int64_t>(16, blocks - g);
      shift = _mm512_fmadd_ps(offsets != nullptr ? load_floats(offsets + g, count) : load_floats(scales + g, count),
                              load_floats(sums + g, count), shift);
    }
    if (offsets == nullptr) shift = _mm512_mul_ps(shift, _mm512_set1_ps(-kSymmetricZero));
    acc[i] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(total[i], other[i]), shift));
  }
}

// acc[m] for m < M: one packed row against every activation row, four at a time.
template <typename S>
SPECFORMER_VNNI inline void row_i8_q8(const int8_t* w, const S* scales, int64_t K, int64_t group,
                                      const QuantizedRows& x, int64_t M, float* acc) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile_i8_q8<4, S>(w, scales, K, group, x, m, acc + m);
  for (; m < M; ++m) tile_i8_q8<1, S>(w, scales, K, group, x, m, acc + m);
}

template <typename S>
SPECFORMER_VNNI inline void row_u4_q8(const uint8_t* w, const S* scales, const S* offsets, int64_t K,
                                      const QuantizedRows& x, int64_t M, float* acc) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile_u4_q8<4, S>(w, scales, offsets, K, x, m, acc + m);
  for (; m < M; ++m) tile_u4_q8<1, S>(w, scales, offsets, K, x, m, acc + m);
}
// ---- one row of activations against several weight rows (decoding one sequence) ----
// With one activation row the tiles above have nothing to share, and a small model's rows are short
// (576 inputs: 18 blocks), so each row's fixed costs (its reductions, its offsets' share, the calls)
// weigh as much as its dot products. TR weight rows at a time share every activation load and scale,
// and run TR independent chains; each row's next TR rows are prefetched as it goes (without, reading
// TR streams at once measured slower than one).
template <int TR, typename S>
SPECFORMER_VNNI inline void rows_u4_q8(const uint8_t* w, const S* scales, const S* offsets, int64_t K,
                                       const QuantizedRows& x, int64_t m, float* out) {
  const int64_t blocks = K / kBlock, row_bytes = K / 2;
  const int8_t* q = x.row(m);
  const float* xd = x.d.data() + m * x.blocks;
  const __m512i nibble = _mm512_set1_epi8(15);
  __m512 total[TR];
  for (int r = 0; r < TR; ++r) total[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; b += 4) {
    const int64_t count = std::min<int64_t>(4, blocks - b);
    const __m512i x_low = _mm512_loadu_si512(q + b * kBlock), x_high = _mm512_loadu_si512(q + b * kBlock + 64);
    const __m128 d = _mm_loadu_ps(xd + b);  // padded rows: zeros past the last block
    for (int r = 0; r < TR; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (TR + r) * row_bytes + b * 16), _MM_HINT_T0);
      const __m512i v = load_bytes(w + r * row_bytes + b * 16, count * 16);
      __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(v, nibble), x_low);
      dot = _mm512_dpbusd_epi32(dot, _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble), x_high);
      const __m512 s = spread4(_mm_mul_ps(weight_scales4(scales + r * blocks, kBlock, b, count), d));
      total[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, total[r]);
    }
  }
  const float* sums = x.sums.data() + m * x.blocks;
  for (int r = 0; r < TR; ++r) {
    const S* row_scales = scales + r * blocks;
    __m512 shift = _mm512_setzero_ps();  // the offsets' share: one product per group
    for (int64_t g = 0; g < blocks; g += 16) {
      const int64_t count = std::min<int64_t>(16, blocks - g);
      const __m512 o = offsets != nullptr ? load_floats(offsets + r * blocks + g, count) : load_floats(row_scales + g, count);
      shift = _mm512_fmadd_ps(o, load_floats(sums + g, count), shift);
    }
    if (offsets == nullptr) shift = _mm512_mul_ps(shift, _mm512_set1_ps(-kSymmetricZero));
    out[r] = _mm512_reduce_add_ps(_mm512_add_ps(total[r], shift));
  }
}

#else
inline bool has_vnni() { return false; }

template <typename S>
inline void add_offsets_q8(const S* offsets, int64_t K, int64_t group, const QuantizedRows& x, int64_t M,
                           float* acc) {
  for (int64_t m = 0; m < M; ++m) {
    float shift = 0.f;
    for (int64_t b = 0; b < K / kBlock; ++b) shift += weight_scale(offsets, group, b) * x.sums[m * x.blocks + b];
    acc[m] += shift;
  }
}
#endif

}  // namespace specformer
