// int4 group-wise weight products on the CPU, for decode steps and prompts: y [rows, out] = x [rows, in] . W^T with
// W[o, i] = (code[o, i] - zero[o, g]) * scale[o, g], g = i / group (the GPTQ-style layout of
// inference/quantized_format.h: group 32, 64, 128 or 256, whole zero points 0..15).
//
// As llama.cpp's Q4 x Q8 products do, each activation row is quantized per block of 32 columns to int8
// (d = max|x| / 127, q = round-half-even(x / d)), so the products are integer and exact:
//   y[r, o] = sum_b (sum_{i in b} code[o, i] * q[r, i]) * (scale[o, g(b)] * d[r, b])
//             - sum_g scale[o, g] * zero[o, g] * (sum_{b in g} d[r, b] * sum_{i in b} q[r, i])
// in float32, blocks and then groups in order, one fused multiply-add per term. Against the float product the
// result differs by the rounding of x (relative ~1e-3 of each block's largest value).
//
// The weights are repacked once at load (pack_int4) so that a vector register holds 16 outputs x 4 columns: the
// outputs lie along the vector, each instruction's 4 column products of one output sum in its own lane
// (AVX512-VNNI vpdpbusd: 64 unsigned code x signed activation byte products per instruction, the activation's 4
// bytes broadcast to every lane), and no output needs a horizontal sum. A tile of R activation rows x V blocks of
// 16 outputs keeps R x V integer and R x V float accumulators in registers, unpacking each code byte once for its
// R rows (the llama.cpp repacked Q4_0 x Q8_0 GEMMs work the same way). One thread, weights in cache, [768 -> 2048]
// x 48 rows on the EPYC box: 258 GOP/s against 119 for the former kernel (one output per register, a horizontal
// sum per output).
//
// Every (row, output) runs the same instructions whatever tile it falls in and whatever instruction set runs it
// (the block sums are exact integers; the float operations per lane are the same), so a row's result is the same
// alone or in a batch, and the same with AVX-512 and with AVX2 (tested).
#pragma once

#include <torch/torch.h>

namespace dsopen::model {

// One int4 weight in the kernel's layout. Outputs in blocks of 16 (the last block padded with zero codes and
// scales); each block's codes in steps of 8 input columns, 64 bytes per step, byte 4j + k holding output j's column
// k (low nibble) and column k + 4 (high nibble), k < 4.
struct Int4Pack {
  torch::Tensor codes;                 // uint8 [blocks, in / 8, 64]
  torch::Tensor scales, scaled_zeros;  // float32 [blocks, in / group, 16]: scale, scale * zero
  int64_t in = 0, out = 0, group = 0;
};

// codes uint8 [out, in / 2] as the file keeps them (low nibble = even column), scales and zeros float32
// [out, in / group] (zeros whole numbers in 0..15). Needs in % 32 == 0, group % 32 == 0, in % group == 0.
Int4Pack pack_int4(const torch::Tensor& codes, const torch::Tensor& scales, const torch::Tensor& zeros, int64_t group);

// The instruction set gemv_int4_rows runs with here: "avx512" (AVX512-BW; VNNI where present) or "avx2" (AVX2 +
// F16C + FMA); null where neither is available (callers then take LibTorch's kernels). `isa` asks for a lesser one
// ("avx2"; null: the CPU's best, after DSOPEN_GEMV_ISA, model/gemv.h).
const char* gemv_int4_isa(const char* isa = nullptr);
bool gemv_int4_supported();  // gemv_int4_isa() != null

// x float32 [rows, in] (any number of rows), y float32 [rows, out]; threads over blocks of outputs. `isa` as for
// gemv_int4_isa, plus "avx512bw" (tests: the AVX512-BW kernel on a CPU that has VNNI). Returns the kernel that
// ran: "avx512-vnni", "avx512-bw" or "avx2".
const char* gemv_int4_rows(const float* x, int64_t rows, const Int4Pack& w, float* y, const char* isa = nullptr);

}  // namespace dsopen::model
