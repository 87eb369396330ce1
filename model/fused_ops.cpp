#include "model/fused_ops.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "model/fused_cpu.h"
#include "utils/compat.h"
#include "utils/errors.h"

#ifdef DSOPEN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "model/fused_cuda.h"
#endif

namespace dsopen::model::fused {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

namespace {

// DSOPEN_FUSED_OPS: unset, empty, 1/true/on/yes -> on; 0/false/off/no -> off; anything else is refused (a typo
// must not silently leave the kernels on).
bool switch_from_environment() {
  const char* v = std::getenv("DSOPEN_FUSED_OPS");
  if (!v || !*v) return true;
  for (const char* on : {"1", "true", "on", "yes"})
    if (std::strcmp(v, on) == 0) return true;
  for (const char* off : {"0", "false", "off", "no"})
    if (std::strcmp(v, off) == 0) return false;
  throw usage_error("DSOPEN_FUSED_OPS", std::string("'") + v + "' is not 0 or 1", "unset it, or set 0 (unfused) or 1");
}

std::atomic<bool>& switch_state() {
  static std::atomic<bool> on{switch_from_environment()};
  return on;
}

kernels::DType dtype_of(const Tensor& t) {
  return t.scalar_type() == torch::kBFloat16 ? kernels::DType::kBF16 : kernels::DType::kF32;
}

#ifdef DSOPEN_WITH_CUDA
constexpr bool kCudaKernels = true;
void* stream_of(const Tensor& t) { return at::cuda::getCurrentCUDAStream(t.device().index()).stream(); }
void check_launch() {
  const char* e = kernels::cuda::last_error();
  TORCH_CHECK(*e == 0, "fused CUDA kernel failed: ", e);
}
#define DSOPEN_ON_DEVICE(t) c10::cuda::CUDAGuard device_guard_((t).device())
#else
constexpr bool kCudaKernels = false;
#endif

// [N, D] with unit column stride and one row stride: a view when the layout allows (column slices included),
// else a contiguous copy.
Tensor rows_of(const Tensor& x) {
  auto r = x.reshape({-1, x.size(-1)});
  return r.stride(1) == 1 ? r : r.contiguous();
}

// ---- RMSNorm --------------------------------------------------------------------------------------------------

struct RMSNormFunction : public torch::autograd::Function<RMSNormFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, double eps, int64_t out_dtype) {
    const auto rows = rows_of(x);
    const int64_t N = rows.size(0), D = rows.size(1);
    const auto w = weight.contiguous();
    auto y = torch::empty(x.sizes(), x.options().dtype(static_cast<c10::ScalarType>(out_dtype)));
    ctx->saved_data["out_dtype"] = out_dtype;
    auto rstd = torch::empty({N}, x.options().dtype(torch::kFloat32));
    const bool round_h = x.scalar_type() == torch::kBFloat16;
    if (x.is_cuda()) {
#ifdef DSOPEN_WITH_CUDA
      DSOPEN_ON_DEVICE(x);
      kernels::cuda::rmsnorm_forward(rows.data_ptr(), dtype_of(x), rows.stride(0), w.data_ptr(), dtype_of(w),
                                     y.data_ptr(), dtype_of(y), rstd.data_ptr<float>(), N, D, static_cast<float>(eps),
                                     round_h, stream_of(x));
      check_launch();
#endif
    } else {
      kernels::rmsnorm_forward(rows.data_ptr(), dtype_of(x), rows.stride(0), w.data_ptr(), dtype_of(w), y.data_ptr(),
                               dtype_of(y), rstd.data_ptr<float>(), N, D, static_cast<float>(eps), round_h);
    }
    ctx->save_for_backward({x, w, rstd});
    return y;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &w = saved[1], &rstd = saved[2];
    const auto rows = rows_of(x);
    const int64_t N = rows.size(0), D = rows.size(1);
    const auto out_dtype = static_cast<c10::ScalarType>(ctx->saved_data["out_dtype"].toInt());
    const auto dy = grads[0].to(out_dtype).contiguous();
    Tensor dx, dw;
    if (ctx->needs_input_grad(0)) dx = torch::empty(x.sizes(), x.options().memory_format(c10::MemoryFormat::Contiguous));
    if (ctx->needs_input_grad(1)) dw = torch::empty({D}, w.options().dtype(torch::kFloat32));
    void* dx_ptr = dx.defined() ? dx.data_ptr() : nullptr;
    float* dw_ptr = dw.defined() ? dw.data_ptr<float>() : nullptr;
    const bool round_h = x.scalar_type() == torch::kBFloat16;
    if (x.is_cuda()) {
#ifdef DSOPEN_WITH_CUDA
      DSOPEN_ON_DEVICE(x);
      Tensor partial;
      if (dw_ptr) partial = torch::empty({kernels::cuda::rmsnorm_dw_splits(N), D}, dw.options());
      kernels::cuda::rmsnorm_backward(dy.data_ptr(), dtype_of(dy), rows.data_ptr(), dtype_of(x), rows.stride(0),
                                      w.data_ptr(), dtype_of(w), rstd.data_ptr<float>(), dx_ptr, dw_ptr,
                                      dw_ptr ? partial.data_ptr<float>() : nullptr, N, D, round_h, stream_of(x));
      check_launch();
#endif
    } else {
      kernels::rmsnorm_backward(dy.data_ptr(), dtype_of(dy), rows.data_ptr(), dtype_of(x), rows.stride(0), w.data_ptr(),
                                dtype_of(w), rstd.data_ptr<float>(), dx_ptr, dw_ptr, N, D, round_h);
    }
    return {dx, dw.defined() ? dw.to(w.scalar_type()) : dw, Tensor(), Tensor()};
  }
};

// ---- SwiGLU ---------------------------------------------------------------------------------------------------

struct SwiGLUFunction : public torch::autograd::Function<SwiGLUFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& gate, const Tensor& up) {
    const auto g = rows_of(gate), u = rows_of(up);
    auto y = torch::empty(gate.sizes(), gate.options().memory_format(c10::MemoryFormat::Contiguous));
    if (gate.is_cuda()) {
#ifdef DSOPEN_WITH_CUDA
      DSOPEN_ON_DEVICE(gate);
      kernels::cuda::swiglu_forward(g.data_ptr(), g.stride(0), u.data_ptr(), u.stride(0), dtype_of(gate), y.data_ptr(),
                                    g.size(0), g.size(1), stream_of(gate));
      check_launch();
#endif
    } else {
      kernels::swiglu_forward(g.data_ptr(), g.stride(0), u.data_ptr(), u.stride(0), dtype_of(gate), y.data_ptr(),
                              g.size(0), g.size(1));
    }
    ctx->save_for_backward({gate, up});
    return y;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto g = rows_of(saved[0]), u = rows_of(saved[1]);
    const auto dy = grads[0].to(saved[0].scalar_type()).contiguous();
    auto dg = torch::empty(saved[0].sizes(), saved[0].options().memory_format(c10::MemoryFormat::Contiguous));
    auto du = torch::empty_like(dg);
    if (dg.is_cuda()) {
#ifdef DSOPEN_WITH_CUDA
      DSOPEN_ON_DEVICE(dg);
      kernels::cuda::swiglu_backward(dy.data_ptr(), g.data_ptr(), g.stride(0), u.data_ptr(), u.stride(0), dtype_of(dg),
                                     dg.data_ptr(), du.data_ptr(), g.size(0), g.size(1), stream_of(dg));
      check_launch();
#endif
    } else {
      kernels::swiglu_backward(dy.data_ptr(), g.data_ptr(), g.stride(0), u.data_ptr(), u.stride(0), dtype_of(dg),
                               dg.data_ptr(), du.data_ptr(), g.size(0), g.size(1));
    }
    return {dg, du};
  }
};

// ---- Rotary embedding -----------------------------------------------------------------------------------------

void run_rope(const Tensor& x, const Tensor& y, const Tensor& cos, const Tensor& sin, bool interleaved,
              int64_t rope_dim, bool inverse) {
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3);
  const int64_t C = cos.dim() == 2 ? T : B * T;
  if (x.is_cuda()) {
#ifdef DSOPEN_WITH_CUDA
    DSOPEN_ON_DEVICE(x);
    kernels::cuda::rope(x.data_ptr(), y.data_ptr(), dtype_of(x), B * T, H, D, cos.data_ptr<float>(),
                        sin.data_ptr<float>(), C, rope_dim, interleaved, inverse, stream_of(x));
    check_launch();
#endif
  } else {
    kernels::rope(x.data_ptr(), y.data_ptr(), dtype_of(x), B * T, H, D, cos.data_ptr<float>(), sin.data_ptr<float>(),
                  C, rope_dim, interleaved, inverse);
  }
}

struct RopeFunction : public torch::autograd::Function<RopeFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& cos, const Tensor& sin, bool interleaved,
                        int64_t rope_dim) {
    const auto xc = x.contiguous(), c = cos.contiguous(), s = sin.contiguous();
    auto y = torch::empty_like(xc);
    run_rope(xc, y, c, s, interleaved, rope_dim, false);
    ctx->save_for_backward({c, s});
    ctx->saved_data["interleaved"] = interleaved;
    ctx->saved_data["rope_dim"] = rope_dim;
    return y;
  }

  // The rotation is orthogonal: the gradient is the output gradient rotated back.
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto dy = grads[0].contiguous();
    auto dx = torch::empty_like(dy);
    run_rope(dy, dx, saved[0], saved[1], ctx->saved_data["interleaved"].toBool(), ctx->saved_data["rope_dim"].toInt(),
             true);
    return {dx, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// ---- LM head + cross-entropy ----------------------------------------------------------------------------------

// Rows of float32 logits per chunk: ~32 MB, at least 64 rows (a GEMM needs some height).
int64_t chunk_rows(int64_t N, int64_t V) { return std::min(N, std::max<int64_t>(64, (int64_t{1} << 23) / V)); }

// The softmax statistics of one chunk (logits [c, V] float32, overwritten by the gradient when `grad`); the CPU
// kernel, or the same with ATen ops on other devices.
void softmax_rows(Tensor& logits, const Tensor& targets, Tensor& lse, Tensor& ce, bool grad, Tensor& grad_z) {
  if (logits.is_cpu()) {
    kernels::softmax_cross_entropy(logits.data_ptr<float>(), targets.data_ptr<int64_t>(), lse.data_ptr<float>(),
                                   ce.data_ptr<float>(), logits.size(0), logits.size(1), grad,
                                   grad_z.defined() ? grad_z.data_ptr<float>() : nullptr);
    return;
  }
  const auto valid = targets.ne(-100);
  const auto safe = targets.clamp_min(0).unsqueeze(1);
  lse.copy_(logits.logsumexp(1));
  ce.copy_((lse - logits.gather(1, safe).squeeze(1)) * valid);
  if (!grad) return;
  logits.sub_(lse.unsqueeze(1)).exp_();  // p
  const auto keep = valid.unsqueeze(1).to(logits.scalar_type());
  if (grad_z.defined()) grad_z.copy_(logits * (2.0 * lse).unsqueeze(1) * keep);
  logits.scatter_add_(1, safe, -torch::ones_like(safe, logits.options())).mul_(keep);
}

struct LinearCrossEntropyFunction : public torch::autograd::Function<LinearCrossEntropyFunction> {
  // compute: the GEMMs' dtype (autocast's, else hidden's); want_grad: autograd records this call.
  static tensor_list forward(AutogradContext* ctx, const Tensor& hidden, const Tensor& weight, const Tensor& targets,
                             bool z_loss, int64_t compute, bool want_grad) {
    compat::AutocastScope no_autocast(hidden.device().type(), false);  // the dtypes below are explicit
    const auto dtype = static_cast<c10::ScalarType>(compute);
    const int64_t N = hidden.size(0), V = weight.size(0);
    const auto h = hidden.to(dtype), w = weight.to(dtype);
    const auto f32 = hidden.options().dtype(torch::kFloat32);
    auto lse = torch::empty({N}, f32), ce = torch::empty({N}, f32);
    const bool grad_h = want_grad && hidden.requires_grad(), grad_w = want_grad && weight.requires_grad();
    const bool grad = grad_h || grad_w;
    Tensor dh, dw, dh_z, dw_z;
    if (grad_h) dh = torch::empty({N, h.size(1)}, h.options());
    if (grad_w) dw = torch::empty(weight.sizes(), f32);  // the first chunk writes it, the others add
    if (grad_h && z_loss) dh_z = torch::empty_like(dh);
    if (grad_w && z_loss) dw_z = torch::empty_like(dw);
    if (N == 0) {  // no rows, no chunk to write the weight gradient: it is zero
      if (dw.defined()) dw.zero_();
      if (dw_z.defined()) dw_z.zero_();
    }
    const int64_t rows = chunk_rows(N, V);
    for (int64_t start = 0; start < N; start += rows) {
      const int64_t n = std::min(rows, N - start);
      const auto hc = h.narrow(0, start, n);
      auto logits = torch::mm(hc, w.t()).to(torch::kFloat32);  // [n, V]
      auto lse_c = lse.narrow(0, start, n), ce_c = ce.narrow(0, start, n);
      Tensor gz = grad && z_loss ? torch::empty_like(logits) : Tensor();
      softmax_rows(logits, targets.narrow(0, start, n), lse_c, ce_c, grad, gz);
      if (!grad) continue;
      auto accumulate = [&](const Tensor& g32, Tensor& dhid, Tensor& dwt) {
        const auto g = g32.to(dtype);
        if (dhid.defined()) {
          auto rows_out = dhid.narrow(0, start, n);
          torch::mm_out(rows_out, g, w);
        }
        if (!dwt.defined()) return;
        if (dtype == torch::kFloat32 && start == 0) torch::mm_out(dwt, g.t(), hc);
        else if (dtype == torch::kFloat32) dwt.addmm_(g.t(), hc);  // C += A B in the GEMM: no temporary
        else if (start == 0) dwt.copy_(torch::mm(g.t(), hc));
        else dwt.add_(torch::mm(g.t(), hc));
      };
      accumulate(logits, dh, dw);
      if (z_loss) accumulate(gz, dh_z, dw_z);
    }
    ctx->save_for_backward({dh, dw, dh_z, dw_z});
    ctx->saved_data["hidden_dtype"] = static_cast<int64_t>(hidden.scalar_type());
    ctx->saved_data["weight_dtype"] = static_cast<int64_t>(weight.scalar_type());
    const auto valid = targets.ne(-100).to(torch::kFloat32);
    const auto ce_sum = ce.sum();
    const auto z_sum = z_loss ? (lse.square() * valid).sum() : torch::zeros({}, f32);
    return {ce_sum, z_sum};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &dh = saved[0], &dw = saved[1], &dh_z = saved[2], &dw_z = saved[3];
    const auto hidden_dtype = static_cast<c10::ScalarType>(ctx->saved_data["hidden_dtype"].toInt());
    const auto weight_dtype = static_cast<c10::ScalarType>(ctx->saved_data["weight_dtype"].toInt());
    auto combine = [&](const Tensor& a, const Tensor& b, c10::ScalarType out) -> Tensor {
      if (!a.defined()) return Tensor();
      auto g = grads[0].defined() ? a.to(torch::kFloat32) * grads[0] : torch::zeros(a.sizes(), a.options().dtype(torch::kFloat32));
      if (b.defined() && grads[1].defined()) g = g + b.to(torch::kFloat32) * grads[1];
      return g.to(out);
    };
    return {combine(dh, dh_z, hidden_dtype), combine(dw, dw_z, weight_dtype), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

}  // namespace

bool enabled() { return switch_state().load(); }
void set_enabled(bool on) { switch_state().store(on); }

Scope::Scope(bool on) : previous_(enabled()) { set_enabled(on); }
Scope::~Scope() { set_enabled(previous_); }

bool applies(const Tensor& x) {
  return enabled() && x.defined() && (x.is_cpu() || (kCudaKernels && x.is_cuda())) &&
         (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16) && x.numel() > 0;
}

Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) {
  TORCH_CHECK(applies(x) && applies(weight) && weight.device() == x.device() && weight.dim() == 1 &&
                  weight.size(0) == x.size(-1),
              "fused::rms_norm: unsupported input");
  // Under bf16 autocast the output is stored in bf16: every consumer (a projection, the fused head) would cast it
  // to bf16 first, so the values they see are the same and no float32 copy is written or kept.
  const auto device = x.device().type();
  auto out = c10::promoteTypes(x.scalar_type(), weight.scalar_type());
  if (compat::autocast_enabled(device) && at::autocast::get_autocast_dtype(device) == torch::kBFloat16) out = torch::kBFloat16;
  return RMSNormFunction::apply(x, weight, eps, static_cast<int64_t>(out));
}

Tensor swiglu(const Tensor& gate, const Tensor& up) {
  TORCH_CHECK(applies(gate) && gate.scalar_type() == up.scalar_type() && gate.sizes() == up.sizes() &&
                  gate.device() == up.device(),
              "fused::swiglu: unsupported input");
  return SwiGLUFunction::apply(gate, up);
}

bool rope_applies(const Tensor& x, const Tensor& cos, int64_t rope_dim) {
  if (!applies(x) || x.dim() != 4 || cos.device() != x.device() || cos.scalar_type() != torch::kFloat32) return false;
  if (rope_dim % 2 != 0 || rope_dim > x.size(3) || cos.size(-1) * 2 != rope_dim) return false;
  if (cos.dim() == 2) return cos.size(0) == x.size(1);
  return cos.dim() == 3 && cos.size(0) == x.size(0) && cos.size(1) == x.size(1);
}

Tensor rope(const Tensor& x, const Tensor& cos, const Tensor& sin, bool interleaved, int64_t rope_dim) {
  TORCH_CHECK(rope_applies(x, cos, rope_dim) && sin.sizes() == cos.sizes(), "fused::rope: unsupported input");
  return RopeFunction::apply(x, cos, sin, interleaved, rope_dim);
}

CrossEntropySums linear_cross_entropy(const Tensor& hidden, const Tensor& weight, const Tensor& targets, bool z_loss) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1) && targets.dim() == 1 &&
                  targets.size(0) == hidden.size(0),
              "linear_cross_entropy: hidden [N, H], weight [V, H] and targets [N] expected");
  const auto t = targets.to(torch::kLong).contiguous();
  if (t.is_cpu()) {  // the CPU kernel indexes rows by target; elsewhere gather checks
    const auto bad = (t.lt(0) & t.ne(-100)) | t.ge(weight.size(0));
    TORCH_CHECK(!bad.any().item<bool>(), "target ", t.masked_select(bad)[0].item<int64_t>(),
                " is outside the vocabulary [0, ", weight.size(0), ") (use -100 for no target)");
  }
  const auto device = hidden.device().type();
  const auto compute = compat::autocast_enabled(device) ? at::autocast::get_autocast_dtype(device) : hidden.scalar_type();
  const bool record = torch::GradMode::is_enabled() && (hidden.requires_grad() || weight.requires_grad());
  auto out = LinearCrossEntropyFunction::apply(hidden, weight, t, z_loss, static_cast<int64_t>(compute), record);
  return {out[0], z_loss ? out[1] : Tensor()};
}

}  // namespace dsopen::model::fused
