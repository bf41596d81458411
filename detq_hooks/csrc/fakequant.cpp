// Fused LSQ/LSQ+ fake quantization for CPU: one pass forward, one pass backward.
//
// Forward writes the output and a 2-byte state per element, nothing else:
//   inside the range   the rounding residual r = v - round(v), v = x / s, as round(r * RSCALE) in [-32766, 32766]
//   below the range    LOW  (-32768)
//   above the range    HIGH (32767)
//   NaN                NAN_ (-32767)   (out of range, as in the reference; it makes the scale gradient NaN)
// Backward reads the upstream gradient and that state and produces, in one pass,
//   grad_x = grad where inside else 0
//   grad_s = g_f * (sum_inside grad * (-r) + lo * sum_low grad + hi * sum_high grad)      (NaN if any NaN input)
//   grad_z = g_f * (-s) * sum_outside grad
// with lo = qmin - z, hi = qmax - z. The residual is stored to 1/65532 (|error| <= 7.7e-6, below the float32
// spacing of v for 8-bit codes), so outputs, masks and input gradients are exact and the scale gradient is
// within float tolerance. Sums: float lanes inside fixed 16384-element chunks, chunk results added in double
// in chunk order, so the result does not depend on the number of threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

constexpr float RSCALE = 65532.f;
constexpr int16_t LOW = -32768, HIGH = 32767, NAN_ = -32767;
constexpr int64_t CHUNK = 16384;
constexpr int LANES = 16;

// out and (optionally) state for n contiguous elements sharing one scale. State types:
//   int16_t  (activations): residual * RSCALE rounded, or a sentinel (LOW / HIGH / NAN_)
//   float    (weights, small): the exact residual v - round(v) (exact in float32: Sterbenz), or -2 / +2 / NaN
inline void store_state(int16_t* st, float v, float r, bool in, float lo, float hi) {
  const float code = in ? (v - r) * RSCALE : (r < lo ? -32768.f : (r > hi ? 32767.f : -32767.f));
  *st = static_cast<int16_t>(static_cast<int>(std::nearbyint(code)));
}
inline void store_state(float* st, float v, float r, bool in, float lo, float hi) {
  *st = in ? v - r : (r < lo ? -2.f : (r > hi ? 2.f : v));  // v is NaN in the last case
}

template <typename S>
inline void fwd_span(const float* __restrict x, float* __restrict out, S* __restrict st, int64_t n, float s,
                     float lo, float hi) {
  if (st != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const float v = x[i] / s;
      const float r = std::nearbyint(v);
      const bool in = (r >= lo) & (r <= hi);
      float c = r < lo ? lo : r;
      c = c > hi ? hi : c;
      out[i] = c * s;
      store_state(st + i, v, r, in, lo, hi);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float r = std::nearbyint(x[i] / s);
      float c = r < lo ? lo : r;
      c = c > hi ? hi : c;
      out[i] = c * s;
    }
  }
}

// grad_x for n elements and, into acc (double[4]): sum_inside g*code, sum_low g, sum_high g, count NaN + sum_nan g.
struct Acc {
  double resid = 0, low = 0, high = 0, nan_g = 0, nan_count = 0;
  void add(const Acc& o) {
    resid += o.resid;
    low += o.low;
    high += o.high;
    nan_g += o.nan_g;
    nan_count += o.nan_count;
  }
};

// One element of the backward pass into lane accumulators. Written with 0/1 float factors rather than
// conditional adds so that GCC vectorises the lane loop; the stored input gradient is a select, so an inf or NaN
// upstream gradient at an out-of-range element still gives exactly 0 there.
template <bool NEED_X, typename S>
inline void bwd_elem(float gg, float c, float* gx, float& a0, float& a1, float& a2, float& a3, float& a4) {
  float in, lo, hi, nn;
  if constexpr (std::is_same_v<S, int16_t>) {
    in = (c > -32767.f) & (c < 32767.f) ? 1.f : 0.f;
    lo = c == -32768.f ? 1.f : 0.f;
    hi = c == 32767.f ? 1.f : 0.f;
    nn = c == -32767.f ? 1.f : 0.f;
  } else {
    in = (c >= -0.5f) & (c <= 0.5f) ? 1.f : 0.f;
    lo = c == -2.f ? 1.f : 0.f;
    hi = c == 2.f ? 1.f : 0.f;
    nn = c != c ? 1.f : 0.f;
    c = in != 0.f ? c : 0.f;  // keeps a NaN state out of the residual sum (the NaN count reports it)
  }
  const float gi = in != 0.f ? gg : 0.f;
  if constexpr (NEED_X) *gx = gi;
  a0 += gi * c;
  a1 += gg * lo;
  a2 += gg * hi;
  a3 += gg * nn;
  a4 += nn;
}

template <bool NEED_X, typename S>
inline void bwd_span_t(const float* __restrict g, const S* __restrict st, float* __restrict gx, int64_t n,
                       Acc& acc) {
  float a0[LANES] = {0}, a1[LANES] = {0}, a2[LANES] = {0}, a3[LANES] = {0}, a4[LANES] = {0};
  int64_t i = 0;
  const int64_t nv = n - n % LANES;
  for (; i < nv; i += LANES) {
    for (int j = 0; j < LANES; ++j) {
      bwd_elem<NEED_X, S>(g[i + j], static_cast<float>(st[i + j]), gx + i + j, a0[j], a1[j], a2[j], a3[j], a4[j]);
    }
  }
  for (; i < n; ++i) {
    bwd_elem<NEED_X, S>(g[i], static_cast<float>(st[i]), gx + i, a0[0], a1[0], a2[0], a3[0], a4[0]);
  }
  for (int j = 0; j < LANES; ++j) {
    acc.resid += a0[j];
    acc.low += a1[j];
    acc.high += a2[j];
    acc.nan_g += a3[j];
    acc.nan_count += a4[j];
  }
}

template <typename S>
inline void bwd_span(const float* g, const S* st, float* gx, int64_t n, bool need_x, Acc& acc) {
  if (need_x) {
    bwd_span_t<true, S>(g, st, gx, n, acc);
  } else {
    bwd_span_t<false, S>(g, st, gx, n, acc);
  }
}

void check_input(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu(), "detq fused fake-quant: ", what, " must be on CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "detq fused fake-quant: ", what, " must be float32");
  TORCH_CHECK(x.is_non_overlapping_and_dense(), "detq fused fake-quant: ", what, " must be dense");
}

int64_t inner_size(const at::Tensor& x, int64_t axis) {
  int64_t n = 1;
  for (int64_t d = axis + 1; d < x.dim(); ++d) n *= x.size(d);
  return n;
}

// Per tensor. Returns (out, state); state is an empty tensor when need_state is false.
std::vector<at::Tensor> per_tensor_fwd(const at::Tensor& x, double s, double lo, double hi, bool need_state) {
  check_input(x, "input");
  auto out = at::empty_like(x);
  at::Tensor st = need_state ? at::empty_like(x, x.options().dtype(at::kShort)) : at::empty({0}, x.options().dtype(at::kShort));
  const float* xp = x.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  int16_t* sp = need_state ? st.mutable_data_ptr<int16_t>() : nullptr;
  const float fs = static_cast<float>(s), flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
  at::parallel_for(0, x.numel(), CHUNK, [&](int64_t b, int64_t e) {
    fwd_span<int16_t>(xp + b, op + b, sp ? sp + b : nullptr, e - b, fs, flo, fhi);
  });
  return {out, st};
}

// Per tensor, no state, into a caller's buffer of x's sizes and strides (the quantized input a layer consumes at
// once, written into memory reused from call to call rather than a fresh allocation).
void per_tensor_fwd_out(const at::Tensor& x, at::Tensor& out, double s, double lo, double hi) {
  check_input(x, "input");
  check_input(out, "out");
  TORCH_CHECK(out.sizes() == x.sizes() && out.strides() == x.strides(), "detq fused fake-quant: out must have the input's sizes and strides");
  const float* xp = x.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  const float fs = static_cast<float>(s), flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
  at::parallel_for(0, x.numel(), CHUNK, [&](int64_t b, int64_t e) {
    fwd_span<int16_t>(xp + b, op + b, nullptr, e - b, fs, flo, fhi);
  });
}

// Per tensor. grad must have the state's strides (the caller copies it otherwise).
// Returns (grad_x, grad_s[1], grad_z[1]).
std::vector<at::Tensor> per_tensor_bwd(const at::Tensor& grad_in, const at::Tensor& st, double s, double lo, double hi,
                                       double grad_factor, bool need_x) {
  TORCH_CHECK(grad_in.device().is_cpu() && grad_in.scalar_type() == at::kFloat, "detq fused fake-quant: grad must be CPU float32");
  at::Tensor grad = grad_in;
  if (grad.strides() != st.strides()) {
    grad = at::empty_like(st, grad_in.options());
    grad.copy_(grad_in);
  }
  const int64_t n = st.numel();
  at::Tensor gx = need_x ? at::empty_like(grad) : at::empty({0}, grad.options());
  const float* gp = grad.const_data_ptr<float>();
  const int16_t* sp = st.const_data_ptr<int16_t>();
  float* gxp = need_x ? gx.mutable_data_ptr<float>() : nullptr;
  const int64_t nchunks = (n + CHUNK - 1) / CHUNK;
  std::vector<Acc> part(nchunks);
  at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const int64_t i0 = c * CHUNK, len = std::min(CHUNK, n - i0);
      bwd_span(gp + i0, sp + i0, gxp ? gxp + i0 : nullptr, len, need_x, part[c]);
    }
  });
  Acc t;
  for (const auto& p : part) t.add(p);
  double gs = -t.resid / RSCALE + lo * t.low + hi * t.high;
  if (t.nan_count > 0) gs = std::nan("");
  const double gz = -s * (t.low + t.high + t.nan_g);
  auto opts = grad.options();
  auto grad_s = at::empty({1}, opts), grad_z = at::empty({1}, opts);
  grad_s.mutable_data_ptr<float>()[0] = static_cast<float>(gs * grad_factor);
  grad_z.mutable_data_ptr<float>()[0] = static_cast<float>(gz * grad_factor);
  return {gx, grad_s, grad_z};
}

// Per channel along `axis` of a contiguous x viewed as (outer, C, inner); scale/lo/hi are float32 [C]. The state
// is the exact float residual: weights are small, and their scale gradients then match the reference to float
// rounding even for 2-bit channels of a few dozen elements.
std::vector<at::Tensor> per_channel_fwd(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& lo,
                                        const at::Tensor& hi, int64_t axis, bool need_state) {
  check_input(x, "input");
  TORCH_CHECK(x.is_contiguous(), "detq fused fake-quant: per-channel input must be contiguous");
  const int64_t C = x.size(axis);
  const int64_t inner = inner_size(x, axis);
  const int64_t outer = C == 0 || inner == 0 ? 0 : x.numel() / (C * inner);
  auto out = at::empty_like(x);
  at::Tensor st = need_state ? at::empty_like(x) : at::empty({0}, x.options());
  const float* xp = x.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  float* sp = need_state ? st.mutable_data_ptr<float>() : nullptr;
  const float* s = scale.const_data_ptr<float>();
  const float* l = lo.const_data_ptr<float>();
  const float* h = hi.const_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, CHUNK / std::max<int64_t>(1, inner * outer));
  at::parallel_for(0, C, grain, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      for (int64_t o = 0; o < outer; ++o) {
        const int64_t off = (o * C + c) * inner;
        fwd_span<float>(xp + off, op + off, sp ? sp + off : nullptr, inner, s[c], l[c], h[c]);
      }
    }
  });
  return {out, st};
}

// Returns (grad_x, grad_s[C], grad_z[C]).
std::vector<at::Tensor> per_channel_bwd(const at::Tensor& grad_in, const at::Tensor& st, const at::Tensor& scale,
                                        const at::Tensor& lo, const at::Tensor& hi, int64_t axis, double grad_factor,
                                        bool need_x) {
  TORCH_CHECK(grad_in.device().is_cpu() && grad_in.scalar_type() == at::kFloat, "detq fused fake-quant: grad must be CPU float32");
  at::Tensor grad = grad_in.is_contiguous() ? grad_in : grad_in.contiguous();
  const int64_t C = st.size(axis);
  const int64_t inner = inner_size(st, axis);
  const int64_t outer = C == 0 || inner == 0 ? 0 : st.numel() / (C * inner);
  at::Tensor gx = need_x ? at::empty_like(grad) : at::empty({0}, grad.options());
  const float* gp = grad.const_data_ptr<float>();
  const float* sp = st.const_data_ptr<float>();
  float* gxp = need_x ? gx.mutable_data_ptr<float>() : nullptr;
  auto grad_s = at::empty({C}, grad.options()), grad_z = at::empty({C}, grad.options());
  float* gsp = grad_s.mutable_data_ptr<float>();
  float* gzp = grad_z.mutable_data_ptr<float>();
  const float* s = scale.const_data_ptr<float>();
  const float* l = lo.const_data_ptr<float>();
  const float* h = hi.const_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, CHUNK / std::max<int64_t>(1, inner * outer));
  at::parallel_for(0, C, grain, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      Acc t;
      for (int64_t o = 0; o < outer; ++o) {
        const int64_t off = (o * C + c) * inner;
        Acc a;
        bwd_span(gp + off, sp + off, gxp ? gxp + off : nullptr, inner, need_x, a);
        t.add(a);
      }
      double gs = -t.resid + static_cast<double>(l[c]) * t.low + static_cast<double>(h[c]) * t.high;
      if (t.nan_count > 0) gs = std::nan("");
      gsp[c] = static_cast<float>(gs * grad_factor);
      gzp[c] = static_cast<float>(-static_cast<double>(s[c]) * (t.low + t.high + t.nan_g) * grad_factor);
    }
  });
  return {gx, grad_s, grad_z};
}

}  // namespace

TORCH_LIBRARY(detq_fq, m) {
  m.def("per_tensor_fwd(Tensor x, float s, float lo, float hi, bool need_state) -> Tensor[]");
  m.def("per_tensor_fwd_out(Tensor x, Tensor(a!) out, float s, float lo, float hi) -> ()");
  m.def("per_tensor_bwd(Tensor grad, Tensor state, float s, float lo, float hi, float grad_factor, bool need_x) -> Tensor[]");
  m.def("per_channel_fwd(Tensor x, Tensor scale, Tensor lo, Tensor hi, int axis, bool need_state) -> Tensor[]");
  m.def("per_channel_bwd(Tensor grad, Tensor state, Tensor scale, Tensor lo, Tensor hi, int axis, float grad_factor, bool need_x) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(detq_fq, CPU, m) {
  m.impl("per_tensor_fwd", &per_tensor_fwd);
  m.impl("per_tensor_fwd_out", &per_tensor_fwd_out);
  m.impl("per_tensor_bwd", &per_tensor_bwd);
  m.impl("per_channel_fwd", &per_channel_fwd);
  m.impl("per_channel_bwd", &per_channel_bwd);
}
