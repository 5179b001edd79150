// pybind11 bindings of the native kernels as module `tmem_kernels._native`.
//
// No torch headers: every tensor arrives as its data pointer (an integer, `t.data_ptr()`), already
// validated by tmem_kernels/native.py (fp32, CPU, contiguous, shapes). A pointer argument of 0 means
// "no such output" where the kernel documents it as optional. The GIL is released while kernels run.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "tmem_native.h"

namespace py = pybind11;
using tmem::kMaxRank;

namespace {

using addr = std::uintptr_t;
using i64 = std::int64_t;

float* f(addr p) { return reinterpret_cast<float*>(p); }
const float* cf(addr p) { return reinterpret_cast<const float*>(p); }
const i64* ci(addr p) { return reinterpret_cast<const i64*>(p); }

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "tmem native CPU kernels (fp32; pointers in, validated by tmem_kernels.native)";
    m.attr("MAX_RANK") = kMaxRank;
    const auto nogil = py::call_guard<py::gil_scoped_release>();

    m.def(
        "swiglu_fwd",
        [](addr g, addr u, addr h, i64 n, int threads) { tmem::swiglu_fwd(cf(g), cf(u), f(h), n, threads); },
        "h = silu(g) * u over n floats", py::arg("g"), py::arg("u"), py::arg("h"), py::arg("n"),
        py::arg("threads"), nogil);
    m.def(
        "swiglu_bwd",
        [](addr g, addr u, addr dh, addr dg, addr du, i64 n, int threads) {
            tmem::swiglu_bwd(cf(g), cf(u), cf(dh), f(dg), f(du), n, threads);
        },
        "(dg, du) of h = silu(g) * u given dh, over n floats", py::arg("g"), py::arg("u"), py::arg("dh"),
        py::arg("dg"), py::arg("du"), py::arg("n"), py::arg("threads"), nogil);
    m.def(
        "sgd_step",
        [](addr p, addr g, i64 n, float lr, float wd, int threads) {
            tmem::sgd_step(f(p), cf(g), n, lr, wd, threads);
        },
        "p -= lr * (g + wd * p), in place over n floats", py::arg("p"), py::arg("g"), py::arg("n"),
        py::arg("lr"), py::arg("weight_decay"), py::arg("threads"), nogil);
    m.def(
        "adamw_step",
        [](addr p, addr g, addr m_, addr v, i64 n, float lr, float b1, float b2, float eps, float wd,
           float step_size, float sqrt_bc2, int threads) {
            tmem::adamw_step(f(p), cf(g), f(m_), f(v), n, lr, b1, b2, eps, wd, step_size, sqrt_bc2, threads);
        },
        "one AdamW step in place over n floats", py::arg("p"), py::arg("g"), py::arg("exp_avg"),
        py::arg("exp_avg_sq"), py::arg("n"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"),
        py::arg("eps"), py::arg("weight_decay"), py::arg("step_size"), py::arg("sqrt_bc2"),
        py::arg("threads"), nogil);
    m.def(
        "lora_swiglu_fwd",
        [](addr gu, addr xa, addr bg, i64 bg_stride, addr bu, i64 bu_stride, addr a_down, addr h, addr ha,
           addr indptr, addr slot, i64 G, i64 N, i64 I, int r, float s, int threads) {
            tmem::lora_swiglu_fwd(cf(gu), cf(xa), cf(bg), bg_stride, cf(bu), bu_stride, cf(a_down), f(h), f(ha),
                                  ci(indptr), ci(slot), G, N, I, r, s, threads);
        },
        "h = silu(gate) * up with the (segmented) LoRA expand added to gu, and ha = h @ a_down.T", py::arg("gu"),
        py::arg("xa"), py::arg("bg"), py::arg("bg_stride"), py::arg("bu"), py::arg("bu_stride"), py::arg("a_down"),
        py::arg("h"), py::arg("ha"), py::arg("indptr"), py::arg("slot"), py::arg("G"), py::arg("N"), py::arg("I"),
        py::arg("r"), py::arg("s"), py::arg("threads"), nogil);
    m.def(
        "lora_swiglu_bwd",
        [](addr gu, addr xa, addr bg, i64 bg_stride, addr bu, i64 bu_stride, addr a_down, addr dh_base, addr dha,
           addr dgu, addr dbg, addr dbu, addr dxa, addr da_down, addr indptr, addr slot, i64 G, i64 N, i64 I, int r,
           float s, int threads) {
            tmem::lora_swiglu_bwd(cf(gu), cf(xa), cf(bg), bg_stride, cf(bu), bu_stride, cf(a_down), cf(dh_base),
                                  cf(dha), f(dgu), f(dbg), f(dbu), f(dxa), f(da_down), ci(indptr), ci(slot), G, N,
                                  I, r, s, threads);
        },
        "backward of lora_swiglu_fwd: dgu (optional), dB_gate, dB_up (accumulated per slot), dxa, dA_down "
        "(optional)",
        py::arg("gu"), py::arg("xa"), py::arg("bg"), py::arg("bg_stride"), py::arg("bu"), py::arg("bu_stride"),
        py::arg("a_down"), py::arg("dh_base"), py::arg("dha"), py::arg("dgu"), py::arg("dbg"), py::arg("dbu"),
        py::arg("dxa"), py::arg("da_down"), py::arg("indptr"), py::arg("slot"), py::arg("G"), py::arg("N"),
        py::arg("I"), py::arg("r"), py::arg("s"), py::arg("threads"), nogil);
    m.def(
        "lora_expand_fwd",
        [](addr y, addr xa, addr b, i64 b_stride, addr indptr, addr slot, i64 G, i64 N, i64 M, int r, float s,
           int threads) {
            tmem::lora_expand_fwd(f(y), cf(xa), cf(b), b_stride, ci(indptr), ci(slot), G, N, M, r, s, threads);
        },
        "y += s * xa[rows] @ B[slot].T per segment, in place", py::arg("y"), py::arg("xa"), py::arg("b"),
        py::arg("b_stride"), py::arg("indptr"), py::arg("slot"), py::arg("G"), py::arg("N"), py::arg("M"),
        py::arg("r"), py::arg("s"), py::arg("threads"), nogil);
    m.def(
        "lora_expand_bwd",
        [](addr dy, addr xa, addr b, i64 b_stride, addr indptr, addr slot, i64 G, addr dxa, addr db, i64 N, i64 M,
           int r, float s, int threads) {
            tmem::lora_expand_bwd(cf(dy), cf(xa), cf(b), b_stride, ci(indptr), ci(slot), G, f(dxa), f(db), N, M, r,
                                  s, threads);
        },
        "backward of lora_expand_fwd: dxa (optional), dB accumulated per slot (optional)", py::arg("dy"),
        py::arg("xa"), py::arg("b"), py::arg("b_stride"), py::arg("indptr"), py::arg("slot"), py::arg("G"),
        py::arg("dxa"), py::arg("db"), py::arg("N"), py::arg("M"), py::arg("r"), py::arg("s"), py::arg("threads"),
        nogil);
}
