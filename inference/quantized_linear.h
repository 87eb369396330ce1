// Linear layers that keep their quantized codes in memory and multiply through LibTorch's weight-only CPU kernels,
// so an int4 or int8 model decodes reading 0.5 or 1 byte per weight instead of the 4 of a dequantized float copy.
// Decoding is bound by weight traffic, so this is also where the speed comes from (docs/BENCHMARKS.md).
//
// int4 (on CPUs with AVX2 + FMA or AVX-512) multiplies through model/gemv_int4.h's integer kernel at every row
// count: it beats dequantize + float32 GEMM at 1 row and at 512 alike. int8, and int4 elsewhere, use LibTorch's
// weight-only kernels (activations in bf16, fp32 accumulation) or model/gemv.h's int8 tiles for up to 64 rows; for
// more rows (a long prompt) each layer dequantizes its weight for the call into a reused buffer and multiplies in
// float32, which is faster there. Measured on AVX-512 with 2 threads against a float32 matmul: LibTorch's int4
// kernel is 1.7x faster at 1-8 rows and 2.2x slower at 512; the int8 kernel 1.5-2x faster at 1-8 rows, even with
// dequantize + float32 at 64, 1.5x slower at 512.
#pragma once

#include <torch/torch.h>

#include <functional>

#include "inference/quantized_format.h"
#include "model/gemv_int4.h"
#include "model/linear.h"

namespace dsopen::inference {

// Rows up to which the kernels beat dequantize + float32 matmul (measurements above).
inline constexpr int64_t kMaxKernelRows = 64;

// int4, group size 32, 64, 128 or 256 (LibTorch >= 2.6: see compat.h). Our kernel rounds activations to int8 per
// block of 32 (relative output error ~1e-3 against the dequantized float weight); LibTorch's takes activations,
// scales and zeros in bf16 (~3e-3).
struct Int4Linear {
  QuantizedWeight q;                  // the file's codes, for the dequantized path (scales and zeros: below)
  torch::Tensor scales, zero_scales;  // float32 [out, in / g, 1]: W = code * scale - zero * scale
  // model/gemv_int4.h's layout (CPUs with AVX2 + FMA or AVX512-BW, whole zero points; the codes then exist twice,
  // once per layout). Where it is undefined, or with DSOPEN_GEMV=0, LibTorch's kernel takes `packed` instead.
  model::Int4Pack kernel_pack;
  torch::Tensor packed;       // LibTorch's layout of the same codes (only where kernel_pack cannot run)
  torch::Tensor scale_zeros;  // bf16 [in / g, out, 2]: W = (code - 8) * scale + zero, zero = (8 - file zero) * scale
  // More rows take the dequantized path; 0: always. Unlimited where kernel_pack is defined (unless 0).
  int64_t max_kernel_rows = kMaxKernelRows;
  static bool supports(const QuantizedWeight& q);
  explicit Int4Linear(QuantizedWeight q, int64_t max_kernel_rows = kMaxKernelRows);
  torch::Tensor operator()(const torch::Tensor& x) const;  // [..., in] -> [..., out], the dtype of x
  // The same on raw float32 rows through gemv_int4_rows; false where that kernel is not available here (or for
  // more than max_kernel_rows rows).
  bool rows(const float* x, int64_t rows, float* y) const;
  torch::Tensor dequantized() const;                        // float32 [out, in], two passes over the weight
  torch::Tensor dequantize_into(torch::Tensor w) const;     // the same written into w (float32 [out, in])
};

// int8 with one group per row (dsopen-quantize --group-size -1) through _weight_int8pack_mm, which computes
// x_bf16 @ (w_int8 * s)^T for symmetric int8 codes. The file's codes are asymmetric (W = (q - zero) * scale with
// q in 0..255), so the layer stores q - 128 as int8 and adds the rest after the kernel:
//   x W^T = scale * (x @ (q - 128)^T) + (128 - zero) * scale * sum(x)
// The kernel's own scale is 1 (scaling in float32 afterwards keeps the scale exact); its output is bf16, so the
// relative error is ~2e-3. The kernel's vector loads need the input dimension to be a multiple of 16.
struct Int8Linear {
  torch::Tensor codes;          // int8 [out, in]: file code - 128
  torch::Tensor scale, offset;  // float32 [out]: W = codes * scale + offset, offset = (128 - zero) * scale
  torch::Tensor unit_scales;    // bf16 [out] of ones: the kernel's per-row scale
  int64_t max_kernel_rows = kMaxKernelRows;  // more rows take the dequantized path; 0: always
  static bool supports(const QuantizedWeight& q);
  explicit Int8Linear(const QuantizedWeight& q, int64_t max_kernel_rows = kMaxKernelRows);
  torch::Tensor operator()(const torch::Tensor& x) const;  // [..., in] -> [..., out], the dtype of x
  torch::Tensor dequantized() const;                        // float32 [out, in]
  torch::Tensor dequantize_into(torch::Tensor w) const;     // the same written into w (float32 [out, in])
};

// Whether Int4Linear or Int8Linear takes this weight, and the layer function for Linear::weight_only.
bool has_packed_kernel(const QuantizedWeight& q);
std::function<torch::Tensor(const torch::Tensor&)> packed_kernel(const QuantizedWeight& q,
                                                                 int64_t max_kernel_rows = kMaxKernelRows);
// Hands `lin` the kernel of `q` (weight_only and, for int8, the raw weight_only_rows of the CPU decode step);
// the layer's float weight is then unused.
void attach_packed_kernel(model::LinearImpl& lin, const QuantizedWeight& q, int64_t max_kernel_rows = kMaxKernelRows);

}  // namespace dsopen::inference
