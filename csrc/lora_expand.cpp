// Segmented LoRA expand (Punica's SGMV expand on the CPU) and its backward.
//
//   forward : y[n, :] += s * xa[n, :] @ B[slot]^T          for the rows n of each segment
//   backward: dxa[n, :] = s * dy[n, :] @ B[slot]           (zero for rows of slot -1)
//             dB[slot] += s * dy[rows]^T @ xa[rows]         (summed over every segment of the slot)
//
// Same work split as lora_swiglu.cpp (lora_tiles.h): threads own column chunks, a segment's B slice is
// a transposed [r, C] tile, column reductions (dB) stay in the owning thread, row reductions (dxa) go to
// per-thread partials summed at the end. Segments of slot -1 are skipped.
#include "lora_tiles.h"
#include "simd8.h"

namespace tmem {
namespace {

using namespace detail;

template <int R>
void fwd_impl(float* __restrict y, const float* __restrict xa, FactorStack b, Segments seg, i64 M, int r_rt,
              float s, int threads) {
    constexpr int RA = R > 0 ? R : kMaxRank;
    constexpr i64 C = chunk_cols<R>();
    const int r = R > 0 ? R : r_rt;
    const i64 nchunks = (M + C - 1) / C;
    threads = threads_for(seg.N * M, threads, kLoraGrain);

#pragma omp parallel num_threads(threads)
    {
        std::vector<float> tile(static_cast<std::size_t>(RA * C));
        float* tb = tile.data();
#pragma omp for schedule(static)
        for (i64 c = 0; c < nchunks; ++c) {
            const i64 i0 = c * C;
            const i64 len = std::min(C, M - i0);
            const i64 full = len / kLanes * kLanes;
            for (i64 g = 0; g < seg.count(); ++g) {
                const i64 slot = seg.slot_of(g);
                if (slot < 0) continue;
                load_tile_t<R>(b.at(slot), r, M, i0, len, C, tb);
                for (i64 n = seg.begin(g); n < seg.end(g); ++n) {
                    v8f sx[RA];
                    for (int k = 0; k < r; ++k) sx[k] = splat8(s * xa[n * r + k]);
                    auto step = [&](float* yp, i64 j) {
                        v8f acc = load8(yp);
#pragma GCC unroll 16
                        for (int k = 0; k < r; ++k) acc += sx[k] * load8(tb + k * C + j);
                        store8(yp, acc);
                    };
                    float* yrow = y + n * M + i0;
                    for (i64 j = 0; j < full; j += kLanes) step(yrow + j, j);
                    if (full < len) {
                        float ys[kLanes] = {};
                        std::copy(yrow + full, yrow + len, ys);
                        step(ys, full);
                        std::copy(ys, ys + (len - full), yrow + full);
                    }
                }
            }
        }
    }
}

template <int R>
void bwd_impl(const float* __restrict dy, const float* __restrict xa, FactorStack b, Segments seg,
              float* __restrict dxa, float* __restrict db, i64 M, int r_rt, float s, int threads) {
    constexpr int RA = R > 0 ? R : kMaxRank;
    constexpr i64 C = chunk_cols<R>();
    const int r = R > 0 ? R : r_rt;
    const i64 N = seg.N;
    const i64 nchunks = (M + C - 1) / C;
    threads = threads_for(N * M, threads, kLoraGrain);
    std::vector<float> partials(dxa ? static_cast<std::size_t>(threads) * N * r : 0, 0.0f);

#pragma omp parallel num_threads(threads)
    {
        float* part = dxa ? partials.data() + static_cast<i64>(omp_get_thread_num()) * N * r : nullptr;
        std::vector<float> tiles(static_cast<std::size_t>(2 * RA * C));
        float* tb = tiles.data();  // B[slot]^T slice and the dB[slot]^T accumulator, [r, C] each
        float* acc = tb + RA * C;
#pragma omp for schedule(static)
        for (i64 c = 0; c < nchunks; ++c) {
            const i64 i0 = c * C;
            const i64 len = std::min(C, M - i0);
            const i64 full = len / kLanes * kLanes;
            for (i64 g = 0; g < seg.count(); ++g) {
                const i64 slot = seg.slot_of(g);
                if (slot < 0) continue;
                load_tile_t<R>(b.at(slot), r, M, i0, len, C, tb);
                std::fill(acc, acc + RA * C, 0.0f);
                for (i64 n = seg.begin(g); n < seg.end(g); ++n) {
                    v8f sx[RA], p[RA];
                    for (int k = 0; k < r; ++k) {
                        sx[k] = splat8(s * xa[n * r + k]);
                        p[k] = splat8(0.0f);
                    }
                    auto step = [&](const float* dyp, i64 j) {
                        const v8f d = load8(dyp);
#pragma GCC unroll 16
                        for (int k = 0; k < r; ++k) {
                            float* a = acc + k * C + j;
                            store8(a, load8(a) + sx[k] * d);
                            p[k] += d * load8(tb + k * C + j);
                        }
                    };
                    const float* dyrow = dy + n * M + i0;
                    for (i64 j = 0; j < full; j += kLanes) step(dyrow + j, j);
                    if (full < len) {
                        float ds[kLanes] = {};
                        std::copy(dyrow + full, dyrow + len, ds);
                        step(ds, full);
                    }
                    if (part)
                        for (int k = 0; k < r; ++k) part[n * r + k] += s * hsum8(p[k]);
                }
                if (db) add_tile_t(acc, r, i0, len, C, db + slot * M * r);
            }
        }
        if (dxa) reduce_partials(partials, threads, N * r, dxa);
    }
}

struct FwdArgs {
    float* y;
    const float* xa;
    FactorStack b;
    Segments seg;
    i64 M;
    int r;
    float s;
    int threads;
    template <int R>
    void run() const {
        fwd_impl<R>(y, xa, b, seg, M, r, s, threads);
    }
};

struct BwdArgs {
    const float *dy, *xa;
    FactorStack b;
    Segments seg;
    float *dxa, *db;
    i64 M;
    int r;
    float s;
    int threads;
    template <int R>
    void run() const {
        bwd_impl<R>(dy, xa, b, seg, dxa, db, M, r, s, threads);
    }
};

}  // namespace

void lora_expand_fwd(float* y, const float* xa, const float* b, std::int64_t b_stride, const std::int64_t* indptr,
                     const std::int64_t* slot, std::int64_t G, std::int64_t N, std::int64_t M, int r, float s,
                     int threads) {
    detail::dispatch_rank(r, FwdArgs{y, xa, {b, b_stride}, {indptr, slot, G, N}, M, r, s, threads});
}

void lora_expand_bwd(const float* dy, const float* xa, const float* b, std::int64_t b_stride,
                     const std::int64_t* indptr, const std::int64_t* slot, std::int64_t G, float* dxa, float* db,
                     std::int64_t N, std::int64_t M, int r, float s, int threads) {
    detail::dispatch_rank(r, BwdArgs{dy, xa, {b, b_stride}, {indptr, slot, G, N}, dxa, db, M, r, s, threads});
}

}  // namespace tmem
