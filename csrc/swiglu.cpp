// Plain SwiGLU forward and backward: one pass over memory each, sigmoid recomputed in backward.
#include "fast_math.h"
#include "tmem_native.h"

namespace tmem {

void swiglu_fwd(const float* __restrict g, const float* __restrict u, float* __restrict h, std::int64_t n,
                int threads) {
#pragma omp parallel for simd num_threads(threads_for(n, threads, kElementwiseGrain)) schedule(static)
    for (std::int64_t i = 0; i < n; ++i) {
        const float gi = g[i];
        h[i] = gi * sigmoid(gi) * u[i];
    }
}

void swiglu_bwd(const float* __restrict g, const float* __restrict u, const float* __restrict dh,
                float* __restrict dg, float* __restrict du, std::int64_t n, int threads) {
#pragma omp parallel for simd num_threads(threads_for(n, threads, kElementwiseGrain)) schedule(static)
    for (std::int64_t i = 0; i < n; ++i) {
        const float gi = g[i];
        const float sig = sigmoid(gi);
        const float d = dh[i];
        du[i] = d * gi * sig;
        dg[i] = d * u[i] * sig * (1.0f + gi * (1.0f - sig));
    }
}

}  // namespace tmem
