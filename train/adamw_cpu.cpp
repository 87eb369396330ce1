#include "train/adamw_cpu.h"

#include <ATen/Parallel.h>

#include <cmath>

namespace dsopen::train {

namespace detail {

__attribute__((target_clones("avx512f", "avx2", "default")))
void adamw_block(float* p, const float* g, float* m, float* v, int64_t n, float decay, float beta1, float beta2,
                 float bc2, float eps, float step_size) {
  const float w1 = 1.0f - beta1, w2 = 1.0f - beta2;
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i];
    const float mi = m[i] + w1 * (gi - m[i]);
    const float vi = v[i] * beta2 + w2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * decay + step_size * (mi / (std::sqrt(vi / bc2) + eps));
  }
}

}  // namespace detail

void adamw_update_cpu(float* p, const float* g, float* m, float* v, int64_t n, const AdamWScalars& s) {
  at::parallel_for(0, n, 1 << 15, [&](int64_t begin, int64_t end) {
    detail::adamw_block(p + begin, g + begin, m + begin, v + begin, end - begin, s.decay, s.beta1, s.beta2, s.bc2,
                        s.eps, s.step_size);
  });
}

}  // namespace dsopen::train
