"""Fused optimizer steps (`tmem_kernels.update`) against `reference` and torch.optim, over several steps.

On the `device` fixture's device (conftest.py): CUDA, or the CPU under TRITON_INTERPRET=1. fp32: within
1e-6 relative (a few ulps) of torch.optim.SGD / torch.optim.AdamW after 5 steps, with lr and step as
numbers and as 1-element tensors (the CUDA-graph form); bf16 storage: within 1e-2 of the fp32 reference.
Odd sizes so the last block is partial; one launch per step.
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
from tmem_kernels.update import adamw_step_, launch_config, sgd_step_

SIZES = [1, 1000, 3 * 1024 + 7]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


def grads(n: int, steps: int, seed: int = 0, device="cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).to(device) for _ in range(steps)]


def randn(*shape: int, seed: int, device="cpu") -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("lr_as_tensor", [False, True])
def test_sgd_matches_reference_and_torch(n, weight_decay, lr_as_tensor, device):
    p0 = randn(n, seed=1, device=device)
    mine, spec = p0.clone(), p0.clone()
    theirs = p0.clone().requires_grad_(True)
    opt = torch.optim.SGD([theirs], lr=0.05, weight_decay=weight_decay)
    lr = torch.tensor([0.05], device=device) if lr_as_tensor else 0.05
    for g in grads(n, 5, device=device):
        sgd_step_(mine, g, lr, weight_decay)
        ref.sgd_step_(spec, g, 0.05, weight_decay)
        theirs.grad = g.clone()
        opt.step()
        assert rel_err(mine, spec) < 1e-6
        assert rel_err(mine, theirs.detach()) < 1e-6


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("as_tensors", [False, True], ids=["numbers", "tensors"])
def test_adamw_matches_reference_and_torch(n, as_tensors, device):
    p0 = randn(n, seed=2, device=device)
    mine, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    spec, ms, vs = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    theirs = p0.clone().requires_grad_(True)
    kw = dict(beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.05)
    opt = torch.optim.AdamW([theirs], lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
    step_t, lr_t = torch.zeros(1, device=device), torch.tensor([1e-2], device=device)
    for step, g in enumerate(grads(n, 5, seed=3, device=device), start=1):
        if as_tensors:
            step_t += 1  # what a captured CUDA graph does between replays
            adamw_step_(mine, g, m, v, step_t, lr_t, **kw)
        else:
            adamw_step_(mine, g, m, v, step, 1e-2, **kw)
        ref.adamw_step_(spec, g, ms, vs, step, 1e-2, **kw)
        theirs.grad = g.clone()
        opt.step()
        state = opt.state[theirs]
        tol = 1e-6 if not as_tensors else 3e-6  # bias corrections in fp32 on the device
        assert rel_err(mine, spec) < tol and rel_err(mine, theirs.detach()) < tol
        assert rel_err(m, state["exp_avg"]) < 1e-6 and rel_err(v, state["exp_avg_sq"]) < 1e-6
        assert rel_err(m, ms) < 1e-6 and rel_err(v, vs) < 1e-6


def test_adamw_default_hyperparameters_and_2d_buffer(device):
    """Any-shape contiguous buffer (the flat adapter buffer may be viewed 2-D); reference defaults."""
    p0 = randn(37, 29, seed=4, device=device)
    mine, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    spec, ms, vs = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for step, g in enumerate(grads(37 * 29, 3, seed=5, device=device), start=1):
        g = g.view(37, 29)
        adamw_step_(mine, g, m, v, step, 3e-3)
        ref.adamw_step_(spec, g, ms, vs, step, 3e-3)
    assert rel_err(mine, spec) < 1e-6


def test_adamw_integer_step_tensor(device):
    """An int64 step tensor (not just torch's float32 `capturable` one) reads the same in the kernel."""
    p0 = randn(300, seed=8, device=device)
    mine, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    spec, ms, vs = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for step, g in enumerate(grads(300, 3, seed=9, device=device), start=1):
        step_t = torch.tensor([step], dtype=torch.int64, device=device)
        adamw_step_(mine, g, m, v, step_t, torch.tensor([1e-2], device=device))
        ref.adamw_step_(spec, g, ms, vs, step, 1e-2)
    assert rel_err(mine, spec) < 3e-6


def test_bf16_storage(device):
    n = 2049
    p0 = randn(n, seed=6, device=device)
    spec, ms, vs = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    mine, m, v = p0.bfloat16(), torch.zeros_like(p0, dtype=torch.bfloat16), torch.zeros_like(p0, dtype=torch.bfloat16)
    sgd_mine, sgd_spec = p0.bfloat16(), p0.clone()
    for step, g in enumerate(grads(n, 3, seed=7, device=device), start=1):
        adamw_step_(mine, g.bfloat16(), m, v, step, 1e-2)
        ref.adamw_step_(spec, g.bfloat16().float(), ms, vs, step, 1e-2)
        sgd_step_(sgd_mine, g.bfloat16(), 0.1)
        ref.sgd_step_(sgd_spec, g.bfloat16().float(), 0.1)
    assert mine.dtype == m.dtype == torch.bfloat16
    assert rel_err(mine, spec) < 1e-2 and rel_err(sgd_mine, sgd_spec) < 1e-2


def test_one_launch_per_step():
    assert launch_config(3 * 1024 + 7)["grid"] == (4,)
    assert launch_config(1)["grid"] == (1,)
    c = launch_config(10**7)
    assert c["constexprs"]["BLOCK"] & (c["constexprs"]["BLOCK"] - 1) == 0 and c["num_warps"] in (1, 2, 4, 8)


def test_empty_buffer_is_a_no_op(device):
    p = torch.zeros(0, device=device)
    sgd_step_(p, p.clone(), 0.1)
    adamw_step_(p, p.clone(), p.clone(), p.clone(), 1, 0.1)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def test_rejects_bad_input(device):
    p, g = torch.zeros(64, device=device), torch.zeros(64, device=device)
    m, v = torch.zeros(64, device=device), torch.zeros(64, device=device)
    with pytest.raises(ValueError, match="contiguous"):
        sgd_step_(torch.zeros(8, 8, device=device).t(), torch.zeros(8, 8, device=device), 0.1)
    with pytest.raises(ValueError, match="grad has shape"):
        sgd_step_(p, torch.zeros(63, device=device), 0.1)
    with pytest.raises(TypeError, match="mixed dtypes"):
        sgd_step_(p, g.double(), 0.1)
    with pytest.raises(TypeError, match="not supported"):
        sgd_step_(p.double(), g.double(), 0.1)
    with pytest.raises(ValueError, match="mixed devices"):
        sgd_step_(p, g.to("meta"), 0.1)
    with pytest.raises(ValueError, match="exactly 1 element"):
        sgd_step_(p, g, torch.tensor([0.1, 0.2], device=device))
    with pytest.raises(TypeError, match="lr must be a number"):
        sgd_step_(p, g, "0.1")
    with pytest.raises(ValueError, match="exp_avg_sq has shape"):
        adamw_step_(p, g, m, torch.zeros(32, device=device), 1, 0.1)
    with pytest.raises(TypeError, match="mixed dtypes"):
        adamw_step_(p, g, m.bfloat16(), v, 1, 0.1)
    with pytest.raises(ValueError, match="step counts from 1"):
        adamw_step_(p, g, m, v, 0, 0.1)
    with pytest.raises(ValueError, match="is on"):
        adamw_step_(p, g, m, v, torch.ones(1, device="meta"), 0.1)
    with pytest.raises(ValueError, match="beta2"):
        adamw_step_(p, g, m, v, 1, 0.1, beta2=1.0)
    assert p.abs().max() == 0 and m.abs().max() == 0  # nothing ran


# ------------------------------------------------------------------------------------------------
# GPU compile check (sm_90, Triton's own compiler + ptxas, no GPU needed)
# ------------------------------------------------------------------------------------------------

_COMPILE_SCRIPT = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tmem_kernels import update as U

out = {}
for dt in ("fp32", "bf16"):
    for name, fn, flags in (
        ("sgd", U._sgd_kernel, {"LR_IS_PTR": True, "HAS_WD": True}),
        ("adamw", U._adamw_kernel, {"LR_IS_PTR": True, "STEP_IS_PTR": True}),
        ("adamw_host", U._adamw_kernel, {"LR_IS_PTR": False, "STEP_IS_PTR": False}),
    ):
        constexprs = dict(flags, BLOCK=U.BLOCK, INTERPRET=False)
        constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
        sig = {}
        for a in fn.arg_names:
            if a in constexprs:
                sig[a] = "constexpr"
            elif a in ("lr_ptr", "step_ptr"):
                sig[a] = "*fp32"
            elif a.endswith("_ptr"):
                sig[a] = "*" + dt
            elif a == "numel":
                sig[a] = "i64"
            else:
                sig[a] = "fp32"
        k = triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": U.NUM_WARPS})
        out[f"{name}_{dt}"] = len(k.asm["cubin"])
print(json.dumps(out))
"""


def test_gpu_compile():
    """Both kernels, every constexpr variant used on a GPU, compile for sm_90 (bf16 and fp32 buffers)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, cwd=root, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    if proc.returncode != 0 and "ptxas" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("no ptxas in this Triton install")
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result) == 6 and all(v > 0 for v in result.values())
    assert update.BLOCK >= 128
