// An 8-lane float vector (GCC/Clang vector extensions) and the few operations the fused kernels need.
//
// With -march=native on an AVX2 machine every operation is one ymm instruction (a * b + c contracts
// to an FMA); without AVX the compiler splits the lanes over SSE registers, so the code stays
// portable. Loads and stores go through memcpy: unaligned and free of aliasing questions.
#pragma once

#include <cstdint>
#include <cstring>

namespace tmem {

constexpr int kLanes = 8;
typedef float v8f __attribute__((vector_size(32)));
typedef std::int32_t v8i __attribute__((vector_size(32)));

static inline v8f load8(const float* p) {
    v8f v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }

static inline v8f splat8(float x) { return v8f{x, x, x, x, x, x, x, x}; }

static inline float hsum8(v8f v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// exp(x) lane-wise, relative error ~2 ulp on [-87, 88]; inputs outside are clamped (no inf, no
// denormal). Same Cephes polynomial as exp_clamped in fast_math.h.
static inline v8f exp8(v8f x) {
    // Written so that NaN fails both tests and becomes -87: the float->int conversion below then never
    // sees a NaN (the caller's own use of x still propagates it).
    x = x >= -87.0f ? x : splat8(-87.0f);
    x = x <= 88.0f ? x : splat8(88.0f);
    // n = floor(x / ln2 + 1/2): the argument is > 0 after adding 128, so truncation is floor.
    const v8i ni = __builtin_convertvector(x * 1.44269504088896341f + 128.5f, v8i) - 128;
    const v8f n = __builtin_convertvector(ni, v8f);
    v8f r = x - n * 0.693359375f;  // n * ln2_hi is exact (few mantissa bits on both sides)
    r = r + n * 2.12194440e-4f;    // - n * ln2_lo
    v8f p = splat8(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const v8i bits = (ni + 127) << 23;  // 2^n from its exponent bits, n in [-126, 127]
    v8f two_n;
    std::memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

static inline v8f sigmoid8(v8f x) { return 1.0f / (1.0f + exp8(-x)); }

// In-register 8x8 transpose: v[i] lane j = M[i][j] on entry, M[j][i] on exit (three shuffle stages;
// with AVX: unpack, 64-bit shuffle, 128-bit permute).
static inline void transpose8(v8f v[8]) {
    const v8i lo = {0, 8, 1, 9, 4, 12, 5, 13}, hi = {2, 10, 3, 11, 6, 14, 7, 15};
    const v8i lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
    const v8i lo4 = {0, 1, 2, 3, 8, 9, 10, 11}, hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
    v8f t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = __builtin_shuffle(v[i], v[i + 1], lo);  // rows i, i+1 interleaved: columns 0,1 | 4,5
        t[i + 1] = __builtin_shuffle(v[i], v[i + 1], hi);  // columns 2,3 | 6,7
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = __builtin_shuffle(t[i], t[i + 2], lo2);  // four rows of column 0 | 4
        u[i + 1] = __builtin_shuffle(t[i], t[i + 2], hi2);  // column 1 | 5
        u[i + 2] = __builtin_shuffle(t[i + 1], t[i + 3], lo2);  // column 2 | 6
        u[i + 3] = __builtin_shuffle(t[i + 1], t[i + 3], hi2);  // column 3 | 7
    }
    for (int j = 0; j < 4; ++j) {
        v[j] = __builtin_shuffle(u[j], u[j + 4], lo4);
        v[j + 4] = __builtin_shuffle(u[j], u[j + 4], hi4);
    }
}

}  // namespace tmem
