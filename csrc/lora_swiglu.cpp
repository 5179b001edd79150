// LoRA expand epilogue of the gate/up projections fused with SwiGLU (forward and backward), for rows
// grouped into segments that each use one adapter slot (one segment, slot 0, for a single adapter).
//
// The base products gu = [x @ W_gate.T, x @ W_up.T] come from torch's sgemm; what is fused here is
// everything elementwise around them plus the rank-r products that would otherwise re-read an
// [N, I] tensor:
//   forward : h = silu(gb + s xa_g B_g[slot]^T) * (ub + s xa_u B_u[slot]^T),   ha = h A_d^T
//   backward: the same gate/up recomputed (never stored), dh = dh_base + dha A_d, the SwiGLU
//             backward, and the reductions dB_g[slot], dB_u[slot], dxa (and dA_d) accumulated on the fly.
// A segment of slot -1 has no adapter: zero factor tiles (its rows get the bare SwiGLU, no dB).
//
// Work split (lora_tiles.h): each OpenMP thread owns whole chunks of C columns and sweeps every
// segment's rows of them; for each segment the chunk's slices of that slot's B's are loaded into
// zero-padded [r, C] tiles, which stay in L1 together with the column reductions (dB, dA_d) and need
// no synchronisation (a slot used by two segments accumulates in the same thread). Row reductions
// (ha, dxa) go to one partial [N, k] buffer per thread, summed at the end.
//
// Columns are processed 8 at a time (simd8.h). A row's ragged tail (len % 8 columns) goes through a
// zero-padded 8-float staging vector: zero inputs and zero factor padding give zero contributions.
// The rank is a template parameter for the common ranks (the k-loops unroll, the accumulators live
// in registers); R == 0 is the generic path for any rank up to kMaxRank, vectorised the same way.
#include "lora_tiles.h"
#include "simd8.h"

namespace tmem {
namespace {

using namespace detail;

template <int R>
void fwd_impl(const float* __restrict gu, const float* __restrict xa, FactorStack bg, FactorStack bu,
              const float* __restrict a_down, float* __restrict h, float* __restrict ha, Segments seg, i64 I,
              int r_rt, float s, int threads) {
    constexpr int RA = R > 0 ? R : kMaxRank;  // array extent
    constexpr i64 C = chunk_cols<R>();
    const int r = R > 0 ? R : r_rt;
    const i64 N = seg.N;
    const float* gb = gu;
    const float* ub = gu + N * I;
    const i64 nchunks = (I + C - 1) / C;
    threads = threads_for(N * I, threads, kLoraGrain);
    std::vector<float> partials(static_cast<std::size_t>(threads) * N * r, 0.0f);

#pragma omp parallel num_threads(threads)
    {
        float* part = partials.data() + static_cast<i64>(omp_get_thread_num()) * N * r;
        std::vector<float> tiles(static_cast<std::size_t>(3 * RA * C));
        float* tg = tiles.data();  // B_gate^T, B_up^T, A_down slices [r, C]
        float* tu = tg + RA * C;
        float* ta = tu + RA * C;
#pragma omp for schedule(static)
        for (i64 c = 0; c < nchunks; ++c) {
            const i64 i0 = c * C;
            const i64 len = std::min(C, I - i0);
            const i64 full = len / kLanes * kLanes;
            load_tile(a_down, I, r, i0, len, C, ta);
            for (i64 g = 0; g < seg.count(); ++g) {
                const i64 slot = seg.slot_of(g);
                load_tile_t<R>(bg.at(slot), r, I, i0, len, C, tg);
                load_tile_t<R>(bu.at(slot), r, I, i0, len, C, tu);
                for (i64 n = seg.begin(g); n < seg.end(g); ++n) {
                    v8f sg[RA], su[RA], acc[RA];
                    for (int k = 0; k < r; ++k) {
                        sg[k] = splat8(s * xa[n * 2 * r + k]);
                        su[k] = splat8(s * xa[n * 2 * r + r + k]);
                        acc[k] = splat8(0.0f);
                    }
                    // 8 columns at tile column j: gp/up/hp point at the row data (or the staging tail).
                    auto step = [&](const float* gp, const float* up, float* hp, i64 j) {
                        v8f gv = load8(gp), uv = load8(up);
#pragma GCC unroll 16
                        for (int k = 0; k < r; ++k) {
                            gv += sg[k] * load8(tg + k * C + j);
                            uv += su[k] * load8(tu + k * C + j);
                        }
                        const v8f hv = gv * sigmoid8(gv) * uv;
                        store8(hp, hv);
#pragma GCC unroll 16
                        for (int k = 0; k < r; ++k) acc[k] += hv * load8(ta + k * C + j);
                    };
                    const float* grow = gb + n * I + i0;
                    const float* urow = ub + n * I + i0;
                    float* hrow = h + n * I + i0;
                    for (i64 j = 0; j < full; j += kLanes) step(grow + j, urow + j, hrow + j, j);
                    if (full < len) {
                        float gs[kLanes] = {}, us[kLanes] = {}, hs[kLanes];
                        std::copy(grow + full, grow + len, gs);
                        std::copy(urow + full, urow + len, us);
                        step(gs, us, hs, full);
                        std::copy(hs, hs + (len - full), hrow + full);
                    }
                    for (int k = 0; k < r; ++k) part[n * r + k] += hsum8(acc[k]);
                }
            }
        }
        reduce_partials(partials, threads, N * r, ha);
    }
}

template <int R, bool STORE_DGU, bool DA_DOWN>
void bwd_impl(const float* __restrict gu, const float* __restrict xa, FactorStack bg, FactorStack bu,
              const float* __restrict a_down, const float* __restrict dh_base, const float* __restrict dha,
              float* __restrict dgu, float* __restrict dbg, float* __restrict dbu, float* __restrict dxa,
              float* __restrict da_down, Segments seg, i64 I, int r_rt, float s, int threads) {
    constexpr int RA = R > 0 ? R : kMaxRank;
    constexpr i64 C = chunk_cols<R>();
    const int r = R > 0 ? R : r_rt;
    const i64 N = seg.N;
    const float* gb = gu;
    const float* ub = gu + N * I;
    const i64 nchunks = (I + C - 1) / C;
    threads = threads_for(N * I, threads, kLoraGrain);
    std::vector<float> partials(static_cast<std::size_t>(threads) * N * 2 * r, 0.0f);

#pragma omp parallel num_threads(threads)
    {
        float* part = partials.data() + static_cast<i64>(omp_get_thread_num()) * N * 2 * r;
        // Factor tiles B_gate^T, B_up^T, A_down and the column accumulators dB_gate^T, dB_up^T (per
        // segment) and dA_down (per chunk): six [r, C] tiles.
        std::vector<float> tiles(static_cast<std::size_t>(6 * RA * C));
        float* tg = tiles.data();
        float* tu = tg + RA * C;
        float* ta = tu + RA * C;
        float* acc_g = ta + RA * C;
        float* acc_u = acc_g + RA * C;
        float* acc_a = acc_u + RA * C;
#pragma omp for schedule(static)
        for (i64 c = 0; c < nchunks; ++c) {
            const i64 i0 = c * C;
            const i64 len = std::min(C, I - i0);
            const i64 full = len / kLanes * kLanes;
            load_tile(a_down, I, r, i0, len, C, ta);
            std::fill(acc_a, acc_a + RA * C, 0.0f);
            for (i64 g = 0; g < seg.count(); ++g) {
                const i64 slot = seg.slot_of(g);
                load_tile_t<R>(bg.at(slot), r, I, i0, len, C, tg);
                load_tile_t<R>(bu.at(slot), r, I, i0, len, C, tu);
                std::fill(acc_g, acc_g + 2 * RA * C, 0.0f);
                for (i64 n = seg.begin(g); n < seg.end(g); ++n) {
                    v8f sg[RA], su[RA], dk[RA], pg[RA], pu[RA];
                    for (int k = 0; k < r; ++k) {
                        sg[k] = splat8(s * xa[n * 2 * r + k]);
                        su[k] = splat8(s * xa[n * 2 * r + r + k]);
                        dk[k] = splat8(dha[n * r + k]);
                        pg[k] = splat8(0.0f);
                        pu[k] = splat8(0.0f);
                    }
                    // 8 columns at tile column j; dgp/dup are only touched when STORE_DGU.
                    auto step = [&](const float* gp, const float* up, const float* dhp, float* dgp, float* dup,
                                    i64 j) {
                        v8f gv = load8(gp), uv = load8(up), dh = load8(dhp);
#pragma GCC unroll 16
                        for (int k = 0; k < r; ++k) {
                            gv += sg[k] * load8(tg + k * C + j);
                            uv += su[k] * load8(tu + k * C + j);
                            dh += dk[k] * load8(ta + k * C + j);
                        }
                        const v8f sig = sigmoid8(gv);
                        const v8f silu = gv * sig;
                        const v8f du = dh * silu;
                        const v8f dg = dh * uv * sig * (1.0f + gv * (1.0f - sig));
                        if (STORE_DGU) {
                            store8(dgp, dg);
                            store8(dup, du);
                        }
                        const v8f hv = silu * uv;
#pragma GCC unroll 16
                        for (int k = 0; k < r; ++k) {
                            float* ag = acc_g + k * C + j;
                            float* au = acc_u + k * C + j;
                            store8(ag, load8(ag) + sg[k] * dg);
                            store8(au, load8(au) + su[k] * du);
                            pg[k] += dg * load8(tg + k * C + j);
                            pu[k] += du * load8(tu + k * C + j);
                            if (DA_DOWN) {
                                float* aa = acc_a + k * C + j;
                                store8(aa, load8(aa) + dk[k] * hv);
                            }
                        }
                    };
                    const i64 off = n * I + i0;
                    const float* grow = gb + off;
                    const float* urow = ub + off;
                    const float* dhrow = dh_base + off;
                    float* dgrow = STORE_DGU ? dgu + off : nullptr;
                    float* durow = STORE_DGU ? dgu + N * I + off : nullptr;
                    for (i64 j = 0; j < full; j += kLanes) {
                        step(grow + j, urow + j, dhrow + j, STORE_DGU ? dgrow + j : nullptr,
                             STORE_DGU ? durow + j : nullptr, j);
                    }
                    if (full < len) {
                        float gs[kLanes] = {}, us[kLanes] = {}, dhs[kLanes] = {}, dgs[kLanes], dus[kLanes];
                        std::copy(grow + full, grow + len, gs);
                        std::copy(urow + full, urow + len, us);
                        std::copy(dhrow + full, dhrow + len, dhs);
                        step(gs, us, dhs, dgs, dus, full);
                        if (STORE_DGU) {
                            std::copy(dgs, dgs + (len - full), dgrow + full);
                            std::copy(dus, dus + (len - full), durow + full);
                        }
                    }
                    for (int k = 0; k < r; ++k) {
                        part[n * 2 * r + k] += s * hsum8(pg[k]);
                        part[n * 2 * r + r + k] += s * hsum8(pu[k]);
                    }
                }
                if (slot >= 0) {
                    add_tile_t(acc_g, r, i0, len, C, dbg + slot * I * r);
                    add_tile_t(acc_u, r, i0, len, C, dbu + slot * I * r);
                }
            }
            if (DA_DOWN) {
                for (int k = 0; k < r; ++k) std::copy(acc_a + k * C, acc_a + k * C + len, da_down + k * I + i0);
            }
        }
        reduce_partials(partials, threads, N * 2 * r, dxa);
    }
}

// Argument packs whose run<R>() calls the kernel specialised for rank R (member templates cannot
// live in the local classes of the public functions, hence these two).
struct FwdArgs {
    const float *gu, *xa;
    FactorStack bg, bu;
    const float* a_down;
    float *h, *ha;
    Segments seg;
    i64 I;
    int r;
    float s;
    int threads;
    template <int R>
    void run() const {
        fwd_impl<R>(gu, xa, bg, bu, a_down, h, ha, seg, I, r, s, threads);
    }
};

struct BwdArgs {
    const float *gu, *xa;
    FactorStack bg, bu;
    const float *a_down, *dh_base, *dha;
    float *dgu, *dbg, *dbu, *dxa, *da_down;
    Segments seg;
    i64 I;
    int r;
    float s;
    int threads;
    template <int R>
    void run() const {
        // The two optional outputs select the specialisation, so no branch sits in the inner loop.
        if (dgu && da_down)
            bwd_impl<R, true, true>(gu, xa, bg, bu, a_down, dh_base, dha, dgu, dbg, dbu, dxa, da_down, seg, I, r,
                                    s, threads);
        else if (dgu)
            bwd_impl<R, true, false>(gu, xa, bg, bu, a_down, dh_base, dha, dgu, dbg, dbu, dxa, da_down, seg, I,
                                     r, s, threads);
        else if (da_down)
            bwd_impl<R, false, true>(gu, xa, bg, bu, a_down, dh_base, dha, dgu, dbg, dbu, dxa, da_down, seg, I,
                                     r, s, threads);
        else
            bwd_impl<R, false, false>(gu, xa, bg, bu, a_down, dh_base, dha, dgu, dbg, dbu, dxa, da_down, seg, I,
                                      r, s, threads);
    }
};

}  // namespace

void lora_swiglu_fwd(const float* gu, const float* xa, const float* bg, std::int64_t bg_stride, const float* bu,
                     std::int64_t bu_stride, const float* a_down, float* h, float* ha, const std::int64_t* indptr,
                     const std::int64_t* slot, std::int64_t G, std::int64_t N, std::int64_t I, int r, float s,
                     int threads) {
    detail::dispatch_rank(r, FwdArgs{gu, xa, {bg, bg_stride}, {bu, bu_stride}, a_down, h, ha,
                                     {indptr, slot, G, N}, I, r, s, threads});
}

void lora_swiglu_bwd(const float* gu, const float* xa, const float* bg, std::int64_t bg_stride, const float* bu,
                     std::int64_t bu_stride, const float* a_down, const float* dh_base, const float* dha,
                     float* dgu, float* dbg, float* dbu, float* dxa, float* da_down, const std::int64_t* indptr,
                     const std::int64_t* slot, std::int64_t G, std::int64_t N, std::int64_t I, int r, float s,
                     int threads) {
    detail::dispatch_rank(r, BwdArgs{gu, xa, {bg, bg_stride}, {bu, bu_stride}, a_down, dh_base, dha, dgu, dbg, dbu,
                                     dxa, da_down, {indptr, slot, G, N}, I, r, s, threads});
}

}  // namespace tmem
