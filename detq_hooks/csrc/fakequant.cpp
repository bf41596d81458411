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
#include <ATen/ops/addmm.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/generated/Functions.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr float RSCALE = 65532.f;
constexpr int16_t LOW = -32768, HIGH = 32767, NAN_ = -32767;
constexpr int64_t CHUNK = 16384;
constexpr int LANES = 16;
constexpr int64_t TILE = 16;  // channels per block of the layout transposes

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
  // The LSQ step-size and offset gradients (before the gradient factor), with lo = qmin - z, hi = qmax - z; the
  // residual sum in units of `resid_unit` (RSCALE for the activations' int16 state, 1 for exact residuals).
  double scale_gradient(double lo, double hi, double resid_unit = 1.0) const {
    return nan_count > 0 ? std::nan("") : -resid / resid_unit + lo * low + hi * high;
  }
  double offset_gradient(double s) const { return -s * (low + high + nan_g); }
};

// The sums of `span(i0, len, acc)` over fixed CHUNK-sized pieces of n elements, run in parallel and added in
// piece order, so that the result does not depend on the number of threads.
template <typename F>
Acc sum_over_chunks(int64_t n, const F& span) {
  const int64_t nchunks = (n + CHUNK - 1) / CHUNK;
  std::vector<Acc> part(nchunks);
  at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) span(c * CHUNK, std::min(CHUNK, n - c * CHUNK), part[c]);
  });
  Acc t;
  for (const auto& p : part) t.add(p);
  return t;
}

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

// IN_PLACE: the upstream gradient is read from gx and the input gradient written over it (g is not accessed, so
// the restrict qualifiers hold).
template <bool NEED_X, bool IN_PLACE, typename S>
inline void bwd_span_t(const float* __restrict g, const S* __restrict st, float* __restrict gx, int64_t n,
                       Acc& acc) {
  const float* __restrict src = IN_PLACE ? gx : g;
  float a0[LANES] = {0}, a1[LANES] = {0}, a2[LANES] = {0}, a3[LANES] = {0}, a4[LANES] = {0};
  int64_t i = 0;
  const int64_t nv = n - n % LANES;
  for (; i < nv; i += LANES) {
    for (int j = 0; j < LANES; ++j) {
      bwd_elem<NEED_X, S>(src[i + j], static_cast<float>(st[i + j]), gx + i + j, a0[j], a1[j], a2[j], a3[j], a4[j]);
    }
  }
  for (; i < n; ++i) {
    bwd_elem<NEED_X, S>(src[i], static_cast<float>(st[i]), gx + i, a0[0], a1[0], a2[0], a3[0], a4[0]);
  }
  for (int j = 0; j < LANES; ++j) {
    acc.resid += a0[j];
    acc.low += a1[j];
    acc.high += a2[j];
    acc.nan_g += a3[j];
    acc.nan_count += a4[j];
  }
}

// gx == g: the input gradient is written over the upstream one.
template <typename S>
inline void bwd_span(const float* g, const S* st, float* gx, int64_t n, bool need_x, Acc& acc) {
  if (!need_x) {
    bwd_span_t<false, false, S>(g, st, nullptr, n, acc);
  } else if (gx == g) {
    bwd_span_t<true, true, S>(nullptr, st, gx, n, acc);
  } else {
    bwd_span_t<true, false, S>(g, st, gx, n, acc);
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

// The derivatives of per-tensor fake quantization out = clamp(round(v), lo, hi) * s, v = x / s, along its step size
// and offset, element by element, with the straight-through rounding of the backward kernels: d out / d s is
// round(v) - v inside the range and the clamped code outside (NaN for a NaN input, so that the step size's gradient
// is NaN as per_tensor_bwd's); with need_zero also d out / d z, 0 inside and -s outside (a NaN input counts as
// outside, as there); and whether any input is NaN. For a layer whose input needs no gradient (the image batch):
// the step size's gradient is then the dot product of the output's gradient with the layer applied to d out / d s,
// a forward convolution, instead of the input gradient's transposed convolution (modules.py, _ConvRecomputed).
std::vector<at::Tensor> per_tensor_tangents(const at::Tensor& x, double s, double lo, double hi, bool need_zero) {
  check_input(x, "input");
  auto ds = at::empty_like(x);
  at::Tensor dz = need_zero ? at::empty_like(x) : at::empty({0}, x.options());
  const float* xp = x.const_data_ptr<float>();
  float* dsp = ds.mutable_data_ptr<float>();
  float* dzp = need_zero ? dz.mutable_data_ptr<float>() : nullptr;
  const float fs = static_cast<float>(s), flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
  std::atomic<bool> any_nan{false}, any_nonzero{false};
  at::parallel_for(0, x.numel(), CHUNK, [&](int64_t b, int64_t e) {
    int nan_seen = 0, nonzero = 0;
    for (int64_t i = b; i < e; ++i) {
      const float v = xp[i] / fs;
      const float r = std::nearbyint(v);
      const bool in = (r >= flo) & (r <= fhi);
      float c = r < flo ? flo : r;
      c = c > fhi ? fhi : c;  // NaN stays NaN
      const float d = in ? r - v : c;
      dsp[i] = d;
      if (dzp != nullptr) dzp[i] = in ? 0.f : -fs;
      nan_seen |= (r != r);
      // off the grid by more than v = x / s's own float rounding (a few ulp of v), or clipped; NaN counts too
      nonzero |= !(std::fabs(in ? d : c) <= (in ? 4.f * FLT_EPSILON * std::fabs(v) : 0.f)) | (dzp != nullptr && !in);
    }
    if (nan_seen) any_nan = true;
    if (nonzero) any_nonzero = true;
  });
  // whether any element is NaN: the step size's gradient is then NaN even where the layer reads no such element;
  // whether every input is on the grid and in range (8-bit images read as n/255 under a 1/255 step): the tangents
  // are then zero but for the rounding of x / s (n/255 / (1/255) is n only to an ulp), whose convolution would give
  // the step size a gradient of rounding noise; the caller skips it and gives zero
  const auto flag = [&](bool v) { return at::scalar_tensor(v ? 1 : 0, x.options().dtype(at::kBool)); };
  return {ds, dz, flag(any_nan.load()), flag(!any_nonzero.load())};
}

// Codes of n elements read with a stride, written contiguously. The restrict qualifiers matter: a uint8_t store may
// alias anything, and without them the loop is not vectorised; so does a stride known to be 1. Returns the number
// of NaN inputs.
template <bool DENSE>
inline int64_t codes_span_t(const float* __restrict x, int64_t stride, uint8_t* __restrict out, int64_t n, float s,
                            float lo, float hi) {
  int64_t nan_count = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float r = std::nearbyint(x[DENSE ? i : i * stride] / s);
    nan_count += (r != r);
    float k = r < lo ? lo : r;
    k = k > hi ? hi : k;
    out[i] = static_cast<uint8_t>(static_cast<int32_t>(k - lo));
  }
  return nan_count;
}
inline int64_t codes_span(const float* x, int64_t stride, uint8_t* out, int64_t n, float s, float lo, float hi) {
  return stride == 1 ? codes_span_t<true>(x, 1, out, n, s, lo, hi) : codes_span_t<false>(x, stride, out, n, s, lo, hi);
}

// Per tensor, the integer codes u = clamp(round(x / s), lo, hi) - lo (so (u + lo) * s is the fake-quantized value)
// of a 4-D float tensor of any strides, written as uint8 in channels-last order: the input of a oneDNN int8
// convolution. Returns (codes, any_nan): a NaN has no code, and the caller then keeps the float path.
std::vector<at::Tensor> per_tensor_codes_nhwc(const at::Tensor& x, double s, double lo, double hi) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4,
              "detq fused fake-quant: codes need a 4-D CPU float32 input");
  TORCH_CHECK(lo >= -255.0 && hi <= 255.0 && hi - lo <= 255.0, "detq fused fake-quant: codes need a range of at most 256 values");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t sN = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  auto out = at::empty({N, C, H, W}, x.options().dtype(at::kByte).memory_format(at::MemoryFormat::ChannelsLast));
  const float* xp = x.const_data_ptr<float>();
  uint8_t* op = out.mutable_data_ptr<uint8_t>();
  const float fs = static_cast<float>(s), flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
  std::atomic<int64_t> nan_seen{0};
  if (sC != 1 && sW == 1 && sH == W) {  // NCHW planes: each output pixel gathers its C codes (vectorised gathers)
    const int64_t HW = H * W;
    at::parallel_for(0, N * HW, std::max<int64_t>(1, CHUNK / std::max<int64_t>(1, C)), [&](int64_t b, int64_t e) {
      int64_t nans = 0;
      for (int64_t i = b; i < e; ++i) {
        const int64_t n = i / HW, p = i % HW;
        nans += codes_span(xp + n * sN + p, sC, op + i * C, C, fs, flo, fhi);
      }
      if (nans) nan_seen.fetch_add(nans, std::memory_order_relaxed);
    });
  } else {
    const int64_t rows = N * H;  // one row: W * C codes, contiguous in the output
    const int64_t grain = std::max<int64_t>(1, CHUNK / std::max<int64_t>(1, W * C));
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
      int64_t nans = 0;
      for (int64_t row = b; row < e; ++row) {
        const int64_t n = row / H, h = row % H;
        const float* xr = xp + n * sN + h * sH;
        uint8_t* orow = op + row * W * C;
        if (sC == 1 && sW == C) {  // channels-last rows: one span per row
          nans += codes_span(xr, 1, orow, W * C, fs, flo, fhi);
        } else {  // a channel slice of a channels-last tensor, or any other strides: one span per pixel
          for (int64_t w = 0; w < W; ++w) nans += codes_span(xr + w * sW, sC, orow + w * C, C, fs, flo, fhi);
        }
      }
      if (nans) nan_seen.fetch_add(nans, std::memory_order_relaxed);
    });
  }
  auto flag = at::empty({1}, x.options().dtype(at::kBool));
  flag.mutable_data_ptr<bool>()[0] = nan_seen.load() > 0;
  return {out, flag};
}

// A channels-last float tensor copied into contiguous (NCHW) memory, in TILE x TILE blocks (ATen's strided copy
// takes about twice as long): the output of a oneDNN int8 convolution handed back in the layout its input had.
at::Tensor channels_last_to_contiguous(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4 &&
                  x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "detq fused fake-quant: expected a channels-last 4-D CPU float32 tensor");
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  auto out = at::empty(x.sizes(), x.options());
  const float* xp = x.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  const int64_t blocks = (HW + TILE - 1) / TILE;
  at::parallel_for(0, N * blocks, std::max<int64_t>(1, CHUNK / std::max<int64_t>(1, TILE * C)), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t n = i / blocks, p0 = (i % blocks) * TILE, tp = std::min<int64_t>(TILE, HW - p0);
      const float* __restrict src = xp + (n * HW + p0) * C;
      float* __restrict dst = op + n * C * HW + p0;
      for (int64_t c0 = 0; c0 < C; c0 += TILE) {
        const int64_t tc = std::min<int64_t>(TILE, C - c0);
        for (int64_t c = c0; c < c0 + tc; ++c)
          for (int64_t p = 0; p < tp; ++p) dst[c * HW + p] = src[p * C + c];
      }
    }
  });
  return out;
}

// The int8 codes of a fake-quantized weight w = code * scale[c] (per output channel c, the first dimension), as
// oneDNN's integer layers take them; code = round(w / scale) recovers the integer exactly. Returns (codes, ok): ok is
// false when an element or a scale is not finite or a code falls outside int8 (a broken range).
std::vector<at::Tensor> weight_codes(const at::Tensor& w_in, const at::Tensor& scale_in) {
  TORCH_CHECK(w_in.device().is_cpu() && w_in.scalar_type() == at::kFloat && scale_in.scalar_type() == at::kFloat,
              "detq fused fake-quant: weight codes need CPU float32 tensors");
  const at::Tensor w = w_in.contiguous(), scale = scale_in.contiguous();
  const int64_t C = w.size(0), K = C ? w.numel() / C : 0;
  TORCH_CHECK(scale.numel() == C, "detq fused fake-quant: one scale per output channel");
  auto codes = at::empty(w.sizes(), w.options().dtype(at::kChar));
  const float* wp = w.const_data_ptr<float>();
  const float* sp = scale.const_data_ptr<float>();
  int8_t* cp = codes.mutable_data_ptr<int8_t>();
  std::atomic<bool> ok{true};
  at::parallel_for(0, C, std::max<int64_t>(1, CHUNK / std::max<int64_t>(1, K)), [&](int64_t b, int64_t e) {
    int64_t bad = 0;
    for (int64_t c = b; c < e; ++c) {
      const float s = sp[c];
      bad += !std::isfinite(s);
      const float* __restrict src = wp + c * K;
      int8_t* __restrict dst = cp + c * K;
      for (int64_t i = 0; i < K; ++i) {
        const float r = std::nearbyint(src[i] / s);
        bad += !(r >= -128.f && r <= 127.f);  // also NaN
        const float k = r < -128.f ? -128.f : (r > 127.f ? 127.f : r);
        dst[i] = static_cast<int8_t>(static_cast<int32_t>(k == k ? k : 0.f));
      }
    }
    if (bad) ok.store(false, std::memory_order_relaxed);
  });
  auto flag = at::empty({1}, w.options().dtype(at::kBool));
  flag.mutable_data_ptr<bool>()[0] = ok.load();
  return {codes, flag};
}

// Whether a gradient handed to a backward is referenced by nothing else (no hook or retained .grad keeps it, no
// other tensor shares its memory), so the backward may overwrite it.
bool sole_owner(const at::Tensor& g) {
  return g.defined() && g.use_count() == 1 && g.storage().use_count() == 1 && !g.requires_grad() && !g.is_inference() &&
         g.device().is_cpu() && g.scalar_type() == at::kFloat && g.is_non_overlapping_and_dense();
}

// A backward's upstream gradient taken out of its list, as float32, and whether the backward may write over it
// (sole_owner).
std::pair<at::Tensor, bool> take_gradient(at::Tensor&& g) {
  const bool ours = sole_owner(g);
  return {ours ? std::move(g) : g.to(at::kFloat), ours};
}

// `grad` with `like`'s strides: itself when it has them, else a copy, which is then the caller's to overwrite
// (`ours` becomes true).
at::Tensor in_strides_of(const at::Tensor& grad, const at::Tensor& like, bool& ours) {
  if (grad.strides() == like.strides()) return grad;
  at::Tensor copy = at::empty_like(like, grad.options());
  copy.copy_(grad);
  ours = true;
  return copy;
}

// Per tensor. A grad without the state's strides is copied to them first.
// Returns (grad_x, grad_s[1], grad_z[1]). With grad_is_ours (the caller holds the only reference to grad and its
// memory) grad_x is written over grad: no fresh activation-sized buffer, and each cache line is read and written
// once instead of a second line being fetched to be written.
std::vector<at::Tensor> per_tensor_bwd_impl(const at::Tensor& grad_in, const at::Tensor& st, double s, double lo,
                                            double hi, double grad_factor, bool need_x, bool grad_is_ours) {
  TORCH_CHECK(grad_in.device().is_cpu() && grad_in.scalar_type() == at::kFloat, "detq fused fake-quant: grad must be CPU float32");
  at::Tensor grad = in_strides_of(grad_in, st, grad_is_ours);
  at::Tensor gx = !need_x ? at::empty({0}, grad.options()) : (grad_is_ours ? grad : at::empty_like(grad));
  const float* gp = grad.const_data_ptr<float>();
  const int16_t* sp = st.const_data_ptr<int16_t>();
  float* gxp = need_x ? gx.data_ptr<float>() : nullptr;
  const Acc t = sum_over_chunks(st.numel(), [&](int64_t i0, int64_t len, Acc& acc) {
    bwd_span(gp + i0, sp + i0, gxp ? gxp + i0 : nullptr, len, need_x, acc);
  });
  auto opts = grad.options();
  auto grad_s = at::empty({1}, opts), grad_z = at::empty({1}, opts);
  grad_s.mutable_data_ptr<float>()[0] = static_cast<float>(t.scale_gradient(lo, hi, RSCALE) * grad_factor);
  grad_z.mutable_data_ptr<float>()[0] = static_cast<float>(t.offset_gradient(s) * grad_factor);
  return {gx, grad_s, grad_z};
}

std::vector<at::Tensor> per_tensor_bwd(const at::Tensor& grad, const at::Tensor& st, double s, double lo, double hi,
                                       double grad_factor, bool need_x) {
  return per_tensor_bwd_impl(grad, st, s, lo, hi, grad_factor, need_x, false);
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
// `st` is the forward's state, or with from_x the input itself: the residual is then recomputed block by block
// into a stack buffer (one pass over the weight, nothing weight-sized kept between forward and backward).
std::vector<at::Tensor> per_channel_bwd(const at::Tensor& grad_in, const at::Tensor& st, const at::Tensor& scale,
                                        const at::Tensor& lo, const at::Tensor& hi, int64_t axis, double grad_factor,
                                        bool need_x, bool from_x = false, bool grad_is_ours = false) {
  TORCH_CHECK(grad_in.device().is_cpu() && grad_in.scalar_type() == at::kFloat, "detq fused fake-quant: grad must be CPU float32");
  at::Tensor grad = grad_in;
  if (!grad.is_contiguous()) {
    grad = grad_in.contiguous();
    grad_is_ours = true;
  }
  const int64_t C = st.size(axis);
  const int64_t inner = inner_size(st, axis);
  const int64_t outer = C == 0 || inner == 0 ? 0 : st.numel() / (C * inner);
  // grad_is_ours: the input gradient is written over grad (as per_tensor_bwd_impl)
  at::Tensor gx = !need_x ? at::empty({0}, grad.options()) : (grad_is_ours ? grad : at::empty_like(grad));
  const float* gp = grad.const_data_ptr<float>();
  const float* sp = st.const_data_ptr<float>();
  float* gxp = need_x ? gx.data_ptr<float>() : nullptr;
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
        if (from_x) {
          constexpr int64_t BLOCK = 512;
          float state[BLOCK], unused[BLOCK];
          for (int64_t i = 0; i < inner; i += BLOCK) {
            const int64_t len = std::min(BLOCK, inner - i);
            fwd_span<float>(sp + off + i, unused, state, len, s[c], l[c], h[c]);
            bwd_span(gp + off + i, state, gxp ? gxp + off + i : nullptr, len, need_x, a);
          }
        } else {
          bwd_span(gp + off, sp + off, gxp ? gxp + off : nullptr, inner, need_x, a);
        }
        t.add(a);
      }
      gsp[c] = static_cast<float>(t.scale_gradient(l[c], h[c]) * grad_factor);
      gzp[c] = static_cast<float>(t.offset_gradient(s[c]) * grad_factor);
    }
  });
  return {gx, grad_s, grad_z};
}

// A quantizer's integer zero point: round half to even (as torch.round), clamped to [qmin, qmax]; NaN stays NaN.
template <typename T>
inline T integer_zero_point(T zero_point, T qmin, T qmax) {
  const T z = std::nearbyint(zero_point);
  return std::isnan(z) ? z : (z < qmin ? qmin : (z > qmax ? qmax : z));
}

// The per-channel bounds of a quantizer's own parameters: s = max(scale, floor) (NaN stays NaN, as clamp_min),
// z = clamp(round_half_even(zero_point), qmin, qmax), lo = qmin - z, hi = qmax - z; float32 [C] each. Computed
// here rather than by five small tensor ops in Python (each costs about what the kernel does on a small weight).
std::vector<at::Tensor> channel_bounds(const at::Tensor& scale, const at::Tensor& zero_point, int64_t qmin, int64_t qmax,
                                       double floor) {
  TORCH_CHECK(scale.device().is_cpu() && scale.scalar_type() == at::kFloat && zero_point.device().is_cpu() &&
                  zero_point.scalar_type() == at::kFloat && scale.numel() == zero_point.numel(),
              "detq fused fake-quant: scale and zero point must be CPU float32 of equal size");
  const at::Tensor sc = scale.contiguous(), zc = zero_point.contiguous();
  const int64_t C = sc.numel();
  auto opts = sc.options();
  at::Tensor s = at::empty({C}, opts), lo = at::empty({C}, opts), hi = at::empty({C}, opts);
  const float* sp = sc.const_data_ptr<float>();
  const float* zp = zc.const_data_ptr<float>();
  float* so = s.mutable_data_ptr<float>();
  float* lp = lo.mutable_data_ptr<float>();
  float* hp = hi.mutable_data_ptr<float>();
  const float f = static_cast<float>(floor), fmin = static_cast<float>(qmin), fmax = static_cast<float>(qmax);
  for (int64_t c = 0; c < C; ++c) {
    so[c] = sp[c] < f ? f : sp[c];
    const float z = integer_zero_point(zp[c], fmin, fmax);
    lp[c] = fmin - z;
    hp[c] = fmax - z;
  }
  return {s, lo, hi};
}

// Per channel on the quantizer's parameters (bounds as channel_bounds), without autograd. Returns (out, state).
std::vector<at::Tensor> per_channel_q_fwd(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                                          int64_t qmin, int64_t qmax, int64_t axis, double floor, bool need_state) {
  const auto b = channel_bounds(scale, zero_point, qmin, qmax, floor);
  return per_channel_fwd(x, b[0], b[1], b[2], axis, need_state);
}

// The backward of per_channel_q_fwd from the weight itself (nothing saved by a forward): the gradients of the weight
// (if need_x), scale and zero point [C] for the gradient of the quantized weight. For the layers that quantize their
// weight again in backward (modules.py) instead of keeping the quantized weight from the forward.
std::vector<at::Tensor> per_channel_q_bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale,
                                          const at::Tensor& zero_point, int64_t qmin, int64_t qmax, int64_t axis,
                                          double grad_factor, double floor, bool need_x) {
  const auto b = channel_bounds(scale, zero_point, qmin, qmax, floor);
  return per_channel_bwd(grad, x.contiguous(), b[0], b[1], b[2], axis, grad_factor, need_x, /*from_x=*/true);
}

// ---------------------------------------------------------------------------------------------------------------
// Autograd ops on the quantizer's own parameters: the forward reads the bounds (scale floored at `floor` with a
// straight-through gradient, zero point rounded half to even and clamped), the backward gives the input, scale and
// zero-point gradients, both without a Python frame (a Python autograd.Function with its floor node and bound
// tensor ops cost tens of microseconds per quantizer and step, more than the kernels on a small detector's weights).

// Per-tensor bounds from one-element tensors, as quantizers.py's _per_tensor_bounds (read in C++: no tensor ops).
struct Bounds {
  double s, lo, hi;
};
Bounds tensor_bounds(const at::Tensor& scale, const at::Tensor& zero_point, int64_t qmin, int64_t qmax, double floor) {
  TORCH_CHECK(scale.numel() == 1 && zero_point.numel() == 1, "detq fused fake-quant: per-tensor scale and zero point must have one element");
  double s = scale.item<double>();
  s = s < floor ? floor : s;  // NaN stays NaN
  const double z = integer_zero_point(zero_point.item<double>(), static_cast<double>(qmin), static_cast<double>(qmax));
  return {s, qmin - z, qmax - z};
}

at::Tensor dense(const at::Tensor& x) { return x.is_non_overlapping_and_dense() ? x : x.contiguous(); }

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The parameters' shapes, for their gradients (the kernels give them flat).
void save_parameter_shapes(AutogradContext* ctx, const at::Tensor& scale, const at::Tensor& zero_point) {
  ctx->saved_data["scale_shape"] = scale.sizes().vec();
  ctx->saved_data["zero_shape"] = zero_point.sizes().vec();
}

// The gradients of (x, scale, zero_point) from a backward kernel's (grad_x, grad_s, grad_z), undefined where not
// needed, then one undefined gradient for each of the op's `num_inputs - 3` non-tensor arguments.
variable_list input_gradients(AutogradContext* ctx, const std::vector<at::Tensor>& r, size_t num_inputs) {
  variable_list out(num_inputs);
  if (ctx->needs_input_grad(0)) out[0] = r[0];
  if (ctx->needs_input_grad(1)) out[1] = r[1].reshape(ctx->saved_data["scale_shape"].toIntVector());
  if (ctx->needs_input_grad(2)) out[2] = r[2].reshape(ctx->saved_data["zero_shape"].toIntVector());
  return out;
}

class PerTensorFQ : public torch::autograd::Function<PerTensorFQ> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scale,
                            const at::Tensor& zero_point, int64_t qmin, int64_t qmax, double grad_factor, double floor) {
    const Bounds b = tensor_bounds(scale, zero_point, qmin, qmax, floor);
    auto r = per_tensor_fwd(dense(x), b.s, b.lo, b.hi, true);
    ctx->save_for_backward({r[1]});
    ctx->saved_data["s"] = b.s;
    ctx->saved_data["lo"] = b.lo;
    ctx->saved_data["hi"] = b.hi;
    ctx->saved_data["gf"] = grad_factor;
    save_parameter_shapes(ctx, scale, zero_point);
    return r[0];
  }

  // grads by reference: it is the autograd node's own list, so a gradient moved out of it is held here alone when
  // nothing else references it, and may then be overwritten by the input gradient (sole_owner).
  static variable_list backward(AutogradContext* ctx, variable_list& grads) {
    const auto st = ctx->get_saved_variables()[0];
    auto [g, ours] = take_gradient(std::move(grads[0]));
    auto r = per_tensor_bwd_impl(g, st, ctx->saved_data["s"].toDouble(), ctx->saved_data["lo"].toDouble(),
                                 ctx->saved_data["hi"].toDouble(), ctx->saved_data["gf"].toDouble(),
                                 ctx->needs_input_grad(0), ours);
    return input_gradients(ctx, r, 7);  // x, scale, zero_point, qmin, qmax, grad_factor, floor
  }
};

class PerChannelFQ : public torch::autograd::Function<PerChannelFQ> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scale,
                            const at::Tensor& zero_point, int64_t qmin, int64_t qmax, int64_t axis, double grad_factor,
                            double floor) {
    // Kept for backward: the weight (a parameter, alive anyway; no copy when contiguous) and the bounds, not the
    // scale and zero point (an in-place update of those before backward is then no error). The backward recomputes
    // the residual as it reduces, so a weight-sized state is never held (it was 4 bytes per weight element).
    const auto b = channel_bounds(scale.detach(), zero_point.detach(), qmin, qmax, floor);
    const at::Tensor xc = x.contiguous();
    auto r = per_channel_fwd(xc, b[0], b[1], b[2], axis, false);
    ctx->save_for_backward({xc, b[0], b[1], b[2]});
    ctx->saved_data["axis"] = axis;
    ctx->saved_data["gf"] = grad_factor;
    save_parameter_shapes(ctx, scale, zero_point);
    return r[0];
  }

  static variable_list backward(AutogradContext* ctx, variable_list& grads) {  // by reference: as PerTensorFQ
    const auto saved = ctx->get_saved_variables();
    auto [g, ours] = take_gradient(std::move(grads[0]));
    auto r = per_channel_bwd(g, saved[0], saved[1], saved[2], saved[3], ctx->saved_data["axis"].toInt(),
                             ctx->saved_data["gf"].toDouble(), ctx->needs_input_grad(0), /*from_x=*/true, ours);
    return input_gradients(ctx, r, 8);  // x, scale, zero_point, qmin, qmax, axis, grad_factor, floor
  }
};

at::Tensor fq_per_tensor_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point, int64_t qmin,
                             int64_t qmax, double, double floor) {
  const Bounds b = tensor_bounds(scale, zero_point, qmin, qmax, floor);
  return per_tensor_fwd(dense(x), b.s, b.lo, b.hi, false)[0];
}

at::Tensor fq_per_channel_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point, int64_t qmin,
                              int64_t qmax, int64_t axis, double, double floor) {
  return per_channel_q_fwd(x.contiguous(), scale, zero_point, qmin, qmax, axis, floor, false)[0];
}

// ---------------------------------------------------------------------------------------------------------------
// An activation quantizer whose input is the output of a SiLU or a ReLU (x = act(a); the conv blocks of YOLO,
// RTMDet and ResNets end in one). Its graph node is attached where the activation's node is attached (to a's
// producer), so it stands for act and the quantizer together: the forward is the ordinary quantizer's on x (bit for
// bit), and the backward gives dL/da = act'(a)·(in range)·g and the scale/offset gradients in one pass, from the
// tensor the activation's node keeps anyway (SiLU: its input, recomputing silu(a) for the rounding; ReLU: its
// output x itself). Nothing of its own is kept (the 2-byte state goes), and the backward neither writes nor reads
// the gradient of x nor runs the activation's backward. The activation's node still passes the gradients of x's
// other readers to a, where autograd adds them to this one: the total is the same whatever else reads x. Only a
// gradient of x itself (a hook on x, `x.retain_grad()`, autograd.grad w.r.t. x) lacks this reader's part.
// DETQ_NO_ACTIVATION_FUSION=1 turns it off.

// exp(x) in float32 without a call or a branch, so that the loops stay vectorised: Cody-Waite reduction and the
// degree-6 polynomial of Cephes' expf (about 2 ulp). exp(x) overflows to inf above 88.376 and is 0 below -87.337
// (expf gives denormals down to -103.97; silu and its derivative then differ by under 1e-36); NaN stays NaN.
inline float exp_poly(float x) {
  constexpr float HI = 88.3762626647949f, LO = -87.3365478515625f;
  float xc = x > HI ? HI : x;
  xc = xc < LO ? LO : xc;
  const float n = std::nearbyint(xc * 1.44269504088896341f);
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  float res = p * two_n;
  res = x > HI ? std::numeric_limits<float>::infinity() : res;
  res = x < LO ? 0.f : res;
  return x != x ? x : res;
}

enum class Act { SILU, RELU };

// What the fused node needs when x is the output of an activation's node: which activation, the tensor to keep
// (SiLU: its saved input, the pre-activation's values even for an in-place silu_, which keeps a copy; ReLU: x), and
// the edge to the activation's input. `found` is false otherwise (the quantizer then takes x as usual).
struct ActivationInput {
  bool found = false;
  Act act = Act::SILU;
  at::Tensor data;
  torch::autograd::Edge edge;
};

ActivationInput activation_input(const at::Tensor& x) {
  static const bool disabled = [] {
    const char* v = std::getenv("DETQ_NO_ACTIVATION_FUSION");
    return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
  }();
  ActivationInput r;
  if (disabled || !x.requires_grad() || x.is_view() || x.output_nr() != 0 || x.scalar_type() != at::kFloat ||
      !x.device().is_cpu() || !x.is_non_overlapping_and_dense()) {
    return r;
  }
  const auto fn = x.grad_fn();
  if (fn == nullptr || fn->num_outputs() != 1) return r;
  if (auto* silu = dynamic_cast<torch::autograd::generated::SiluBackward0*>(fn.get())) {
    try {
      r.data = silu->self_.unpack();  // raises if it was changed in place since
    } catch (const c10::Error&) {
      return r;
    }
    if (!r.data.defined() || r.data.scalar_type() != at::kFloat || r.data.strides() != x.strides() ||
        r.data.sizes() != x.sizes()) {
      return r;
    }
    r.act = Act::SILU;
  } else if (dynamic_cast<torch::autograd::generated::ReluBackward0*>(fn.get()) != nullptr) {
    r.data = x;
    r.act = Act::RELU;
  } else {
    return r;
  }
  r.edge = fn->next_edge(0);
  r.found = r.edge.is_valid();
  return r;
}

// silu(a) / s as ATen's SiLU computes silu (its rounding can differ by an ulp where the exp does).
inline float silu_over_s(float a, float e, float s) { return (a / (1.f + e)) / s; }

// One element of the backward: *ga = (in range) ? g·act'(a) : 0 and the sums of Acc (as bwd_elem). `d` is the
// kept tensor's element: a for SiLU (silu(a)/s recomputed as the forward's SiLU computed it, up to rounding: the
// forward's code is recovered except where silu(a)/s lies within a few ulp of a rounding boundary), x for ReLU
// (exact).
template <Act ACT>
inline void act_bwd_elem(float gg, float d, float* ga, float s, float lo, float hi, float& a0, float& a1, float& a2,
                         float& a3, float& a4) {
  float t, deriv;
  if constexpr (ACT == Act::SILU) {
    const float e = exp_poly(-d);
    const float sig = 1.f / (1.f + e);
    t = silu_over_s(d, e, s);
    deriv = sig * (1.f + d * (1.f - sig));  // as ATen's silu_backward
  } else {
    t = d / s;
    deriv = d > 0.f ? 1.f : 0.f;  // as threshold_backward on the ReLU's output
  }
  const float r = std::nearbyint(t);
  const bool in = (r >= lo) & (r <= hi);
  const float low = r < lo ? 1.f : 0.f;
  const float high = r > hi ? 1.f : 0.f;
  const float nn = r != r ? 1.f : 0.f;
  const float gi = in ? gg : 0.f;
  *ga = in ? gg * deriv : 0.f;
  a0 += gi * (in ? t - r : 0.f);
  a1 += gg * low;
  a2 += gg * high;
  a3 += gg * nn;
  a4 += nn;
}

// IN_PLACE: the upstream gradient is read from ga and a's gradient written over it. An OpenMP simd reduction (not
// bwd_span_t's lane arrays: with the exp and divisions GCC does not vectorise that form); the sums' order then
// depends on the build's vector width only.
template <Act ACT, bool IN_PLACE>
inline void act_bwd_span(const float* g, const float* __restrict d, float* __restrict ga, int64_t n, float s, float lo,
                         float hi, Acc& acc) {
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f, a4 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4)
  for (int64_t i = 0; i < n; ++i) {
    act_bwd_elem<ACT>(IN_PLACE ? ga[i] : g[i], d[i], ga + i, s, lo, hi, a0, a1, a2, a3, a4);
  }
  acc.resid += a0;
  acc.low += a1;
  acc.high += a2;
  acc.nan_g += a3;
  acc.nan_count += a4;
}

// ga == g: a's gradient is written over the upstream one (as bwd_span).
template <Act ACT>
inline void act_bwd_chunk(const float* g, const float* d, float* ga, int64_t n, float s, float lo, float hi, Acc& acc) {
  if (ga == g) {
    act_bwd_span<ACT, true>(nullptr, d, ga, n, s, lo, hi, acc);
  } else {
    act_bwd_span<ACT, false>(g, d, ga, n, s, lo, hi, acc);
  }
}

// The fused node (a graph node written directly rather than a custom Function: its edge is the activation's
// input edge, which a Function would only get from a tensor, and an in-place activation leaves none).
struct ActivationFakeQuantBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable data;
  Act act = Act::SILU;
  double s = 1, lo = 0, hi = 0, grad_factor = 1;
  std::vector<int64_t> scale_shape, zero_shape;

  std::string name() const override { return act == Act::SILU ? "SiluFakeQuantBackward" : "ReluFakeQuantBackward"; }
  void release_variables() override { data.reset_data(); }

  variable_list apply(variable_list&& grads) override {
    variable_list out(3);  // a, scale, zero_point
    if (!grads[0].defined()) return out;
    const at::Tensor d = data.unpack();
    auto [taken, ours] = take_gradient(std::move(grads[0]));
    const at::Tensor g = in_strides_of(taken, d, ours);
    const bool need_a = should_compute_output(0);
    at::Tensor ga = ours ? g : at::empty_like(d);  // written even when a needs no gradient (then scratch)
    const float fs = static_cast<float>(s), flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
    const float* gp = g.const_data_ptr<float>();
    const float* dp = d.const_data_ptr<float>();
    float* gap = ga.data_ptr<float>();
    const Acc t = sum_over_chunks(d.numel(), [&](int64_t i0, int64_t len, Acc& acc) {
      if (act == Act::SILU) {
        act_bwd_chunk<Act::SILU>(gp + i0, dp + i0, gap + i0, len, fs, flo, fhi, acc);
      } else {
        act_bwd_chunk<Act::RELU>(gp + i0, dp + i0, gap + i0, len, fs, flo, fhi, acc);
      }
    });
    auto opts = d.options();
    if (need_a) out[0] = ga;
    if (should_compute_output(1)) out[1] = at::full(scale_shape, static_cast<float>(t.scale_gradient(lo, hi) * grad_factor), opts);
    if (should_compute_output(2)) out[2] = at::full(zero_shape, static_cast<float>(t.offset_gradient(s) * grad_factor), opts);
    return out;
  }
};

at::Tensor fq_per_tensor_autograd(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                                  int64_t qmin, int64_t qmax, double grad_factor, double floor) {
  if (at::GradMode::is_enabled()) {
    ActivationInput ai = activation_input(x);
    if (ai.found) {
      const Bounds b = tensor_bounds(scale, zero_point, qmin, qmax, floor);
      at::Tensor out = per_tensor_fwd(x, b.s, b.lo, b.hi, false)[0];
      auto node = c10::make_intrusive<ActivationFakeQuantBackward>();
      torch::autograd::edge_list edges{ai.edge};
      for (const at::Tensor* p : {&scale, &zero_point}) {
        edges.push_back(p->requires_grad() ? torch::autograd::impl::gradient_edge(*p) : torch::autograd::Edge());
      }
      node->set_next_edges(std::move(edges));
      node->data = torch::autograd::SavedVariable(ai.data, false);
      node->act = ai.act;
      node->s = b.s;
      node->lo = b.lo;
      node->hi = b.hi;
      node->grad_factor = grad_factor;
      node->scale_shape = scale.sizes().vec();
      node->zero_shape = zero_point.sizes().vec();
      torch::autograd::set_history(out, node);
      return out;
    }
  }
  return PerTensorFQ::apply(x, scale, zero_point, qmin, qmax, grad_factor, floor);
}

at::Tensor fq_per_channel_autograd(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                                   int64_t qmin, int64_t qmax, int64_t axis, double grad_factor, double floor) {
  return PerChannelFQ::apply(x, scale, zero_point, qmin, qmax, axis, grad_factor, floor);
}

// ---------------------------------------------------------------------------------------------------------------
// conv2d(x, Q(w)) keeping the weight parameter (held anyway) rather than Q(w) for backward, and quantizing it again
// there (the same kernel on the same values: Q(w) bit for bit): modules.py's _ConvRecomputed for an input that has
// its own autograd history, as one C++ node. x is the quantized input; it is kept as any convolution keeps its input,
// or, with `kept` (the float tensor x was quantized from, which a ReLU's node keeps anyway) and its quantizer's
// bounds, `kept` is kept instead and x computed again in backward by the same per-tensor kernel (bit for bit). The
// Python Function cost about 90 us per layer and step in interpreter time (forward and backward), as much as the
// weight kernels.
// Each backward counts in `recomputed_backwards` (modules.py tells a layer called twice before any backward, a
// shared one, from that count).
std::atomic<int64_t> recomputed_backwards{0};

int64_t backward_count() { return recomputed_backwards.load(std::memory_order_relaxed); }

// Q(w) of a convolution's or linear layer's weight (output channels on axis 0), without autograd.
at::Tensor quantized_weight(const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& zero_point,
                            int64_t qmin, int64_t qmax, double floor) {
  return fq_per_channel_cpu(weight, scale, zero_point, qmin, qmax, 0, 0.0, floor);
}

// The weight quantizer's arguments, kept by both compiled nodes' forwards for their backwards.
void save_weight_arguments(AutogradContext* ctx, int64_t qmin, int64_t qmax, double grad_factor, double floor) {
  ctx->saved_data["qmin"] = qmin;
  ctx->saved_data["qmax"] = qmax;
  ctx->saved_data["gf"] = grad_factor;
  ctx->saved_data["floor"] = floor;
}

// What both compiled nodes' backwards start from: the refusal of a double backward (as modules.py's
// _no_double_backward), the count, then the saved tensors (input, weight, scale, zero point) and Q(w) again from the
// parameter. The count comes first: unpacking may rerun the forward (non-reentrant activation checkpointing), which
// must then not take this layer for one called twice before a backward.
struct WeightAgain {
  variable_list saved;
  at::Tensor weight, scale, zero_point, wq;
};
WeightAgain weight_again(AutogradContext* ctx) {
  TORCH_CHECK(!at::GradMode::is_enabled(),
              "a quantized layer's memory-saving backward has no double backward; run it under "
              "detq_hooks.quantizers.quantizer_mode('reference') (as the Fisher methods do) or set "
              "DETQ_KEEP_QUANTIZED_WEIGHTS=1");
  recomputed_backwards.fetch_add(1, std::memory_order_relaxed);
  WeightAgain w;
  w.saved = ctx->get_saved_variables();
  w.weight = w.saved[1].contiguous();
  w.scale = w.saved[2];
  w.zero_point = w.saved[3];
  w.wq = quantized_weight(w.weight, w.scale, w.zero_point, ctx->saved_data["qmin"].toInt(),
                          ctx->saved_data["qmax"].toInt(), ctx->saved_data["floor"].toDouble());
  return w;
}

// The weight quantizer's backward from the gradient of Q(w): the gradients of weight, scale and zero point into
// out[1..3], where the node's inputs want them.
void weight_gradients(AutogradContext* ctx, const WeightAgain& w, const at::Tensor& grad_wq, variable_list& out) {
  const bool need_w = ctx->needs_input_grad(1), need_s = ctx->needs_input_grad(2), need_z = ctx->needs_input_grad(3);
  if (!grad_wq.defined() || !(need_w || need_s || need_z)) return;
  auto r = per_channel_q_bwd(grad_wq, w.weight, w.scale, w.zero_point, ctx->saved_data["qmin"].toInt(),
                             ctx->saved_data["qmax"].toInt(), 0, ctx->saved_data["gf"].toDouble(),
                             ctx->saved_data["floor"].toDouble(), need_w);
  if (need_w) out[1] = r[0];
  if (need_s) out[2] = r[1].reshape(w.scale.sizes());
  if (need_z) out[3] = r[2].reshape(w.zero_point.sizes());
}

bool wants_weight_gradients(AutogradContext* ctx) {
  return ctx->needs_input_grad(1) || ctx->needs_input_grad(2) || ctx->needs_input_grad(3);
}

class ConvRecomputedWeight : public torch::autograd::Function<ConvRecomputedWeight> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                            const at::Tensor& zero_point, const std::optional<at::Tensor>& bias, int64_t qmin, int64_t qmax,
                            double grad_factor, double floor, std::vector<int64_t> stride, std::vector<int64_t> padding,
                            std::vector<int64_t> dilation, int64_t groups, const std::optional<at::Tensor>& kept,
                            std::vector<double> input_bounds) {
    const at::Tensor wq = quantized_weight(weight, scale, zero_point, qmin, qmax, floor);
    at::Tensor out = at::convolution(x, wq, bias, stride, padding, dilation, false, {0, 0}, groups);
    ctx->save_for_backward({kept.has_value() ? *kept : x, weight, scale, zero_point});
    ctx->saved_data["input_bounds"] = input_bounds;
    save_weight_arguments(ctx, qmin, qmax, grad_factor, floor);
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["bias"] = bias.has_value() && bias->defined() ? bias->size(0) : int64_t(-1);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list& grads) {
    variable_list out(15);
    const at::Tensor& grad = grads[0];
    const WeightAgain w = weight_again(ctx);
    if (!grad.defined()) return out;
    const std::vector<double> in_bounds = ctx->saved_data["input_bounds"].toDoubleVector();
    const at::Tensor x = in_bounds.empty() ? w.saved[0]
                                           : per_tensor_fwd(w.saved[0], in_bounds[0], in_bounds[1], in_bounds[2], false)[0];
    const int64_t bias_size = ctx->saved_data["bias"].toInt();
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_b = bias_size >= 0 && ctx->needs_input_grad(4);
    const std::vector<int64_t> bias_sizes{bias_size};
    auto [gx, gwq, gb] = at::convolution_backward(
        grad, x, w.wq, need_b ? at::OptionalIntArrayRef(bias_sizes) : at::OptionalIntArrayRef(c10::nullopt),
        ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
        ctx->saved_data["dilation"].toIntVector(), false, {0, 0}, ctx->saved_data["groups"].toInt(),
        {need_x, wants_weight_gradients(ctx), need_b});
    if (need_x) out[0] = gx;
    weight_gradients(ctx, w, gwq, out);
    if (need_b) out[4] = gb;
    return out;
  }
};

at::Tensor conv2d_recomputed_weight_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                                             const at::Tensor& zero_point, const std::optional<at::Tensor>& bias,
                                             int64_t qmin, int64_t qmax, double grad_factor, double floor,
                                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                             int64_t groups, const std::optional<at::Tensor>& kept,
                                             at::ArrayRef<double> input_bounds) {
  TORCH_CHECK(kept.has_value() == (input_bounds.size() == 3), "detq conv2d_recomputed_weight: a kept input needs its "
              "quantizer's (scale, lo, hi), and only it");
  // the kept tensor is data, not an input of this node: x carries the gradient to the quantizer that made it
  return ConvRecomputedWeight::apply(x, weight, scale, zero_point, bias, qmin, qmax, grad_factor, floor, stride.vec(),
                                     padding.vec(), dilation.vec(), groups,
                                     kept.has_value() ? std::optional<at::Tensor>(kept->detach()) : std::nullopt,
                                     input_bounds.vec());
}

at::Tensor conv2d_recomputed_weight_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                                        const at::Tensor& zero_point, const std::optional<at::Tensor>& bias, int64_t qmin,
                                        int64_t qmax, double, double floor, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                        const std::optional<at::Tensor>&, at::ArrayRef<double>) {
  return at::convolution(x, quantized_weight(weight, scale, zero_point, qmin, qmax, floor), bias, stride, padding,
                         dilation, false, {0, 0}, groups);
}

// linear(x, Q(w)) keeping the weight parameter rather than Q(w) for backward: modules.py's _LinearRecomputedWeight as
// one C++ node, the same ATen calls in the same order (outputs and gradients bit for bit). The product is written
// into a fresh tensor of the output's shape (not a view of a 2-D product: an in-place op after it must be allowed).
class LinearRecomputedWeight : public torch::autograd::Function<LinearRecomputedWeight> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                            const at::Tensor& zero_point, const std::optional<at::Tensor>& bias, int64_t qmin,
                            int64_t qmax, double grad_factor, double floor) {
    const at::Tensor wq = quantized_weight(weight, scale, zero_point, qmin, qmax, floor);
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
    shape.push_back(wq.size(0));
    at::Tensor out = at::empty(shape, x.options());
    const at::Tensor flat = x.reshape({-1, x.size(-1)});
    at::Tensor out2d = out.view({-1, wq.size(0)});
    if (bias.has_value() && bias->defined()) {
      at::addmm_out(out2d, *bias, flat, wq.t());
    } else {
      at::mm_out(out2d, flat, wq.t());
    }
    ctx->save_for_backward({x, weight, scale, zero_point});
    save_weight_arguments(ctx, qmin, qmax, grad_factor, floor);
    ctx->saved_data["bias"] = bias.has_value() && bias->defined();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list& grads) {
    variable_list out(9);
    const at::Tensor& grad = grads[0];
    const WeightAgain w = weight_again(ctx);
    if (!grad.defined()) return out;
    const at::Tensor& x = w.saved[0];
    if (ctx->needs_input_grad(0)) out[0] = grad.matmul(w.wq);
    const at::Tensor flat = grad.reshape({-1, grad.size(-1)});
    if (wants_weight_gradients(ctx)) weight_gradients(ctx, w, flat.t().mm(x.reshape({-1, x.size(-1)})), out);
    if (ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(4)) out[4] = flat.sum(0);
    return out;
  }
};

at::Tensor linear_recomputed_weight_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                                             const at::Tensor& zero_point, const std::optional<at::Tensor>& bias,
                                             int64_t qmin, int64_t qmax, double grad_factor, double floor) {
  return LinearRecomputedWeight::apply(x, weight, scale, zero_point, bias, qmin, qmax, grad_factor, floor);
}

at::Tensor linear_recomputed_weight_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                                        const at::Tensor& zero_point, const std::optional<at::Tensor>& bias,
                                        int64_t qmin, int64_t qmax, double, double floor) {
  return at::linear(x, quantized_weight(weight, scale, zero_point, qmin, qmax, floor), bias);
}

}  // namespace

TORCH_LIBRARY(detq_fq, m) {
  m.def("per_tensor_fwd(Tensor x, float s, float lo, float hi, bool need_state) -> Tensor[]");
  m.def("fq_per_tensor(Tensor x, Tensor scale, Tensor zero_point, int qmin, int qmax, float grad_factor, float floor) -> Tensor");
  m.def("fq_per_channel(Tensor x, Tensor scale, Tensor zero_point, int qmin, int qmax, int axis, float grad_factor, float floor) -> Tensor");
  m.def("per_tensor_tangents(Tensor x, float s, float lo, float hi, bool need_zero) -> Tensor[]");
  m.def("per_tensor_fwd_out(Tensor x, Tensor(a!) out, float s, float lo, float hi) -> ()");
  m.def("per_tensor_codes_nhwc(Tensor x, float s, float lo, float hi) -> Tensor[]");
  m.def("channels_last_to_contiguous(Tensor x) -> Tensor");
  m.def("weight_codes(Tensor w, Tensor scale) -> Tensor[]");
  m.def("per_tensor_bwd(Tensor grad, Tensor state, float s, float lo, float hi, float grad_factor, bool need_x) -> Tensor[]");
  m.def("per_channel_fwd(Tensor x, Tensor scale, Tensor lo, Tensor hi, int axis, bool need_state) -> Tensor[]");
  m.def("per_channel_q_fwd(Tensor x, Tensor scale, Tensor zero_point, int qmin, int qmax, int axis, float floor, bool need_state) -> Tensor[]");
  m.def("per_channel_bwd(Tensor grad, Tensor state, Tensor scale, Tensor lo, Tensor hi, int axis, float grad_factor, bool need_x) -> Tensor[]");
  m.def("per_channel_q_bwd(Tensor grad, Tensor x, Tensor scale, Tensor zero_point, int qmin, int qmax, int axis, float grad_factor, float floor, bool need_x) -> Tensor[]");
  m.def("conv2d_recomputed_weight(Tensor x, Tensor weight, Tensor scale, Tensor zero_point, Tensor? bias, int qmin, int qmax, float grad_factor, float floor, int[] stride, int[] padding, int[] dilation, int groups, Tensor? kept=None, float[] input_bounds=[]) -> Tensor");
  m.def("linear_recomputed_weight(Tensor x, Tensor weight, Tensor scale, Tensor zero_point, Tensor? bias, int qmin, int qmax, float grad_factor, float floor) -> Tensor");
  m.def("backward_count() -> int", &backward_count);
}

TORCH_LIBRARY_IMPL(detq_fq, CPU, m) {
  m.impl("per_tensor_fwd", &per_tensor_fwd);
  m.impl("per_tensor_fwd_out", &per_tensor_fwd_out);
  m.impl("per_tensor_tangents", &per_tensor_tangents);
  m.impl("per_tensor_codes_nhwc", &per_tensor_codes_nhwc);
  m.impl("channels_last_to_contiguous", &channels_last_to_contiguous);
  m.impl("weight_codes", &weight_codes);
  m.impl("per_tensor_bwd", &per_tensor_bwd);
  m.impl("per_channel_fwd", &per_channel_fwd);
  m.impl("per_channel_bwd", [](const at::Tensor& grad, const at::Tensor& st, const at::Tensor& scale, const at::Tensor& lo,
                               const at::Tensor& hi, int64_t axis, double grad_factor, bool need_x) {
    return per_channel_bwd(grad, st, scale, lo, hi, axis, grad_factor, need_x);
  });
  m.impl("per_channel_q_fwd", &per_channel_q_fwd);
  m.impl("per_channel_q_bwd", &per_channel_q_bwd);
  m.impl("fq_per_tensor", &fq_per_tensor_cpu);
  m.impl("fq_per_channel", &fq_per_channel_cpu);
  m.impl("conv2d_recomputed_weight", &conv2d_recomputed_weight_cpu);
  m.impl("linear_recomputed_weight", &linear_recomputed_weight_cpu);
}

// Registered for the Autograd key: these record their own graph node (PerTensorFQ / PerChannelFQ above).
TORCH_LIBRARY_IMPL(detq_fq, Autograd, m) {
  m.impl("fq_per_tensor", &fq_per_tensor_autograd);
  m.impl("fq_per_channel", &fq_per_channel_autograd);
  m.impl("conv2d_recomputed_weight", &conv2d_recomputed_weight_autograd);
  m.impl("linear_recomputed_weight", &linear_recomputed_weight_autograd);
}
