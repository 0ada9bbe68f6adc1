// Fused CPU kernels for inference as torch ops (see __init__.py for when they run and how they are
// built), and the registration of the whole decode step (decode_step.h).
//
// Each replaces a handful of small aten ops whose dispatch and cache misses, not arithmetic, dominate
// eager decoding on the CPU. RMSNorm, SwiGLU and rotary give torch's results bit for bit: every product
// and sum a torch op rounds to the tensor's dtype is rounded here too, sums run in torch's order, the
// exp is torch's, and the file is built with -ffp-contract=off so no multiply-add is fused behind our
// back. Decode attention (split over keys, then merged) and the GEMV are different algorithms from
// torch's, so they agree to float rounding. The library is built for AVX2, as torch builds those kernels;
// only the GEMV's and attention's inner loops use AVX-512, where the CPU has it, through target attributes.

#include "decode_step.h"
#include "kernels.h"
#include "packed_gemv.h"

namespace specformer {

// ---- linear for a few rows: the GEMV over a thread's rows ---------------------------------------------
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

// ---- RMSNorm ----------------------------------------------------------------------------------------
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

// ---- SwiGLU -----------------------------------------------------------------------------------------
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
  const int64_t B = x.size(0), H = x.size(1), L = x.size(2), D = x.size(3);
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
      rotate_head(xr, c, s, D, op + row * D);
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

// ---- attention for one new query per sequence: chunks over the keys, then merged ----------------------
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

}  // namespace specformer

TORCH_LIBRARY(specformer_cpu, m) {
  m.class_<specformer::DecodePlan>("DecodePlan")
      .def(torch::init<c10::List<specformer::Layer>, at::Tensor, at::Tensor, specformer::Layer, at::Tensor,
                       specformer::Layer, std::optional<double>, std::vector<int64_t>, double, double, bool,
                       std::string, bool, int64_t, bool>())
      .def("step", &specformer::DecodePlan::step);
  m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("packed_linear(Tensor x, Tensor weight, Tensor scales, Tensor? offsets, Tensor? bias, int bits, "
        "bool int8_activations=False) -> Tensor");
  m.def("dequantize_packed(Tensor weight, Tensor scales, Tensor? offsets, int bits, ScalarType dtype) -> Tensor");
  m.def("dequantize_packed_into(Tensor(a!) out, Tensor weight, Tensor scales, Tensor? offsets, int bits) -> ()");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  m.def("rotary(Tensor q, Tensor k, Tensor cos, Tensor signed_sin) -> (Tensor, Tensor)");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? allowed, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(specformer_cpu, CPU, m) {
  m.impl("linear", specformer::linear);
  m.impl("packed_linear", specformer::packed_linear);
  m.impl("dequantize_packed", specformer::dequantize_packed);
  m.impl("dequantize_packed_into", specformer::dequantize_packed_into);
  m.impl("rms_norm", specformer::rms_norm);
  m.impl("silu_mul", specformer::silu_mul);
  m.impl("rotary", specformer::rotary);
  m.impl("decode_attention", specformer::decode_attention);
}
