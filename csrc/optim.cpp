// Fused optimizer steps over one flat buffer: every element is read and written once.
// Semantics follow tmem_kernels.reference (= torch.optim.SGD / torch.optim.AdamW, no momentum,
// no amsgrad, maximize=False); the scalar factors are computed in Python in double precision, the
// way torch computes them, and arrive here as floats.
#include "tmem_native.h"

#include <cmath>

namespace tmem {

void sgd_step(float* __restrict p, const float* __restrict g, std::int64_t n, float lr, float weight_decay,
              int threads) {
    if (weight_decay != 0.0f) {
#pragma omp parallel for simd num_threads(threads_for(n, threads, kElementwiseGrain)) schedule(static)
        for (std::int64_t i = 0; i < n; ++i) p[i] -= lr * (g[i] + weight_decay * p[i]);
    } else {
#pragma omp parallel for simd num_threads(threads_for(n, threads, kElementwiseGrain)) schedule(static)
        for (std::int64_t i = 0; i < n; ++i) p[i] -= lr * g[i];
    }
}

void adamw_step(float* __restrict p, const float* __restrict g, float* __restrict m, float* __restrict v,
                std::int64_t n, float lr, float beta1, float beta2, float eps, float weight_decay,
                float step_size, float sqrt_bc2, int threads) {
    const float decay = 1.0f - lr * weight_decay;  // decoupled weight decay
    const float w1 = 1.0f - beta1;                 // lerp weight of exp_avg towards grad
    const float w2 = 1.0f - beta2;
#pragma omp parallel for simd num_threads(threads_for(n, threads, kElementwiseGrain)) schedule(static)
    for (std::int64_t i = 0; i < n; ++i) {
        const float gi = g[i];
        const float mi = m[i] + w1 * (gi - m[i]);          // torch.lerp for weight < 0.5
        const float vi = v[i] * beta2 + w2 * (gi * gi);    // mul_(beta2).addcmul_(g, g, 1 - beta2)
        m[i] = mi;
        v[i] = vi;
        const float denom = std::sqrt(vi) / sqrt_bc2 + eps;
        p[i] = p[i] * decay - step_size * (mi / denom);
    }
}

}  // namespace tmem
