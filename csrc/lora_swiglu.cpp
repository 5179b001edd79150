// LoRA expand epilogue of the gate/up projections fused with SwiGLU (forward and backward).
//
// The base products gu = [x @ W_gate.T, x @ W_up.T] come from torch's sgemm; what is fused here is
// everything elementwise around them plus the rank-r products that would otherwise re-read an
// [N, I] tensor:
//   forward : h = silu(gb + s xa_g B_g^T) * (ub + s xa_u B_u^T),   ha = h A_d^T
//   backward: the same gate/up recomputed (never stored), dh = dh_base + dha A_d, the SwiGLU
//             backward, and the reductions dB_g, dB_u, dxa (and dA_d) accumulated on the fly.
//
// Work split: the I columns are cut into chunks of C columns; each OpenMP thread owns whole chunks
// and sweeps all N rows of them. A chunk's slices of the rank-r factors are first copied into
// contiguous, zero-padded [r, C] tiles, which stay in L1 together with the column reductions
// (dB, dA_d) and need no synchronisation. Row reductions (ha, dxa) go to one partial [N, k] buffer
// per thread, summed at the end.
//
// Columns are processed 8 at a time (simd8.h). A row's ragged tail (len % 8 columns) goes through a
// zero-padded 8-float staging vector: zero inputs and zero factor padding give zero contributions.
// The rank is a template parameter for the common ranks (the k-loops unroll, the accumulators live
// in registers); R == 0 is the generic path for any rank up to kMaxRank, vectorised the same way.
#include <omp.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "simd8.h"
#include "tmem_native.h"

namespace tmem {
namespace {

using i64 = std::int64_t;

// Columns per chunk (a multiple of kLanes): 3 factor tiles + 3 accumulator tiles of r x C floats.
template <int R>
constexpr i64 chunk_cols() {
    return R >= 1 && R <= 8 ? 128 : 64;
}

// Sum the per-thread partials [nt, len] into out [len] (called inside a parallel region).
void reduce_partials(const std::vector<float>& partials, int nt, i64 len, float* out) {
#pragma omp for schedule(static)
    for (i64 j = 0; j < len; ++j) {
        float acc = 0.0f;
        for (int t = 0; t < nt; ++t) acc += partials[static_cast<std::size_t>(t * len + j)];
        out[j] = acc;
    }
}

// tile[k, 0:C] = m[k, i0:i0+len] for k < r, zero beyond len. m is [r, I] row-major.
void load_tile(const float* m, i64 I, int r, i64 i0, i64 len, i64 C, float* tile) {
    for (int k = 0; k < r; ++k) {
        std::copy(m + k * I + i0, m + k * I + i0 + len, tile + k * C);
        std::fill(tile + k * C + len, tile + (k + 1) * C, 0.0f);
    }
}

template <int R>
void fwd_impl(const float* __restrict gu, const float* __restrict xa, const float* __restrict bg_t,
              const float* __restrict bu_t, const float* __restrict a_down, float* __restrict h,
              float* __restrict ha, i64 N, i64 I, int r_rt, float s, int threads) {
    constexpr int RA = R > 0 ? R : kMaxRank;  // array extent
    constexpr i64 C = chunk_cols<R>();
    const int r = R > 0 ? R : r_rt;
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
            load_tile(bg_t, I, r, i0, len, C, tg);
            load_tile(bu_t, I, r, i0, len, C, tu);
            load_tile(a_down, I, r, i0, len, C, ta);
            for (i64 n = 0; n < N; ++n) {
                v8f sg[RA], su[RA], acc[RA];
                for (int k = 0; k < r; ++k) {
                    sg[k] = splat8(s * xa[n * 2 * r + k]);
                    su[k] = splat8(s * xa[n * 2 * r + r + k]);
                    acc[k] = splat8(0.0f);
                }
                // 8 columns at tile column j: gp/up/hp point at the row data (or the staging tail).
                auto step = [&](const float* gp, const float* up, float* hp, i64 j) {
                    v8f g = load8(gp), u = load8(up);
#pragma GCC unroll 16
                    for (int k = 0; k < r; ++k) {
                        g += sg[k] * load8(tg + k * C + j);
                        u += su[k] * load8(tu + k * C + j);
                    }
                    const v8f hv = g * sigmoid8(g) * u;
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
        reduce_partials(partials, threads, N * r, ha);
    }
}

template <int R, bool STORE_DGU, bool DA_DOWN>
void bwd_impl(const float* __restrict gu, const float* __restrict xa, const float* __restrict bg_t,
              const float* __restrict bu_t, const float* __restrict a_down, const float* __restrict dh_base,
              const float* __restrict dha, float* __restrict dgu, float* __restrict dbg_t,
              float* __restrict dbu_t, float* __restrict dxa, float* __restrict da_down, i64 N, i64 I,
              int r_rt, float s, int threads) {
    constexpr int RA = R > 0 ? R : kMaxRank;
    constexpr i64 C = chunk_cols<R>();
    const int r = R > 0 ? R : r_rt;
    const float* gb = gu;
    const float* ub = gu + N * I;
    const i64 nchunks = (I + C - 1) / C;
    threads = threads_for(N * I, threads, kLoraGrain);
    std::vector<float> partials(static_cast<std::size_t>(threads) * N * 2 * r, 0.0f);

#pragma omp parallel num_threads(threads)
    {
        float* part = partials.data() + static_cast<i64>(omp_get_thread_num()) * N * 2 * r;
        // Factor tiles B_gate^T, B_up^T, A_down and the chunk's column accumulators dB_gate^T,
        // dB_up^T, dA_down: six [r, C] tiles.
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
            load_tile(bg_t, I, r, i0, len, C, tg);
            load_tile(bu_t, I, r, i0, len, C, tu);
            load_tile(a_down, I, r, i0, len, C, ta);
            std::fill(acc_g, acc_g + 3 * RA * C, 0.0f);
            for (i64 n = 0; n < N; ++n) {
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
                    v8f g = load8(gp), u = load8(up), dh = load8(dhp);
#pragma GCC unroll 16
                    for (int k = 0; k < r; ++k) {
                        g += sg[k] * load8(tg + k * C + j);
                        u += su[k] * load8(tu + k * C + j);
                        dh += dk[k] * load8(ta + k * C + j);
                    }
                    const v8f sig = sigmoid8(g);
                    const v8f silu = g * sig;
                    const v8f du = dh * silu;
                    const v8f dg = dh * u * sig * (1.0f + g * (1.0f - sig));
                    if (STORE_DGU) {
                        store8(dgp, dg);
                        store8(dup, du);
                    }
                    const v8f hv = silu * u;
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
            for (int k = 0; k < r; ++k) {
                std::copy(acc_g + k * C, acc_g + k * C + len, dbg_t + k * I + i0);
                std::copy(acc_u + k * C, acc_u + k * C + len, dbu_t + k * I + i0);
                if (DA_DOWN) std::copy(acc_a + k * C, acc_a + k * C + len, da_down + k * I + i0);
            }
        }
        reduce_partials(partials, threads, N * 2 * r, dxa);
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

// Argument packs whose run<R>() calls the kernel specialised for rank R (member templates cannot
// live in the local classes of the public functions, hence these two).
struct FwdArgs {
    const float *gu, *xa, *bg_t, *bu_t, *a_down;
    float *h, *ha;
    i64 N, I;
    int r;
    float s;
    int threads;
    template <int R>
    void run() const {
        fwd_impl<R>(gu, xa, bg_t, bu_t, a_down, h, ha, N, I, r, s, threads);
    }
};

struct BwdArgs {
    const float *gu, *xa, *bg_t, *bu_t, *a_down, *dh_base, *dha;
    float *dgu, *dbg_t, *dbu_t, *dxa, *da_down;
    i64 N, I;
    int r;
    float s;
    int threads;
    template <int R>
    void run() const {
        // The two optional outputs select the specialisation, so no branch sits in the inner loop.
        if (dgu && da_down)
            bwd_impl<R, true, true>(gu, xa, bg_t, bu_t, a_down, dh_base, dha, dgu, dbg_t, dbu_t, dxa, da_down,
                                    N, I, r, s, threads);
        else if (dgu)
            bwd_impl<R, true, false>(gu, xa, bg_t, bu_t, a_down, dh_base, dha, dgu, dbg_t, dbu_t, dxa, da_down,
                                     N, I, r, s, threads);
        else if (da_down)
            bwd_impl<R, false, true>(gu, xa, bg_t, bu_t, a_down, dh_base, dha, dgu, dbg_t, dbu_t, dxa, da_down,
                                     N, I, r, s, threads);
        else
            bwd_impl<R, false, false>(gu, xa, bg_t, bu_t, a_down, dh_base, dha, dgu, dbg_t, dbu_t, dxa,
                                      da_down, N, I, r, s, threads);
    }
};

}  // namespace

void lora_swiglu_fwd(const float* gu, const float* xa, const float* bg_t, const float* bu_t,
                     const float* a_down, float* h, float* ha, std::int64_t N, std::int64_t I, int r,
                     float s, int threads) {
    dispatch_rank(r, FwdArgs{gu, xa, bg_t, bu_t, a_down, h, ha, N, I, r, s, threads});
}

void lora_swiglu_bwd(const float* gu, const float* xa, const float* bg_t, const float* bu_t,
                     const float* a_down, const float* dh_base, const float* dha, float* dgu,
                     float* dbg_t, float* dbu_t, float* dxa, float* da_down, std::int64_t N,
                     std::int64_t I, int r, float s, int threads) {
    dispatch_rank(r, BwdArgs{gu, xa, bg_t, bu_t, a_down, dh_base, dha, dgu, dbg_t, dbu_t, dxa, da_down, N, I,
                             r, s, threads});
}

}  // namespace tmem
