// Matrix-vector products for decoding on the CPU: y [rows, out] = x [rows, in] · W[out, in]^T (+ bias) for a few
// rows (decode steps), W float32 or bfloat16, row-major and contiguous as nn.Linear keeps it.
//
// Decoding reads every weight once per token, so its speed is memory bandwidth. A general GEMM at M = 1 leaves
// bandwidth unused (measured: 18 GB/s for LibTorch's matmul against 50 GB/s for llama.cpp's kernels on the same 2
// cores, docs/BENCHMARKS.md). Here each thread streams a contiguous block of weight rows once, dotting each row
// with every activation row while it is in L1, in register tiles of several activation rows x weight rows; the
// instruction set (AVX-512, AVX2 + FMA, or portable C++) is chosen once at run time from the CPU
// (DSOPEN_GEMV_ISA=avx2 or portable: a lesser one, to measure what such a CPU gets; the int4 kernels of
// model/gemv_int4.h follow it). Results differ from a GEMM's only in summation order (relative ~1e-7 in fp32).
#pragma once

#include <torch/torch.h>

namespace dsopen::model {

// Rows up to which gemv is used (more rows: the GEMM's blocking wins).
inline constexpr int64_t kMaxGemvRows = 4;

// False when the environment variable DSOPEN_GEMV=0 (every product through LibTorch's kernels).
bool gemv_enabled();

// Whether gemv takes this product (never with DSOPEN_GEMV=0): CPU, no autograd, x float32 or bfloat16 [..., in] with at most kMaxGemvRows
// rows, W float32 or bfloat16 [out, in] contiguous.
bool gemv_applies(const torch::Tensor& x, const torch::Tensor& W);

// x [..., in], W [out, in], bias [out] (or undefined) -> [..., out] in x's dtype; the sums in float32. `isa`
// (tests): "avx512", "avx2" or "portable" instead of the CPU's best; one the CPU lacks is a logic error.
torch::Tensor gemv(const torch::Tensor& x, const torch::Tensor& W, const torch::Tensor& bias, const char* isa = nullptr);

// Per-channel int8 weights (inference/quantized_linear.h Int8Linear): x [rows, in], codes int8 [out, in] (file
// code - 128), y = scale * (codes . x) + offset * sum(x) with scale, offset float32 [out] -> float32 [rows, out];
// `isa` as for gemv. AVX-512: up to kMaxGemvRows rows (decoding) one dot per row and output; more rows (a prompt)
// in gemv_rows' 4 x 4 tiles, the codes widened in registers once for 4 rows, each row's result independent of the
// others (dense 97M, 64-token prompt: 484 -> 611 tokens/s against LibTorch's _weight_int8pack_mm,
// docs/BENCHMARKS.md). AVX2: gemv_rows' AVX2 tiles for every row count, the codes widened likewise (a row's bits
// the same alone or in a batch). Otherwise a portable loop.
torch::Tensor gemv_int8(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scale,
                        const torch::Tensor& offset, const char* isa = nullptr);

// Raw forms for callers that keep their own buffers (model/decode_step.h), any number of rows, the CPU's best
// instruction set: x float32 [rows, in], W [out, in] float32 (w_bf16 false) or bfloat16 bits, bias float32 [out]
// or null, y float32 [rows, out]. Threads over blocks of 4 output rows (at::parallel_for). With AVX-512 a tile of
// up to 4 activation rows x 4 weight rows keeps its 16 sums in registers, so each load of x or W feeds 4 FMAs, and
// the next block's weights are prefetched while the current block's tiles run (weights streamed from memory); a
// lone row against long weight rows (1.5 KiB and more) reads them one at a time instead, one sequential stream; each
// y[r, o] sums its terms in one fixed order, so a row's result does not depend on the rows beside it (a sequence
// decodes the same alone or in a batch). With AVX2 + FMA (16 registers of 8 floats): up to 4 rows one weight row
// at a time (one sequential stream), more rows in tiles of 1 row x 3 weight rows, each pair summed in four
// accumulators, again one fixed order per row; a prompt's rows past 32 (more than a decode batch) in tiles of 4
// rows x 3 weight rows with one accumulator per pair (a row's bits the same among any prompt rows past 32).
void gemv_rows(const float* x, int64_t rows, int64_t in, const void* W, bool w_bf16, int64_t out, const float* bias,
               float* y);
// gemv_rows without threads and without bias, for callers already inside a parallel region (attention scores over
// a cache: x = queries [rows, in], W = cached keys [out = positions, in]).
void gemv_rows_serial(const float* x, int64_t rows, int64_t in, const void* W, bool w_bf16, int64_t out, float* y);
// y [rows, n] = p [rows, T] . V [T, n] (attention's weighted sum of cached values), V float32 or bfloat16 bits
// with row stride ldv, no threads. Blocks of 4 rows x 64 columns (AVX2: 16) keep their sums in registers and load
// each V row once per block; each y[r, j] sums its T terms in order with one FMA each, whatever the other rows and
// whatever the instruction set (`isa` as for gemv: the same bits on each).
void pv_rows(const float* p, int64_t rows, int64_t T, const void* V, bool v_bf16, int64_t ldv, int64_t n, float* y,
             const char* isa = nullptr);
// gemv_int8's arithmetic on raw buffers; xsum float32 [rows] is scratch.
void gemv_int8_rows(const float* x, int64_t rows, int64_t in, const int8_t* codes, const float* scale,
                    const float* offset, int64_t out, float* y, float* xsum);

// The instruction set gemv runs with on this CPU: "avx512", "avx2" or "portable".
const char* gemv_isa();

}  // namespace dsopen::model
