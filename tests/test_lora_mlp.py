"""Triton fused LoRA SwiGLU MLP (`tmem_kernels.lora_mlp`) against the pure-torch spec (`reference`).

Every numeric test takes the `device` fixture (conftest.py): on a CUDA machine the real kernels, on CPU the
Triton interpreter. The spec is `reference` in float64 on the CPU. Shapes are odd on purpose (N, H, I not
multiples of any block; rank 1, 6, 16). fp32: max error <= 2e-5 of the largest magnitude. bf16 and fp16:
within 2e-2 of float64 and within 2x (+4e-3) of the 16-bit torch composition's own error on the same device.

bf16/fp16 under the interpreter: it computes 16-bit tl.dot wrongly and truncates fp32 -> bf16, so there the
kernels upcast dot operands to fp32 and round to nearest even by hand (fp16 is checked the same way).

`test_launch_configs_follow_gpu_rules` checks every launch statically (every tl.dot dimension >= 16,
power-of-2 blocks, rank padded). `test_gpu_compile` compiles every launch the tile selection can pick at
decode and write sizes for an H100 (sm_90) with Triton's own compiler and ptxas (`tools/compile_sm90.py`,
in a subprocess without the interpreter): it fails if a config would not compile there, needs more shared
memory than the card has, or (16-bit) spills registers or serialises its wgmma instructions.
Tests marked `cuda` (CUDA graphs, streams, int64 offsets, TF32) run only on a CUDA device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tmem_kernels import reference as ref
from tmem_kernels import update
from tmem_kernels.lora_mlp import (
    DECODE_ROWS,
    MAX_RANK,
    MIN_DOT,
    KernelConfig,
    LoRAMLPConfig,
    decode_path,
    default_config,
    forward_path,
    launch_configs,
    lora_mlp,
    select_config,
)
from tmem_kernels.tiles import H100_SMS, dot_precision

A_NAMES = ("a_gate", "a_up", "a_down")
B_NAMES = ("b_gate", "b_up", "b_down")
SMALL = LoRAMLPConfig(*[KernelConfig(16, 32, 16, num_warps=2, num_stages=2)] * 4)  # many tiles per dim
SPLIT = KernelConfig(16, 32, 16, num_warps=2, num_stages=2, split_k=4)
SMALL_SPLIT = LoRAMLPConfig(SMALL.fwd_gate_up, SPLIT, SMALL.bwd_dh, SPLIT)  # fwd_down and bwd_dx split-K


def make(n: int, h: int, i: int, r: int, dtype=torch.float32, seed: int = 0, device="cpu") -> tuple[torch.Tensor, dict]:
    """x [n, h] and the nine MLP tensors on `device`, scaled so activations stay O(1)..O(10)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)
    w = dict(
        w_gate=rnd(i, h) / h**0.5, w_up=rnd(i, h) / h**0.5, w_down=rnd(h, i) / i**0.5,
        a_gate=rnd(r, h) / h**0.5, b_gate=rnd(i, r), a_up=rnd(r, h) / h**0.5, b_up=rnd(i, r),
        a_down=rnd(r, i) / i**0.5, b_down=rnd(h, r),
    )  # fmt: skip
    return rnd(n, h).to(device, dtype), {k: v.to(device, dtype) for k, v in w.items()}


def grad_out(n: int, h: int, seed: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(n, h, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max(1, max |b|), in float64 on the CPU."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


def run_triton(x, w, dy, scaling=1.0, train_a=False, need_dx=True, sgd_lr=None, config=None):
    """Forward + backward through the fused op; returns (y, grads dict, the (updated) B tensors)."""
    x_ = x.clone().requires_grad_(need_dx)
    w_ = {k: v.clone() for k, v in w.items()}
    for k in B_NAMES:
        w_[k].requires_grad_(True)
    for k in A_NAMES:
        w_[k].requires_grad_(train_a)
    y = lora_mlp(x_, **w_, scaling=scaling, sgd_lr=sgd_lr, config=config)
    y.backward(dy)
    grads = {"dx": x_.grad} | {"d" + k: w_[k].grad for k in A_NAMES + B_NAMES}
    return y.detach(), grads, {k: w_[k].detach() for k in B_NAMES}


def reference_grads(x, w, dy, scaling=1.0, train_a=False) -> dict:
    g = ref.lora_mlp_backward(x, **w, dy=dy, scaling=scaling, train_a=train_a)
    return {"dx": g.dx, "db_gate": g.db_gate, "db_up": g.db_up, "db_down": g.db_down,
            "da_gate": g.da_gate, "da_up": g.da_up, "da_down": g.da_down}  # fmt: skip


def exact(x, w, dy, scaling=1.0, train_a=False) -> dict:
    """The spec in float64 on the CPU: {"y", "dx", "db_*", "da_*"}."""
    x64, dy64 = x.detach().cpu().double(), dy.detach().cpu().double()
    w64 = {k: v.detach().cpu().double() for k, v in w.items()}
    return {"y": ref.lora_mlp(x64, **w64, scaling=scaling)} | reference_grads(x64, w64, dy64, scaling, train_a)


# ------------------------------------------------------------------------------------------------
# fp32: tight
# ------------------------------------------------------------------------------------------------

FP32_TOL = 2e-5


@pytest.mark.parametrize("r", [1, 6, 16])
@pytest.mark.parametrize("config", [None, SMALL, SMALL_SPLIT], ids=["default", "small-tiles", "split-k"])
def test_fp32_forward_backward_train_a(r, config, device):
    x, w = make(37, 40, 56, r, device=device)
    dy = grad_out(37, 40, 1, device=device)
    y, got, _ = run_triton(x, w, dy, scaling=0.5, train_a=True, config=config)
    assert y.shape == (37, 40) and y.dtype == torch.float32 and y.device == x.device
    want = exact(x, w, dy, scaling=0.5, train_a=True)
    got = {"y": y} | got
    for name, value in want.items():
        assert got[name] is not None and got[name].shape == value.shape, name
        assert rel_err(got[name], value) < FP32_TOL, (name, rel_err(got[name], value))


@pytest.mark.parametrize("n, h, i", [(1, 24, 40), (45, 33, 50)])
def test_fp32_b_only_odd_shapes(n, h, i, device):
    """A frozen (the TMEM default): A gets no grad; N = 1 (one token) and shapes spanning several tiles."""
    x, w = make(n, h, i, 6, seed=3, device=device)
    dy = grad_out(n, h, 4, device=device)
    y, got, _ = run_triton(x, w, dy, config=SMALL)
    want = exact(x, w, dy)
    assert rel_err(y, want["y"]) < FP32_TOL
    for name in ("dx", "db_gate", "db_up", "db_down"):
        assert rel_err(got[name], want[name]) < FP32_TOL, name
    assert all(got[k] is None for k in ("da_gate", "da_up", "da_down"))


def test_no_dx_first_adapted_layer(device):
    """x without grad (backward stops at the first adapted layer): the B grads are still right."""
    x, w = make(29, 40, 56, 6, seed=5, device=device)
    dy = grad_out(29, 40, 6, device=device)
    _, got, _ = run_triton(x, w, dy, need_dx=False, config=SMALL_SPLIT)
    want = exact(x, w, dy)
    assert got["dx"] is None
    for name in ("db_gate", "db_up", "db_down"):
        assert rel_err(got[name], want[name]) < FP32_TOL, name


def test_train_a_without_dx(device):
    x, w = make(29, 40, 56, 6, seed=7, device=device)
    dy = grad_out(29, 40, 8, device=device)
    _, got, _ = run_triton(x, w, dy, train_a=True, need_dx=False, config=SMALL)
    want = exact(x, w, dy, train_a=True)
    for name in ("db_gate", "db_up", "db_down", "da_gate", "da_up", "da_down"):
        assert rel_err(got[name], want[name]) < FP32_TOL, name


def test_inference_no_grad_and_empty_batch(device):
    x, w = make(21, 40, 56, 6, seed=9, device=device)
    with torch.no_grad():
        y = lora_mlp(x, **w, scaling=2.0)
    assert rel_err(y, exact(x, w, x, scaling=2.0)["y"]) < FP32_TOL
    assert lora_mlp(x[:0], **w).shape == (0, 40)


# ------------------------------------------------------------------------------------------------
# Tiles by shape, split-K, the decode path, the fp32 dot precision
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train_a", [False, True])
def test_split_k_with_tails(dtype, train_a, device):
    """fwd_down and bwd_dx split their reduction over I (7 K blocks into 4 splits of 2, 2, 2, 1; bwd_dx not
    split when A trains): same result as the spec; the split launches are the ones listed."""
    n, h, i = 37, 40, 100
    lc = launch_configs(n, h, i, 6, dtype, SMALL_SPLIT, train_a=train_a)
    assert lc["fwd_down"]["grid"][2] == 4 and lc["fwd_down"]["k_split"] == 32 and "fwd_down_reduce" in lc
    assert (lc["bwd_dx"]["grid"][2], "bwd_dx_reduce" in lc) == ((1, False) if train_a else (4, True))
    x, w = make(n, h, i, 6, dtype=dtype, seed=40, device=device)
    dy = grad_out(n, h, 41, dtype, device)
    y, got, _ = run_triton(x, w, dy, scaling=0.5, train_a=train_a, config=SMALL_SPLIT)
    want = exact(x, w, dy, scaling=0.5, train_a=train_a)
    got = {"y": y} | got
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    for name, value in want.items():
        if value is not None:
            assert rel_err(got[name], value) < tol, (name, rel_err(got[name], value))
    unsplit, _, _ = run_triton(x, w, dy, scaling=0.5, train_a=train_a, config=SMALL)
    assert rel_err(y, unsplit) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_selected_tiles_at_a_write_size(device):
    """The tiles `select_config` picks for a few rows of a write (fwd_down's 128 x 128 tile halved to 64 x 64,
    then its reduction split 8 ways on an H100; bwd_dx likewise) give the spec's result, in 16-bit too."""
    n, h, i = 100, 128, 1024
    cfg = select_config(n, h, i, torch.bfloat16, H100_SMS)
    lc = launch_configs(n, h, i, 6, torch.bfloat16, cfg)
    assert (cfg.fwd_down.block_m, cfg.fwd_down.block_n, lc["fwd_down"]["constexprs"]["SPLIT_K"]) == (64, 64, 8)
    assert lc["bwd_dx"]["constexprs"]["SPLIT_K"] == 8
    for dtype in (torch.float32, torch.bfloat16):
        x, w = make(n, h, i, 6, dtype=dtype, seed=42, device=device)
        dy = grad_out(n, h, 43, dtype, device)
        y, got, _ = run_triton(x, w, dy)  # config=None: select_config for this card
        want = exact(x, w, dy)
        for name, value in ({"y": y} | got).items():
            if value is not None:
                assert rel_err(value, want[name]) < (FP32_TOL if dtype == torch.float32 else BF16_TOL), name


def test_select_config_fills_the_card():
    """Decode sizes get 16-row tiles; an under-filled grid gets smaller tiles and then split-K; a large write
    keeps the default tiles (no split)."""
    for h, i in ((576, 1536), (2560, 9728)):
        for n in (1, DECODE_ROWS):
            cfg = select_config(n, h, i, torch.bfloat16)
            assert all(getattr(cfg, k).block_m == 16 for k in ("fwd_gate_up", "fwd_down", "bwd_dh", "bwd_dx"))
            lc = launch_configs(n, h, i, 6, torch.bfloat16, cfg)
            assert lc["fwd_down"]["constexprs"]["SPLIT_K"] > 1
        big = launch_configs(4096, h, i, 6, torch.bfloat16)
        assert big["fwd_down"]["constexprs"]["SPLIT_K"] == 1 and "fwd_down_reduce" not in big
    before = launch_configs(152, 576, 1536, 6, torch.bfloat16, default_config(torch.bfloat16))["fwd_down"]["grid"]
    after = launch_configs(152, 576, 1536, 6, torch.bfloat16)["fwd_down"]["grid"]
    assert before == (2, 5, 1) and after[0] * after[1] * after[2] >= H100_SMS  # was 10 programs on 132 SMs
    assert select_config(152, 576, 1536, torch.bfloat16, sms=8) != select_config(152, 576, 1536, torch.bfloat16)
    with pytest.raises(ValueError, match="cannot split"):
        LoRAMLPConfig(SPLIT, SPLIT, SPLIT, SPLIT)
    with pytest.raises(ValueError, match="decode"):
        LoRAMLPConfig(*[SMALL.fwd_down] * 4, decode="gemv")


@pytest.mark.parametrize("n", [1, DECODE_ROWS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_paths_agree(n, dtype, device):
    """Inference at decode sizes: the fused kernels (decode tiles, split-K) and the cuBLAS path give the
    spec's result; the rule picks cuBLAS on CUDA only, and never when a gradient is needed."""
    x, w = make(n, 72, 200, 6, dtype=dtype, seed=44, device=device)
    cfg = select_config(n, 72, 200, dtype)
    fused, cublas = (LoRAMLPConfig(cfg.fwd_gate_up, cfg.fwd_down, cfg.bwd_dh, cfg.bwd_dx, decode=d)
                     for d in ("fused", "cublas"))  # fmt: skip
    assert decode_path(n, x.device, cfg) == ("cublas" if x.device.type == "cuda" else "fused")
    assert decode_path(DECODE_ROWS + 1, torch.device("cuda"), cfg) == "fused"
    assert decode_path(n, x.device, fused) == "fused" and decode_path(n, x.device, cublas) == "cublas"
    want = exact(x, w, x)["y"]
    with torch.no_grad():
        ys = [lora_mlp(x, **w, config=c) for c in (fused, cublas, None)]
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    for y in ys:
        assert y.shape == (n, 72) and y.dtype == dtype and rel_err(y, want) < tol


def test_forward_path_is_one_choice_for_the_function_and_the_op(device, monkeypatch):
    """`forward_path` is where `lora_mlp` and the op `tmem::lora_mlp_triton` both choose the cuBLAS path or the
    fused kernels: an inference call takes `decode_path`'s answer, a call a backward follows runs fused. With
    $TMEM_DECODE_PATH=cublas both run the torch composition in inference: bitwise the reference's result."""
    from tmem_kernels.library import lora_mlp_triton

    x, w = make(3, 72, 200, 6, seed=45, device=device)
    cfg = select_config(3, 72, 200, torch.float32)
    for d in ("fused", "cublas"):
        pinned = LoRAMLPConfig(cfg.fwd_gate_up, cfg.fwd_down, cfg.bwd_dh, cfg.bwd_dx, decode=d)
        assert forward_path(x, pinned, save=False) == d and forward_path(x, pinned, save=True) == "fused"
    monkeypatch.setenv("TMEM_DECODE_PATH", "cublas")
    assert forward_path(x, cfg, save=False) == "cublas" and forward_path(x, cfg, save=True) == "fused"
    want = ref.lora_mlp(x, **w, scaling=0.5)
    with torch.no_grad():
        got = [lora_mlp(x, **w, scaling=0.5), lora_mlp_triton(x, *w.values(), 0.5)]
    assert all(torch.equal(y, want) for y in got)


def test_dot_precision_follows_torch():
    cfg = default_config(torch.float32)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert dot_precision(torch.float32, cfg) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert dot_precision(torch.float32, cfg) == "tf32"
        pinned = LoRAMLPConfig(cfg.fwd_gate_up, cfg.fwd_down, cfg.bwd_dh, cfg.bwd_dx, fp32_precision="ieee")
        assert dot_precision(torch.float32, pinned) == "ieee"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert dot_precision(torch.bfloat16, cfg) == "tf32"  # ignored for 16-bit operands
    with pytest.raises(ValueError, match="fp32_precision"):
        LoRAMLPConfig(cfg.fwd_gate_up, cfg.fwd_down, cfg.bwd_dh, cfg.bwd_dx, fp32_precision="bf16x3")


def test_forward_is_deterministic(device):
    """Same inputs, same bits: y and dx (split-K sums its partials in a fixed order; only the factor
    gradients use atomics)."""
    x, w = make(45, 72, 200, 6, dtype=torch.bfloat16, seed=45, device=device)
    dy = grad_out(45, 72, 46, torch.bfloat16, device)
    assert launch_configs(45, 72, 200, 6, torch.bfloat16)["fwd_down"]["constexprs"]["SPLIT_K"] > 1
    first, grads, _ = run_triton(x, w, dy)
    again, grads2, _ = run_triton(x, w, dy)
    assert torch.equal(first, again) and torch.equal(grads["dx"], grads2["dx"])


# ------------------------------------------------------------------------------------------------
# In-backward SGD on B
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train_a", [False, True])
def test_sgd_lr_updates_b_in_place(train_a, device):
    x, w = make(37, 40, 56, 6, seed=10, device=device)
    dy = grad_out(37, 40, 11, device=device)
    lr = 0.05
    y, got, new_b = run_triton(x, w, dy, scaling=0.5, train_a=train_a, sgd_lr=lr, config=SMALL)
    want = exact(x, w, dy, scaling=0.5, train_a=train_a)
    assert rel_err(y, want["y"]) < FP32_TOL
    assert rel_err(got["dx"], want["dx"]) < FP32_TOL  # computed with the old B
    for k in B_NAMES:
        assert got["d" + k] is None, "sgd_lr must not hand autograd a dB"
        assert rel_err(new_b[k], w[k].cpu().double() - lr * want["d" + k]) < FP32_TOL, k
    for k in A_NAMES:
        if train_a:
            assert rel_err(got["d" + k], want["d" + k]) < FP32_TOL, k
        else:
            assert got["d" + k] is None


def test_sgd_lr_several_steps_match_reference_sgd(device):
    """A 3-step SGD write on the same batch: B after each step equals reference SGD's B."""
    x, w = make(20, 24, 40, 6, seed=12, device=device)
    w["b_gate"].zero_(), w["b_up"].zero_(), w["b_down"].zero_()  # TMEM init: B0 = 0
    target = grad_out(20, 24, 13, device=device)
    lr = 0.1
    fused = {k: v.clone() for k, v in w.items()}
    torch_b = [w[k].clone().requires_grad_(True) for k in B_NAMES]
    opt = torch.optim.SGD(torch_b, lr=lr)
    for _ in range(3):
        for k in B_NAMES:
            fused[k].requires_grad_(True)
        y = lora_mlp(x, **fused, sgd_lr=lr)
        ((y - target) ** 2).mean().backward()
        opt.zero_grad()
        yr = ref.lora_mlp(x, **(w | dict(zip(B_NAMES, torch_b))))
        ((yr - target) ** 2).mean().backward()
        opt.step()
        for k, tb in zip(B_NAMES, torch_b):
            assert fused[k].grad is None
            assert rel_err(fused[k], tb) < FP32_TOL, k
    assert fused["b_gate"].abs().max() > 0  # it did move


def test_sgd_lr_bumps_version_counter(device):
    """B changed in place: a second graph that saved the old B must refuse to backprop through it."""
    x, w = make(8, 40, 56, 6, seed=14, device=device)
    for k in B_NAMES:
        w[k].requires_grad_(True)
    before = w["b_gate"]._version
    lora_mlp(x, **w, sgd_lr=0.1).sum().backward()
    assert w["b_gate"]._version > before


# ------------------------------------------------------------------------------------------------
# bf16 / fp16: judged against float64 and against the 16-bit torch composition's own error
# ------------------------------------------------------------------------------------------------

BF16_TOL = 2e-2


@pytest.mark.parametrize(
    "r, dtype", [(1, torch.bfloat16), (6, torch.bfloat16), (16, torch.bfloat16), (6, torch.float16)]
)
def test_16bit_forward_backward(r, dtype, device):
    x, w = make(37, 40, 56, r, dtype=dtype, seed=20 + r, device=device)
    dy = grad_out(37, 40, 2, dtype, device)
    y, got, _ = run_triton(x, w, dy, train_a=True, config=SMALL if r == 6 else None)
    assert y.dtype == dtype
    want = exact(x, w, dy, train_a=True)
    torch_16 = {"y": ref.lora_mlp(x, **w)} | reference_grads(x, w, dy, train_a=True)  # same device, same dtype
    got = {"y": y} | got
    for name, value in want.items():
        assert got[name].dtype == dtype, name
        err, base = rel_err(got[name], value), rel_err(torch_16[name], value)
        assert err < BF16_TOL, (name, err)
        assert err < 2 * base + 4e-3, (name, err, base)  # no worse than the 16-bit torch composition


def test_bf16_sgd_lr(device):
    x, w = make(37, 40, 56, 6, dtype=torch.bfloat16, seed=30, device=device)
    dy = grad_out(37, 40, 31, torch.bfloat16, device)
    _, got, new_b = run_triton(x, w, dy, sgd_lr=0.01)
    want = exact(x, w, dy)
    for k in B_NAMES:
        assert new_b[k].dtype == torch.bfloat16 and got["d" + k] is None
        assert rel_err(new_b[k], w[k].cpu().double() - 0.01 * want["d" + k]) < BF16_TOL, k


# ------------------------------------------------------------------------------------------------
# CUDA only: graphs, streams, int64 offsets, TF32
# ------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("n", [5, 152])
def test_cuda_graph_replay_matches_eager(n, device):
    """A training step (fused forward + backward with in-backward SGD on B) captured once and replayed 3
    times equals 3 eager steps; N = 5 runs the decode tiles, N = 152 the split-K write tiles."""
    x, w = make(n, 576, 1536, 6, dtype=torch.bfloat16, seed=50, device=device)
    dy = grad_out(n, 576, 51, torch.bfloat16, device)
    lr = 1e-2

    def step(b: dict) -> torch.Tensor:
        for k in B_NAMES:
            b[k].requires_grad_(True)
        xg = x.clone().requires_grad_(True)
        y = lora_mlp(xg, **(w | b), sgd_lr=lr)
        y.backward(dy)
        return y.detach(), xg.grad

    eager = {k: w[k].clone() for k in B_NAMES}
    for _ in range(3):
        y_eager, dx_eager = step(eager)
    static = {k: w[k].clone() for k in B_NAMES}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles, allocator) outside the capture
        step({k: v.clone() for k, v in static.items()})
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static, dx_static = step(static)
    # capture does not run the work: B is still the initial B; three replays are three steps
    assert torch.equal(static["b_gate"], w["b_gate"])
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert rel_err(y_static, y_eager) < 1e-2 and rel_err(dx_static, dx_eager) < 1e-2
    for k in B_NAMES:
        assert rel_err(static[k], eager[k]) < 1e-2, k
        assert not torch.equal(static[k], w[k]), k


@pytest.mark.cuda
def test_update_kernels_replay_in_a_graph(device):
    """AdamW with step and lr as device tensors: captured once, replayed 5 times = 5 eager steps."""
    p0 = grad_out(1, 4099, 52, device=device).flatten()
    grads = grad_out(1, 4099, 53, device=device).flatten()
    eager, m1, v1 = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for step in range(1, 6):
        update.adamw_step_(eager, grads, m1, v1, step, 1e-2)
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    step_t, lr_t = torch.zeros(1, device=device), torch.full((1,), 1e-2, device=device)
    graph = torch.cuda.CUDAGraph()
    update.adamw_step_(p.clone(), grads, m.clone(), v.clone(), torch.ones(1, device=device), lr_t)  # compile
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        step_t += 1
        update.adamw_step_(p, grads, m, v, step_t, lr_t)
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    assert step_t.item() == 5 and rel_err(p, eager) < 3e-6


@pytest.mark.cuda
def test_side_stream_gives_the_same_result(device):
    """Launched on a non-default stream (as a serving engine would), the kernels honour it."""
    x, w = make(300, 576, 1536, 6, dtype=torch.bfloat16, seed=54, device=device)
    dy = grad_out(300, 576, 55, torch.bfloat16, device)
    y_main, g_main, _ = run_triton(x, w, dy)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(10_000_000)  # keep the side stream busy: a launch on the wrong stream would race
        y_side, g_side, _ = run_triton(x, w, dy)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(y_main, y_side) and torch.equal(g_main["dx"], g_side["dx"])
    for k in B_NAMES:
        assert rel_err(g_side["d" + k], g_main["d" + k]) < 1e-3, k


@pytest.mark.cuda
def test_int64_offsets_past_2_31_elements(device):
    """N x I > 2^31 (gate, up, h each hold more elements than an int32 offset reaches): the first and last
    rows of y and dx match the spec, and dB matches a chunked fp32 torch reference."""
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip(f"needs ~30 GiB free on the GPU, {free / 2**30:.0f} GiB free")
    h, i = 64, 65536
    n = 2**31 // i + 64  # 32832 rows: n * i = 2^31 + 2^22
    x, w = make(n, h, i, 6, dtype=torch.bfloat16, seed=56, device=device)
    dy = grad_out(n, h, 57, torch.bfloat16, device) * 0.1
    y, got, _ = run_triton(x, w, dy)
    rows = torch.cat([torch.arange(0, 64), torch.arange(n - 64, n)]).to(device)
    want = exact(x[rows], w, dy[rows])
    assert rel_err(y[rows], want["y"]) < BF16_TOL and rel_err(got["dx"][rows], want["dx"]) < BF16_TOL
    chunked = {k: torch.zeros_like(w[k], dtype=torch.float32) for k in B_NAMES}
    w32 = {k: v.float() for k, v in w.items()}
    for lo in range(0, n, 4096):
        g = ref.lora_mlp_backward(x[lo : lo + 4096].float(), **w32, dy=dy[lo : lo + 4096].float())
        for k in B_NAMES:
            chunked[k] += getattr(g, "d" + k)
    for k in B_NAMES:
        err = ((got["d" + k].float() - chunked[k]).norm() / chunked[k].norm()).item()
        assert err < 2e-2, (k, err)


@pytest.mark.cuda
def test_tf32_when_torch_allows_it(device):
    """fp32 with torch's matmul precision "high": TF32 tensor-core dots, within TF32's error of float64 and
    not bit-equal to the IEEE result; "highest" stays IEEE-exact."""
    x, w = make(300, 576, 1536, 6, seed=58, device=device)
    want = exact(x, w, x)["y"]
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        with torch.no_grad():
            y_tf32 = lora_mlp(x, **w)
        torch.set_float32_matmul_precision("highest")
        with torch.no_grad():
            y_ieee = lora_mlp(x, **w)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert rel_err(y_ieee, want) < FP32_TOL
    assert rel_err(y_tf32, want) < 1e-2 and not torch.equal(y_tf32, y_ieee)


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors before any launch
# ------------------------------------------------------------------------------------------------


def test_rejects_non_contiguous(device):
    x, w = make(16, 40, 56, 6, device=device)
    with pytest.raises(ValueError, match="x must be contiguous"):
        lora_mlp(torch.randn(40, 16, device=device).t(), **w)
    with pytest.raises(ValueError, match="w_down must be contiguous"):
        lora_mlp(x, **(w | {"w_down": w["w_down"].t().contiguous().t()}))


@pytest.mark.parametrize(
    "name, shape",
    [("w_gate", (55, 40)), ("w_up", (56, 41)), ("w_down", (56, 40)), ("a_up", (5, 40)), ("a_down", (6, 55)),
     ("b_gate", (56, 5)), ("b_down", (40, 7))],
)  # fmt: skip
def test_rejects_wrong_shapes(name, shape, device):
    x, w = make(16, 40, 56, 6, device=device)
    with pytest.raises(ValueError, match=f"{name} has shape"):
        lora_mlp(x, **(w | {name: torch.randn(*shape, device=device)}))


def test_rejects_bad_rank_dims_dtypes_devices(device):
    x, w = make(16, 40, 56, 6, device=device)
    with pytest.raises(ValueError, match="2-D"):
        lora_mlp(x.view(2, 8, 40), **w)
    big = make(16, 40, 56, MAX_RANK + 1, device=device)[1]
    with pytest.raises(ValueError, match="larger than the padded rank block"):
        lora_mlp(x, **big)
    with pytest.raises(ValueError, match="rank"):
        lora_mlp(x, **make(16, 40, 56, 0, device=device)[1])
    with pytest.raises(TypeError, match="mixed dtypes"):
        lora_mlp(x, **(w | {"b_up": w["b_up"].double()}))
    with pytest.raises(TypeError, match="mixed dtypes"):
        lora_mlp(x.bfloat16(), **w)
    with pytest.raises(TypeError, match="not supported"):
        lora_mlp(x.double(), **{k: v.double() for k, v in w.items()})
    with pytest.raises(ValueError, match="mixed devices"):
        lora_mlp(x, **(w | {"a_gate": w["a_gate"].to("meta")}))
    with pytest.raises(ValueError, match="requires grad"):
        lora_mlp(x, **(w | {"w_up": w["w_up"].requires_grad_(True)}))
    with pytest.raises(TypeError, match="sgd_lr"):
        lora_mlp(x, **w, sgd_lr=torch.tensor(0.1))
    with pytest.raises(ValueError, match="rank"):
        launch_configs(16, 40, 56, 17)


# ------------------------------------------------------------------------------------------------
# Launch configs: would every one compile on a GPU?
# ------------------------------------------------------------------------------------------------


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r", [1, 6, 8, 9, 16])
@pytest.mark.parametrize("n, h, i", [(1, 24, 40), (16, 576, 1536), (37, 40, 56), (152, 576, 1536),
                                     (512, 576, 1536), (4096, 2560, 9728)])  # fmt: skip
@pytest.mark.parametrize("config", [None, SMALL, SMALL_SPLIT], ids=["selected", "small-tiles", "split-k"])
def test_launch_configs_follow_gpu_rules(n, h, i, r, dtype, config):
    configs = launch_configs(n, h, i, r, dtype, config)
    assert {"fwd_gate_up", "fwd_down", "bwd_dh", "bwd_dx", "sgd_apply"} <= set(configs)
    for name in ("fwd_down", "bwd_dx"):  # a reduce launch exactly when the kernel splits
        assert (name + "_reduce" in configs) == (configs[name]["constexprs"]["SPLIT_K"] > 1)
    for name, c in configs.items():
        for key, value in c["constexprs"].items():
            assert key == "SPLIT_K" or _pow2(value), (name, key, value)
        assert _pow2(c["num_warps"]) and c["num_warps"] <= 16
        for dot in c["dots"]:
            assert min(dot) >= MIN_DOT, (name, dot)  # tl.dot: every dimension >= 16 on a GPU
        pad = c["constexprs"].get("R_PAD") or c["constexprs"].get("RS_PAD")
        if pad is not None:
            assert pad >= MIN_DOT and pad >= (2 * r if "RS_PAD" in c["constexprs"] else r), (name, pad)
    grid = configs["fwd_gate_up"]["grid"]
    bm, bn = configs["fwd_gate_up"]["constexprs"]["BLOCK_M"], configs["fwd_gate_up"]["constexprs"]["BLOCK_N"]
    assert grid[0] * bm >= n and grid[1] * bn >= i
    c = configs["fwd_down"]
    k_split = c.get("k_split", i)
    assert k_split % c["constexprs"]["BLOCK_K"] == 0 or c["constexprs"]["SPLIT_K"] == 1
    assert (c["grid"][2] - 1) * k_split < i <= c["grid"][2] * k_split  # every split has work, all of I covered


def test_default_configs_are_tensor_core_tiles():
    for dtype in (torch.float16, torch.bfloat16):
        for kc in vars(default_config(dtype)).values():
            if isinstance(kc, KernelConfig):
                assert kc.block_m >= 64 and kc.block_n >= 64 and kc.block_k >= 32


H100_SMEM = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)


def test_gpu_compile(tmp_path):
    """Compile every launch the tile selection picks (decode and write sizes, SmolLM2 and Qwen3-4B widths,
    ranks 6 and 16, B-only / train-A / inference variants) for sm_90 without a GPU: bf16 and fp16 without
    register spills or serialised wgmma, fp32 (IEEE and TF32 dots) within the shared memory."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    out = tmp_path / "compile.json"
    proc = subprocess.run([sys.executable, os.path.join(root, "tools", "compile_sm90.py"), "--json", str(out)],
                          env=env, cwd=root, capture_output=True, text=True, timeout=1500)  # fmt: skip
    if "ptxas" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("no ptxas in this Triton install")
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    kernels = {row["kernel"] for row in rows}
    assert kernels == {"fwd_gate_up", "fwd_down", "bwd_dh", "bwd_dx", "fwd_down_reduce", "bwd_dx_reduce",
                       "sgd_apply", "swiglu_fwd", "swiglu_bwd"}  # fmt: skip (and `tmem::swiglu`'s two)
    sizes = {s.split(" r=")[0] for row in rows for s in row["sizes"]}
    assert {"qwen3-4b N=1", "qwen3-4b N=16", "smollm2 N=152", "qwen3-4b N=4096"} <= sizes
    assert {(row["dtype"], row["precision"]) for row in rows} == {
        ("bfloat16", "tf32"), ("float16", "tf32"), ("float32", "ieee"), ("float32", "tf32")}  # fmt: skip
    for row in rows:
        assert row["error"] is None and row["cubin_bytes"] > 0, row
        assert row["shared"] <= H100_SMEM, row
        if row["dtype"] != "float32":
            assert row["spill_bytes"] in (0, None), row
            assert not row["wgmma_serialized"], row
