// Declarations of the native CPU kernels (fp32, contiguous, row-major). Python validates every
// argument (dtype, device, contiguity, shapes) before calling in; these functions trust it.
//
// Pointers arrive as raw addresses (torch's `t.data_ptr()`), sizes as int64. All kernels are
// OpenMP-parallel over at most `threads` threads (the caller passes torch.get_num_threads()); see
// threads_for for when fewer are used.
#pragma once

#include <cstdint>

namespace tmem {

// ---- swiglu.cpp: plain SwiGLU over n elements ------------------------------------------------
// h = silu(g) * u
void swiglu_fwd(const float* g, const float* u, float* h, std::int64_t n, int threads);
// dg = dh * u * sig * (1 + g * (1 - sig)), du = dh * silu(g), sig = sigmoid(g) recomputed
void swiglu_bwd(const float* g, const float* u, const float* dh, float* dg, float* du, std::int64_t n,
                int threads);

// ---- optim.cpp: one optimizer step over a flat buffer of n elements, in place ----------------
void sgd_step(float* p, const float* g, std::int64_t n, float lr, float weight_decay, int threads);
void adamw_step(float* p, const float* g, float* m, float* v, std::int64_t n, float lr, float beta1,
                float beta2, float eps, float weight_decay, float step_size, float sqrt_bc2,
                int threads);

// ---- Segments ---------------------------------------------------------------------------------
// The LoRA kernels below take rows grouped into G contiguous segments (Punica's SGMV layout): rows
// indptr[g]..indptr[g+1] (int64 [G+1], from 0 to N) use adapter slot slot[g] (int64 [G]) or none (-1).
// A factor stack holds one [M, r] row-major B per slot, `stride` floats apart (a view into a pool of
// sessions); gradients of a stack are written to a contiguous [S, M, r] buffer the caller zeroed
// (accumulated: a slot used by two segments sums). indptr == nullptr means one segment of all N rows
// using slot 0 (a single adapter; slot, G and the strides are then ignored).

// ---- lora_swiglu.cpp: LoRA expand epilogue of gate/up fused with SwiGLU -----------------------
// Shapes (r = rank, N tokens, I intermediate size):
//   gu     [2, N, I]  base products x @ W_gate.T (gu[0]) and x @ W_up.T (gu[1])
//   xa     [N, 2r]    x @ [A_gate; A_up].T (gate in columns [0, r), up in [r, 2r))
//   bg     stack of [I, r] (B_gate per slot)    bu likewise (B_up)    a_down [r, I]
//
// Forward: gate = gu[0] + s * xa_g @ B_gate[slot].T, up likewise; writes h = silu(gate) * up [N, I] and
// ha = h @ a_down.T [N, r].
void lora_swiglu_fwd(const float* gu, const float* xa, const float* bg, std::int64_t bg_stride, const float* bu,
                     std::int64_t bu_stride, const float* a_down, float* h, float* ha, const std::int64_t* indptr,
                     const std::int64_t* slot, std::int64_t G, std::int64_t N, std::int64_t I, int r, float s,
                     int threads);

// Backward, given dh_base = dy @ W_down [N, I] and dha = s * dy @ B_down[slot] [N, r]:
//   dh = dh_base + dha @ a_down; (dgate, dup) = swiglu backward at the recomputed gate/up;
//   writes dgu [2, N, I] (may be null: then only the reductions below are produced),
//   dbg[slot] += s * dgate[rows].T @ xa_g[rows]  [S, I, r]      dbu likewise
//   dxa   = s * [dgate @ B_gate[slot], dup @ B_up[slot]]  [N, 2r]
//   da_down = dha.T @ h  [r, I]  (only if da_down is not null; h is recomputed, never stored)
void lora_swiglu_bwd(const float* gu, const float* xa, const float* bg, std::int64_t bg_stride, const float* bu,
                     std::int64_t bu_stride, const float* a_down, const float* dh_base, const float* dha,
                     float* dgu, float* dbg, float* dbu, float* dxa, float* da_down, const std::int64_t* indptr,
                     const std::int64_t* slot, std::int64_t G, std::int64_t N, std::int64_t I, int r, float s,
                     int threads);

// ---- lora_expand.cpp: segmented LoRA expand ---------------------------------------------------
// y [N, M] += s * xa[rows] @ B[slot].T per segment (xa [N, r]; b a stack of [M, r]).
void lora_expand_fwd(float* y, const float* xa, const float* b, std::int64_t b_stride, const std::int64_t* indptr,
                     const std::int64_t* slot, std::int64_t G, std::int64_t N, std::int64_t M, int r, float s,
                     int threads);
// Backward given dy [N, M]: dxa [N, r] = s * dy[rows] @ B[slot] (zero rows for slot -1; dxa may be null),
// db[slot] += s * dy[rows].T @ xa[rows] ([S, M, r]; may be null).
void lora_expand_bwd(const float* dy, const float* xa, const float* b, std::int64_t b_stride,
                     const std::int64_t* indptr, const std::int64_t* slot, std::int64_t G, float* dxa, float* db,
                     std::int64_t N, std::int64_t M, int r, float s, int threads);

// Largest rank the fused LoRA kernels accept.
constexpr int kMaxRank = 64;

// Threads worth waking for `work` elements when each thread should get at least `grain` of them.
// A parallel region costs microseconds on an idle machine but up to a scheduler time slice (~ms) when
// the cores are oversubscribed, so small buffers (an adapter's optimizer step) run on one thread.
inline int threads_for(std::int64_t work, int threads, std::int64_t grain) {
    if (threads < 1) threads = 1;
    const std::int64_t useful = work / grain;
    return useful < 1 ? 1 : (useful < threads ? static_cast<int>(useful) : threads);
}

// Grains: plain elementwise/optimizer loops (memory-bound) and the fused LoRA SwiGLU kernels
// (~6r multiply-adds and a sigmoid per element).
constexpr std::int64_t kElementwiseGrain = std::int64_t{1} << 19;
constexpr std::int64_t kLoraGrain = std::int64_t{1} << 17;

}  // namespace tmem
