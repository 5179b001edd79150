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
// and sweeps all N rows of them, so the rank-r factor slices (r x C) and the column reductions
// (dB, dA_d) stay in L1 and need no synchronisation. Row reductions (ha, dxa) go to one partial
// [N, k] buffer per thread, summed at the end.
//
// The rank is a template parameter for the common ranks so that the k-loops unroll and the column
// loop vectorises; R == 0 is the generic path for any rank up to kMaxRank.
#include <omp.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "fast_math.h"
#include "tmem_native.h"

namespace tmem {
namespace {

using i64 = std::int64_t;

// Columns per chunk: the r x C factor slices and accumulators should fit in L1 (32 KiB).
template <int R>
constexpr i64 chunk_cols() {
    return R == 0 ? 64 : R <= 2 ? 512 : R <= 8 ? 256 : 128;
}

// Sum the per-thread partials [nt, len] into out [len].
void reduce_partials(const std::vector<float>& partials, int nt, i64 len, float* out) {
#pragma omp for schedule(static)
    for (i64 j = 0; j < len; ++j) {
        float acc = 0.0f;
        for (int t = 0; t < nt; ++t) acc += partials[static_cast<std::size_t>(t * len + j)];
        out[j] = acc;
    }
}

template <int R>
void fwd_impl(const float* __restrict gu, const float* __restrict xa, const float* __restrict bg_t,
              const float* __restrict bu_t, const float* __restrict a_down, float* __restrict h,
              float* __restrict ha, i64 N, i64 I, int r_rt, float s, int threads) {
    constexpr int RA = R > 0 ? R : kMaxRank;  // array extent
    constexpr i64 C = chunk_cols<R>();
    const int r = R > 0 ? R : r_rt;
    const float* __restrict gb = gu;
    const float* __restrict ub = gu + N * I;
    const i64 nchunks = (I + C - 1) / C;
    threads = threads_for(N * I, threads, kLoraGrain);
    std::vector<float> partials(static_cast<std::size_t>(threads) * N * r, 0.0f);

#pragma omp parallel num_threads(threads)
    {
        float* __restrict part = partials.data() + static_cast<i64>(omp_get_thread_num()) * N * r;
#pragma omp for schedule(static)
        for (i64 c = 0; c < nchunks; ++c) {
            const i64 i0 = c * C;
            const i64 len = std::min(C, I - i0);
            for (i64 n = 0; n < N; ++n) {
                float sg[RA], su[RA], acc[RA];
                for (int k = 0; k < r; ++k) {
                    sg[k] = s * xa[n * 2 * r + k];
                    su[k] = s * xa[n * 2 * r + r + k];
                    acc[k] = 0.0f;
                }
                const float* __restrict grow = gb + n * I + i0;
                const float* __restrict urow = ub + n * I + i0;
                float* __restrict hrow = h + n * I + i0;
#pragma omp simd
                for (i64 j = 0; j < len; ++j) {
                    float g = grow[j], u = urow[j];
#pragma GCC unroll 16
                    for (int k = 0; k < r; ++k) {
                        g += sg[k] * bg_t[k * I + i0 + j];
                        u += su[k] * bu_t[k * I + i0 + j];
                    }
                    hrow[j] = g * sigmoid(g) * u;
                }
                for (int k = 0; k < r; ++k) {
                    const float* __restrict ad = a_down + k * I + i0;
                    float dot = 0.0f;
                    for (i64 j = 0; j < len; ++j) dot += hrow[j] * ad[j];
                    acc[k] = dot;
                }
                for (int k = 0; k < r; ++k) part[n * r + k] += acc[k];
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
    const float* __restrict gb = gu;
    const float* __restrict ub = gu + N * I;
    const i64 nchunks = (I + C - 1) / C;
    threads = threads_for(N * I, threads, kLoraGrain);
    std::vector<float> partials(static_cast<std::size_t>(threads) * N * 2 * r, 0.0f);

#pragma omp parallel num_threads(threads)
    {
        float* __restrict part = partials.data() + static_cast<i64>(omp_get_thread_num()) * N * 2 * r;
        // Column accumulators of one chunk: dB_gate^T, dB_up^T, dA_down, each [r, C]; then the
        // chunk's row tile of dgate, dup and h, each [C].
        std::vector<float> buf(static_cast<std::size_t>((3 * RA + 3) * C));
        float* __restrict acc_g = buf.data();
        float* __restrict acc_u = acc_g + RA * C;
        float* __restrict acc_a = acc_u + RA * C;
        float* __restrict tdg = acc_a + RA * C;
        float* __restrict tdu = tdg + C;
        float* __restrict th = tdu + C;
#pragma omp for schedule(static)
        for (i64 c = 0; c < nchunks; ++c) {
            const i64 i0 = c * C;
            const i64 len = std::min(C, I - i0);
            std::fill(acc_g, acc_g + 3 * RA * C, 0.0f);
            for (i64 n = 0; n < N; ++n) {
                float sg[RA], su[RA], dk[RA];
                for (int k = 0; k < r; ++k) {
                    sg[k] = s * xa[n * 2 * r + k];
                    su[k] = s * xa[n * 2 * r + r + k];
                    dk[k] = dha[n * r + k];
                }
                const i64 off = n * I + i0;
                // Elementwise: recompute gate/up and dh with their rank-r terms, SwiGLU backward.
#pragma omp simd
                for (i64 j = 0; j < len; ++j) {
                    const i64 col = i0 + j;
                    float g = gb[off + j], u = ub[off + j], dh = dh_base[off + j];
#pragma GCC unroll 16
                    for (int k = 0; k < r; ++k) {
                        g += sg[k] * bg_t[k * I + col];
                        u += su[k] * bu_t[k * I + col];
                        dh += dk[k] * a_down[k * I + col];
                    }
                    const float sig = sigmoid(g);
                    const float silu = g * sig;
                    const float du = dh * silu;
                    const float dg = dh * u * sig * (1.0f + g * (1.0f - sig));
                    tdg[j] = dg;
                    tdu[j] = du;
                    if (STORE_DGU) {
                        dgu[off + j] = dg;
                        dgu[N * I + off + j] = du;
                    }
                    if (DA_DOWN) th[j] = silu * u;
                }
                // Rank-r reductions of the tile: column sums (dB, dA_down) and row dots (dxa).
                for (int k = 0; k < r; ++k) {
                    const float* __restrict bgk = bg_t + k * I + i0;
                    const float* __restrict buk = bu_t + k * I + i0;
                    float* __restrict agk = acc_g + k * C;
                    float* __restrict auk = acc_u + k * C;
                    const float sgk = sg[k], suk = su[k];
                    float dot_g = 0.0f, dot_u = 0.0f;
#pragma omp simd reduction(+ : dot_g, dot_u)
                    for (i64 j = 0; j < len; ++j) {
                        agk[j] += sgk * tdg[j];
                        auk[j] += suk * tdu[j];
                        dot_g += tdg[j] * bgk[j];
                        dot_u += tdu[j] * buk[j];
                    }
                    part[n * 2 * r + k] += s * dot_g;
                    part[n * 2 * r + r + k] += s * dot_u;
                    if (DA_DOWN) {
                        float* __restrict aak = acc_a + k * C;
                        const float dkk = dk[k];
#pragma omp simd
                        for (i64 j = 0; j < len; ++j) aak[j] += dkk * th[j];
                    }
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
