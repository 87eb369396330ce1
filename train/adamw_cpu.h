// The AdamW update (Loshchilov & Hutter 2019, decoupled weight decay) as one pass over float32 CPU buffers: each
// element of p, g, m, v is read once and p, m, v written once, where the ATen-op composition makes seven passes and
// allocates a temporary as large as the parameters. Per element:
//   p *= decay                                  (decay = 1 - lr * weight_decay, 1 for the no-decay group)
//   m  = m + (1 - beta1) (g - m)                (torch.lerp, as torch.optim.AdamW)
//   v  = beta2 v + (1 - beta2) g^2
//   p += step_size * m / (sqrt(v / bc2) + eps)  (step_size = -lr / bc1; bc1, bc2 = 1 - beta^t bias corrections)
#pragma once

#include <cstdint>

namespace dsopen::train {

struct AdamWScalars {
  float decay, beta1, beta2, bc2, eps, step_size;
};

// Threads over blocks of elements; compiled for AVX-512, AVX2 and the baseline, chosen when the library loads.
void adamw_update_cpu(float* p, const float* g, float* m, float* v, int64_t n, const AdamWScalars& s);

}  // namespace dsopen::train
