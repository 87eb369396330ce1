// Quantized linear layers on LibTorch's weight-only CPU kernels (see quantized_linear.h).
#include "inference/quantized_linear.h"

#include <limits>

#include "model/gemv.h"
#include "model/gemv_int4.h"

#include "utils/compat.h"

namespace dsopen::inference {

namespace {

// [..., in] -> [rows, in] in bf16, contiguous and 64-byte aligned: the kernels use aligned vector loads.
torch::Tensor kernel_input(const torch::Tensor& x) {
  auto x2 = x.reshape({-1, x.size(-1)}).to(torch::kBFloat16).contiguous();
  if (reinterpret_cast<uintptr_t>(x2.data_ptr()) % 64 != 0) x2 = x2.clone();
  return x2;
}

// A float32 [out, in] buffer for a weight dequantized for one call, reused by every layer of this thread. A fresh
// allocation per call costs more than the dequantization: large blocks come from mmap and are page-faulted in
// each time. The buffer holds the largest layer's weight in float32, once.
torch::Tensor dequantize_buffer(int64_t out, int64_t in) {
  thread_local torch::Tensor buffer;
  if (!buffer.defined() || buffer.numel() < out * in) buffer = torch::empty({out * in}, torch::kFloat32);
  return buffer.slice(0, 0, out * in).view({out, in});
}

std::vector<int64_t> output_sizes(const torch::Tensor& x, int64_t out) {
  auto sizes = x.sizes().vec();
  sizes.back() = out;
  return sizes;
}

// The many-rows path both layers share: x [..., in] times the weight dequantized for this call, in float32.
template <typename Layer>
torch::Tensor dequantized_linear(const Layer& layer, const torch::Tensor& x, int64_t out, int64_t in) {
  return torch::nn::functional::linear(x.reshape({-1, in}).to(torch::kFloat32),
                                       layer.dequantize_into(dequantize_buffer(out, in)))
      .to(x.scalar_type())
      .view(output_sizes(x, out));
}

}  // namespace

// ---- int4 -----------------------------------------------------------------------------------------------------

bool Int4Linear::supports(const QuantizedWeight& q) {
  const int64_t g = q.group_size;
  return compat::kHasInt4CpuKernel && q.bits == 4 && (g == 32 || g == 64 || g == 128 || g == 256) &&
         q.in_features % g == 0 && !q.g_idx.defined();
}

Int4Linear::Int4Linear(QuantizedWeight qw, int64_t max_rows) : q(std::move(qw)), max_kernel_rows(max_rows) {
  TORCH_CHECK(supports(q), "Int4Linear: int4 with group size 32, 64, 128 or 256 only");
  // An own copy of the codes: tensors read from a file view its mapping, which would then stay resident. Scales
  // and zeros live on only in the derived tensors below.
  q.qweight = q.qweight.clone();
  auto s = q.scales.to(torch::kFloat32, /*non_blocking=*/false, /*copy=*/true);  // [out, in / g]
  auto z = q.zeros.to(torch::kFloat32, /*non_blocking=*/false, /*copy=*/true);
  q.scales = q.zeros = torch::Tensor();
  scales = s.unsqueeze(2);
  zero_scales = (z * s).unsqueeze(2);
  // Our kernel's layout; files of other tools may store fractional zero points, which only LibTorch's kernel takes.
  if (model::gemv_int4_supported() && z.eq(z.round()).all().item<bool>() && z.min().item<float>() >= 0 &&
      z.max().item<float>() <= 15) {
    kernel_pack = model::pack_int4(q.qweight, s, z, q.group_size);
    // It beats dequantize + float32 GEMM at any row count (2 threads, EPYC box, [768 -> 2048]: 600 against 96, 125
    // and 168 GOP/s at 64, 128 and 512 rows), so prompts of any length take it too (max_kernel_rows 0 stays 0:
    // QuantizedLayers::FloatMath's exact float path).
    if (max_kernel_rows > 0) max_kernel_rows = std::numeric_limits<int64_t>::max();
  }
  if (!kernel_pack.codes.defined() || !model::gemv_enabled()) {
    packed = compat::int4_pack_for_cpu(unpack_int4(q.qweight).to(torch::kInt32), /*innerKTiles=*/1);
    scale_zeros = torch::stack({s.t(), ((8.0 - z) * s).t()}, -1).to(torch::kBFloat16).contiguous();
  }
}

// int4 products take model/gemv_int4.h's kernel: integer products of int8-rounded
// activations in register tiles over the repacked codes. A row's result does not depend on the rows beside it, so
// int4 serving batches decode the same alone or together.
bool Int4Linear::rows(const float* x, int64_t n, float* y) const {
  if (!kernel_pack.codes.defined() || n > max_kernel_rows || !model::gemv_enabled()) return false;
  model::gemv_int4_rows(x, n, kernel_pack, y);
  return true;
}

torch::Tensor Int4Linear::dequantized() const { return dequantize_into(torch::empty({q.qweight.size(0), q.in_features})); }

torch::Tensor Int4Linear::dequantize_into(torch::Tensor w) const {
  // The uint8 codes times the float scales (one pass, promoting), minus zero * scale in place: per call this runs
  // on every prompt, so it avoids dequantize()'s float copy of the codes and separate subtract.
  const int64_t out = q.qweight.size(0), in = q.in_features;
  auto codes = torch::stack({q.qweight.bitwise_and(0x0F), q.qweight.bitwise_right_shift(4)}, 2);  // [out, in/2, 2]
  auto w3 = w.view({out, in / q.group_size, q.group_size});
  torch::mul_out(w3, codes.view({out, in / q.group_size, q.group_size}), scales).sub_(zero_scales);
  return w;
}

torch::Tensor Int4Linear::operator()(const torch::Tensor& x) const {
  const int64_t out = q.qweight.size(0), n = x.numel() / x.size(-1);
  if (n > max_kernel_rows) return dequantized_linear(*this, x, out, q.in_features);
  if (kernel_pack.codes.defined() && model::gemv_enabled()) {
    const auto xf = x.reshape({n, q.in_features}).to(torch::kFloat32).contiguous();
    auto y = torch::empty({n, out}, torch::kFloat32);
    rows(xf.data_ptr<float>(), n, y.data_ptr<float>());
    return y.to(x.scalar_type()).view(output_sizes(x, out));
  }
  return compat::int4_mm_for_cpu(kernel_input(x), packed, q.group_size, scale_zeros)
      .to(x.scalar_type())
      .view(output_sizes(x, out));
}

// ---- int8 -----------------------------------------------------------------------------------------------------

namespace {
// Whether a prompt's rows take gemv_int8's tiles (AVX-512 and AVX2; the portable loop runs one dot per row and
// output, and LibTorch's kernel wins).
bool int8_prompt_tiles() {
  static const bool tiles = std::string(model::gemv_isa()) != "portable";
  return tiles;
}
}  // namespace

bool Int8Linear::supports(const QuantizedWeight& q) {
  return q.bits == 8 && q.group_size == q.in_features && q.in_features % 16 == 0 && !q.g_idx.defined();
}

Int8Linear::Int8Linear(const QuantizedWeight& q, int64_t max_rows) : max_kernel_rows(max_rows) {
  TORCH_CHECK(supports(q), "Int8Linear: int8 with one group per row and an input dimension divisible by 16 only");
  // q - 128 in two's complement is q with its top bit flipped: one pass into the final buffer (and a copy, not a
  // view of the file), no wider temporary.
  codes = q.qweight.bitwise_xor(0x80).view(torch::kInt8);
  scale = q.scales.to(torch::kFloat32).flatten().contiguous();                  // [out]
  offset = (128.0 - q.zeros.to(torch::kFloat32).flatten()) * scale;
  unit_scales = torch::ones({codes.size(0)}, torch::kBFloat16);
}

torch::Tensor Int8Linear::dequantized() const { return dequantize_into(torch::empty(codes.sizes())); }

torch::Tensor Int8Linear::dequantize_into(torch::Tensor w) const {
  return torch::mul_out(w, codes, scale.unsqueeze(1)).add_(offset.unsqueeze(1));  // int8 * float promotes
}

torch::Tensor Int8Linear::operator()(const torch::Tensor& x) const {
  auto x2 = x.reshape({-1, x.size(-1)});  // [rows, in]
  if (x2.size(0) > max_kernel_rows) return dequantized_linear(*this, x, codes.size(0), codes.size(1));
  // Decode rows, and with AVX-512 a prompt's rows in tiles: float32 sums, no bf16 rounding.
  if ((x2.size(0) <= model::kMaxGemvRows || int8_prompt_tiles()) && model::gemv_enabled())
    return model::gemv_int8(x2, codes, scale, offset).to(x.scalar_type()).view(output_sizes(x, codes.size(0)));
  auto y = at::_weight_int8pack_mm(kernel_input(x2), codes, unit_scales).to(torch::kFloat32);  // [rows, out]
  y.mul_(scale).addr_(x2.to(torch::kFloat32).sum(1), offset);  // + sum(x) (128 - zero) scale, an outer product
  return y.to(x.scalar_type()).view(output_sizes(x, codes.size(0)));
}

// ---- choice ---------------------------------------------------------------------------------------------------

bool has_packed_kernel(const QuantizedWeight& q) { return Int4Linear::supports(q) || Int8Linear::supports(q); }

void attach_packed_kernel(model::LinearImpl& lin, const QuantizedWeight& q, int64_t max_kernel_rows) {
  if (Int4Linear::supports(q)) {
    auto k = std::make_shared<const Int4Linear>(q, max_kernel_rows);
    lin.weight_only = [k](const torch::Tensor& x) { return (*k)(x); };
    lin.weight_only_rows = [k](const float* x, int64_t rows, float* y) { return k->rows(x, rows, y); };
    return;
  }
  if (!Int8Linear::supports(q)) {
    lin.weight_only = packed_kernel(q, max_kernel_rows);
    lin.weight_only_rows = nullptr;
    return;
  }
  auto k = std::make_shared<const Int8Linear>(q, max_kernel_rows);  // one copy of the codes for both forms
  lin.weight_only = [k](const torch::Tensor& x) { return (*k)(x); };
  lin.weight_only_rows = [k](const float* x, int64_t rows, float* y) {
    if (rows > (int8_prompt_tiles() ? k->max_kernel_rows : model::kMaxGemvRows) || !model::gemv_enabled()) return false;
    thread_local std::vector<float> xsum;
    xsum.resize(static_cast<size_t>(rows));
    model::gemv_int8_rows(x, rows, k->codes.size(1), k->codes.data_ptr<int8_t>(), k->scale.data_ptr<float>(),
                          k->offset.data_ptr<float>(), k->codes.size(0), y, xsum.data());
    return true;
  };
}

std::function<torch::Tensor(const torch::Tensor&)> packed_kernel(const QuantizedWeight& q, int64_t max_kernel_rows) {
  if (Int4Linear::supports(q)) return Int4Linear(q, max_kernel_rows);
  TORCH_CHECK(Int8Linear::supports(q), "packed_kernel: no kernel takes this quantized weight");
  return Int8Linear(q, max_kernel_rows);
}

}  // namespace dsopen::inference
