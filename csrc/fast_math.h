// Scalar, branch-free math that GCC auto-vectorises (AVX2/FMA with -march=native).
//
// The build uses -ffast-math, which lets the compiler reassociate sums; the range reduction below
// is written with explicit fmaf so that the two-constant (Cody-Waite) split of ln 2 survives it.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace tmem {

// exp(x) for float, relative error ~2 ulp on [-87, 88]; inputs outside are clamped (so the result
// never overflows to inf nor underflows below FLT_MIN). Cephes expf polynomial.
static inline float exp_clamped(float x) {
    x = x >= -87.0f ? x : -87.0f;  // NaN fails both tests and becomes -87 (no NaN -> int conversion)
    x = x <= 88.0f ? x : 88.0f;
    const float n = std::floor(x * 1.44269504088896341f + 0.5f);  // round(x / ln 2)
    float r = std::fma(n, -0.693359375f, x);                        // x - n * ln2_hi (exact)
    r = std::fma(n, 2.12194440e-4f, r);                             // - n * ln2_lo
    float p = 1.9875691500e-4f;
    p = std::fma(p, r, 1.3981999507e-3f);
    p = std::fma(p, r, 8.3334519073e-3f);
    p = std::fma(p, r, 4.1665795894e-2f);
    p = std::fma(p, r, 1.6666665459e-1f);
    p = std::fma(p, r, 5.0000001201e-1f);
    p = std::fma(p, r * r, r) + 1.0f;                               // exp(r), |r| <= ln2 / 2
    // 2^n built from its bits: n is in [-126, 127] after the clamp, so the biased exponent is valid.
    const std::int32_t bits = (static_cast<std::int32_t>(n) + 127) << 23;
    float two_n;
    std::memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

// sigmoid(x) = 1 / (1 + exp(-x)).
static inline float sigmoid(float x) { return 1.0f / (1.0f + exp_clamped(-x)); }

}  // namespace tmem
