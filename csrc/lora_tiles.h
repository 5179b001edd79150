// What the LoRA kernels (lora_swiglu.cpp, lora_expand.cpp) share: row segments, factor tiles, the
// reduction of per-thread partials and the dispatch on the rank.
//
// Work split of every kernel here: the output columns are cut into chunks of C columns; each OpenMP
// thread owns whole chunks and sweeps all rows of them, segment by segment. A chunk's slice of a rank-r
// factor is copied into a contiguous, zero-padded [r, C] tile (row k = factor column k), which stays in
// L1 while the segment's rows stream past.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "simd8.h"
#include "tmem_native.h"

namespace tmem {
namespace detail {

using i64 = std::int64_t;

// Columns per chunk (a multiple of the 8 SIMD lanes): a few [r, C] tiles stay in L1.
template <int R>
constexpr i64 chunk_cols() {
    return R >= 1 && R <= 8 ? 128 : 64;
}

// Rows grouped by adapter slot: rows indptr[g]..indptr[g+1] use slot[g] (-1: no adapter). With a null
// indptr there is one segment, all N rows, slot 0 (the single-adapter ops).
struct Segments {
    const i64* indptr;
    const i64* slot;
    i64 G, N;
    i64 count() const { return indptr ? G : 1; }
    i64 begin(i64 g) const { return indptr ? indptr[g] : 0; }
    i64 end(i64 g) const { return indptr ? indptr[g + 1] : N; }
    i64 slot_of(i64 g) const { return indptr ? slot[g] : 0; }
};

// A stack of [M, r] row-major factor blocks, one per slot, `stride` floats apart.
struct FactorStack {
    const float* base;
    i64 stride;
    const float* at(i64 slot) const { return slot < 0 ? nullptr : base + slot * stride; }
};

// tile[k, 0:C] = m[k, i0:i0+len] for k < r, zero beyond len. m is [r, I] row-major.
inline void load_tile(const float* m, i64 I, int r, i64 i0, i64 len, i64 C, float* tile) {
    for (int k = 0; k < r; ++k) {
        std::copy(m + k * I + i0, m + k * I + i0 + len, tile + k * C);
        std::fill(tile + k * C + len, tile + (k + 1) * C, 0.0f);
    }
}

// tile[k, j] = b[i0 + j, k] for j < len, zero beyond len (b is [M, r] row-major); all zero if b is null
// (no adapter: the expand adds nothing). R > 0: the rank at compile time. For R <= 8, eight rows of b
// at a time are loaded as eight 8-float vectors (a row plus the start of the next ones) and transposed
// in registers; rows whose 8-float load would pass the end of b (row M - 1) take the scalar path.
template <int R>
inline void load_tile_t(const float* b, int r_rt, i64 M, i64 i0, i64 len, i64 C, float* tile) {
    const int r = R > 0 ? R : r_rt;
    if (!b) {
        std::fill(tile, tile + r * C, 0.0f);
        return;
    }
    const float* src = b + i0 * r;
    i64 j = 0;
    if (R > 0 && R <= 8) {
        const i64 vec_end = std::min(len, (M * r - kLanes) / r - i0 + 1);  // rows whose load stays in b
        for (; j + kLanes <= vec_end; j += kLanes) {
            v8f v[kLanes];
            for (int q = 0; q < kLanes; ++q) v[q] = load8(src + (j + q) * r);
            transpose8(v);
            for (int k = 0; k < r; ++k) store8(tile + k * C + j, v[k]);
        }
    }
    for (; j < len; ++j) {
#pragma GCC unroll 16
        for (int k = 0; k < r; ++k) tile[k * C + j] = src[j * r + k];
    }
    if (len < C)
        for (int k = 0; k < r; ++k) std::fill(tile + k * C + len, tile + (k + 1) * C, 0.0f);
}

// db[i0 + j, k] += tile[k, j] for j < len (db is [M, r] row-major): the inverse of load_tile_t.
inline void add_tile_t(const float* tile, int r, i64 i0, i64 len, i64 C, float* db) {
    for (i64 j = 0; j < len; ++j)
        for (int k = 0; k < r; ++k) db[(i0 + j) * r + k] += tile[k * C + j];
}

// Sum the per-thread partials [nt, len] into out [len] (called inside a parallel region).
inline void reduce_partials(const std::vector<float>& partials, int nt, i64 len, float* out) {
#pragma omp for schedule(static)
    for (i64 j = 0; j < len; ++j) {
        float acc = 0.0f;
        for (int t = 0; t < nt; ++t) acc += partials[static_cast<std::size_t>(t * len + j)];
        out[j] = acc;
    }
}

// Calls args.run<R>() for the rank's specialisation, or run<0>() (generic) otherwise.
template <class Args>
void dispatch_rank(int r, const Args& args) {
    if (r < 1 || r > kMaxRank) {
        throw std::invalid_argument("tmem native: rank must be in [1, " + std::to_string(kMaxRank) +
                                    "], got " + std::to_string(r));
    }
    switch (r) {
        case 1: return args.template run<1>();
        case 2: return args.template run<2>();
        case 4: return args.template run<4>();
        case 6: return args.template run<6>();
        case 8: return args.template run<8>();
        case 16: return args.template run<16>();
        default: return args.template run<0>();
    }
}

}  // namespace detail
}  // namespace tmem
