"""Benchmark: batched randomized SVD init vs the exact SVD, torch.svd_lowrank and PEFT's pissa_niter_4.

Real SmolLM2-135M-Instruct weights, all 12 targeted matrices (gate/up of the last 4 layers stacked as
[8, 1536, 576], down as [4, 576, 1536]), one run, every method on the same tensors:

    exact            torch.linalg.svd (what reference.svd_top_r calls)
    svd_lowrank      torch.svd_lowrank(W, q=32, niter=16), batched: what reaches ~2e-4 on these spectra
    peft_pissa_n4    what PEFT does for init_lora_weights="pissa_niter_4" (peft/tuners/lora/layer.py,
                     `pissa_init`): per layer, torch.svd_lowrank(weight.float(), r, niter=4), i.e. q=r
    tmem_rsvd        tmem_kernels.rsvd.randomized_svd_top_r(W, 6) (defaults)

The summary test prints each method's median time, its speed-up over exact and the max relative error
of the top-6 singular values. Qwen3-4B shapes ([4, 9728, 2560], random weights) are timed too (exact
SVD there only with TMEM_BENCH_QWEN_EXACT=1: minutes on 2 cores). Figures: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.common import median_s
from tmem_kernels.rsvd import randomized_svd_top_r

R = 6
_RESULTS: dict[str, dict[str, tuple[float, float]]] = {}  # suite -> method -> (median s, max rel err)


def _exact(w: torch.Tensor):
    return torch.linalg.svd(w, full_matrices=False)[1]


def _svd_lowrank(w: torch.Tensor):
    return torch.svd_lowrank(w, q=32, niter=16)[1]


def _peft_pissa_niter_4(w: torch.Tensor):
    # PEFT's pissa_init: `Vr, Sr, Ur = svd_lowrank(weight.data, self.r[adapter_name], niter=4)`, per layer.
    return torch.stack([torch.svd_lowrank(w_i.float(), R, niter=4)[1] for w_i in w])


def _tmem_rsvd(w: torch.Tensor):
    return randomized_svd_top_r(w, R)[1]


METHODS = {
    "exact": _exact,
    "svd_lowrank_q32_n16": _svd_lowrank,
    "peft_pissa_niter_4": _peft_pissa_niter_4,
    "tmem_rsvd": _tmem_rsvd,
}


@pytest.fixture(scope="module")
def smollm2_stacks() -> list[torch.Tensor]:
    from tmem_runtime.models import load_model, target_mlps

    model, _ = load_model("smollm2-135m")
    mlps = [mlp for _, mlp in target_mlps(model, 4)]
    gate_up = torch.stack([p.weight.detach() for mlp in mlps for p in (mlp.gate_proj, mlp.up_proj)])
    down = torch.stack([mlp.down_proj.weight.detach() for mlp in mlps])
    return [gate_up.contiguous(), down.contiguous()]


@pytest.fixture(scope="module")
def smollm2_exact_top(smollm2_stacks) -> list[torch.Tensor]:
    return [torch.linalg.svdvals(w)[:, :R] for w in smollm2_stacks]


def _max_rel_err(s_list, s_ref_list) -> float:
    return max(((s[:, :R] - s0).abs() / s0).max().item() for s, s0 in zip(s_list, s_ref_list))


@pytest.mark.parametrize("method", list(METHODS))
def test_bench_rsvd_smollm2(benchmark, method, smollm2_stacks, smollm2_exact_top):
    fn = METHODS[method]
    benchmark.group = "rsvd smollm2-135m: 12 matrices, top-6"
    rounds = 3 if method == "exact" else 5  # exact: seconds to minutes per round on a loaded 2-core box
    out = benchmark.pedantic(
        lambda: [fn(w) for w in smollm2_stacks], rounds=rounds, iterations=1, warmup_rounds=int(method != "exact")
    )
    err = _max_rel_err(out, smollm2_exact_top)
    if (median := median_s(benchmark)) is not None:
        _RESULTS.setdefault("smollm2", {})[method] = (median, err)
    if method == "tmem_rsvd":
        assert err < 1e-3


@pytest.fixture(scope="module")
def qwen3_4b_down_like() -> torch.Tensor:
    return torch.randn(4, 9728, 2560, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", list(METHODS))
def test_bench_rsvd_qwen3_4b_shapes(benchmark, method, qwen3_4b_down_like):
    if method == "exact" and not os.environ.get("TMEM_BENCH_QWEN_EXACT"):
        pytest.skip("exact SVD of [4, 9728, 2560] takes minutes here; set TMEM_BENCH_QWEN_EXACT=1")
    fn = METHODS[method]
    benchmark.group = "rsvd qwen3-4b shapes [4, 9728, 2560], top-6 (timing only)"
    benchmark.pedantic(lambda: fn(qwen3_4b_down_like), rounds=1 if method == "exact" else 3, iterations=1)
    if (median := median_s(benchmark)) is not None:
        _RESULTS.setdefault("qwen3-4b", {})[method] = (median, float("nan"))


def test_rsvd_summary():
    """Prints speed-ups over exact and accuracy, side by side (run with -s to see it)."""
    if not _RESULTS:
        pytest.skip("no benchmark ran")
    print(f"\nrsvd, {torch.get_num_threads()} torch threads")
    for suite, res in _RESULTS.items():
        t_exact = res.get("exact", (float("nan"),))[0]
        print(f"  {suite}:")
        for method, (t, err) in res.items():
            print(f"    {method:22s} {t * 1e3:9.1f} ms   x{t_exact / t:6.2f} vs exact   max rel err top-6 {err:.1e}")
