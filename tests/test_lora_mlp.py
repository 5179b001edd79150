"""Triton fused LoRA SwiGLU MLP (`tmem_kernels.lora_mlp`) against the pure-torch spec (`reference`).

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py). Shapes are odd on purpose (N, H, I
not multiples of any block; rank 1, 6, 16). fp32: tight, max error <= 2e-5 of the largest magnitude.
bf16 and fp16 results are checked against a float64 reference (2e-2 of the largest magnitude) and must be
within 2x (+4e-3) of the 16-bit torch composition's own error.

bf16/fp16: the interpreter computes 16-bit tl.dot wrongly and truncates fp32 -> bf16, so under it the
kernels upcast dot operands to fp32 and round to nearest even by hand (fp16 is checked the same way).

`test_launch_configs_follow_gpu_rules` checks every launch statically (every tl.dot dimension >= 16,
power-of-2 blocks, rank padded). `test_gpu_compile` compiles every kernel ahead of time for an H100
(sm_90, default tiles, Qwen3-4B shapes) with Triton's own compiler and ptxas, in a subprocess without the
interpreter: it fails if a config would not compile there, needs more shared memory than the card has,
or (16-bit) spills registers or serialises its wgmma instructions. Nothing here times the kernels on a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tmem_kernels import reference as ref
from tmem_kernels.lora_mlp import (
    MAX_RANK,
    MIN_DOT,
    KernelConfig,
    LoRAMLPConfig,
    default_config,
    launch_configs,
    lora_mlp,
)

A_NAMES = ("a_gate", "a_up", "a_down")
B_NAMES = ("b_gate", "b_up", "b_down")
SMALL = LoRAMLPConfig(*[KernelConfig(16, 32, 16, num_warps=2, num_stages=2)] * 4)  # many tiles per dim


def make(n: int, h: int, i: int, r: int, dtype=torch.float32, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """x [n, h] and the nine MLP tensors, scaled so activations stay O(1)..O(10)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)
    w = dict(
        w_gate=rnd(i, h) / h**0.5, w_up=rnd(i, h) / h**0.5, w_down=rnd(h, i) / i**0.5,
        a_gate=rnd(r, h) / h**0.5, b_gate=rnd(i, r), a_up=rnd(r, h) / h**0.5, b_up=rnd(i, r),
        a_down=rnd(r, i) / i**0.5, b_down=rnd(h, r),
    )  # fmt: skip
    return rnd(n, h).to(dtype), {k: v.to(dtype) for k, v in w.items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max(1, max |b|)."""
    return (a.double() - b.double()).abs().max().item() / max(1.0, b.double().abs().max().item())


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


# ------------------------------------------------------------------------------------------------
# fp32: tight
# ------------------------------------------------------------------------------------------------

FP32_TOL = 2e-5


@pytest.mark.parametrize("r", [1, 6, 16])
@pytest.mark.parametrize("config", [None, SMALL], ids=["default", "small-tiles"])
def test_fp32_forward_backward_train_a(r, config):
    x, w = make(37, 40, 56, r)
    dy = torch.randn(37, 40, generator=torch.Generator().manual_seed(1))
    y, got, _ = run_triton(x, w, dy, scaling=0.5, train_a=True, config=config)
    assert y.shape == (37, 40) and y.dtype == torch.float32
    assert rel_err(y, ref.lora_mlp(x, **w, scaling=0.5)) < FP32_TOL
    want = reference_grads(x, w, dy, scaling=0.5, train_a=True)
    for name, value in want.items():
        assert got[name] is not None and got[name].shape == value.shape, name
        assert rel_err(got[name], value) < FP32_TOL, (name, rel_err(got[name], value))


@pytest.mark.parametrize("n, h, i", [(1, 24, 40), (45, 33, 50)])
def test_fp32_b_only_odd_shapes(n, h, i):
    """A frozen (the TMEM default): A gets no grad; N = 1 (one token) and shapes spanning several tiles."""
    x, w = make(n, h, i, 6, seed=3)
    dy = torch.randn(n, h, generator=torch.Generator().manual_seed(4))
    y, got, _ = run_triton(x, w, dy, config=SMALL)
    assert rel_err(y, ref.lora_mlp(x, **w)) < FP32_TOL
    want = reference_grads(x, w, dy)
    for name in ("dx", "db_gate", "db_up", "db_down"):
        assert rel_err(got[name], want[name]) < FP32_TOL, name
    assert all(got[k] is None for k in ("da_gate", "da_up", "da_down"))


def test_no_dx_first_adapted_layer():
    """x without grad (backward stops at the first adapted layer): the B grads are still right."""
    x, w = make(29, 40, 56, 6, seed=5)
    dy = torch.randn(29, 40, generator=torch.Generator().manual_seed(6))
    _, got, _ = run_triton(x, w, dy, need_dx=False, config=SMALL)
    want = reference_grads(x, w, dy)
    assert got["dx"] is None
    for name in ("db_gate", "db_up", "db_down"):
        assert rel_err(got[name], want[name]) < FP32_TOL, name


def test_train_a_without_dx():
    x, w = make(29, 40, 56, 6, seed=7)
    dy = torch.randn(29, 40, generator=torch.Generator().manual_seed(8))
    _, got, _ = run_triton(x, w, dy, train_a=True, need_dx=False, config=SMALL)
    want = reference_grads(x, w, dy, train_a=True)
    for name in ("db_gate", "db_up", "db_down", "da_gate", "da_up", "da_down"):
        assert rel_err(got[name], want[name]) < FP32_TOL, name


def test_inference_no_grad_and_empty_batch():
    x, w = make(21, 40, 56, 6, seed=9)
    with torch.no_grad():
        y = lora_mlp(x, **w, scaling=2.0)
    assert rel_err(y, ref.lora_mlp(x, **w, scaling=2.0)) < FP32_TOL
    assert lora_mlp(x[:0], **w).shape == (0, 40)


# ------------------------------------------------------------------------------------------------
# In-backward SGD on B
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train_a", [False, True])
def test_sgd_lr_updates_b_in_place(train_a):
    x, w = make(37, 40, 56, 6, seed=10)
    dy = torch.randn(37, 40, generator=torch.Generator().manual_seed(11))
    lr = 0.05
    y, got, new_b = run_triton(x, w, dy, scaling=0.5, train_a=train_a, sgd_lr=lr, config=SMALL)
    want = reference_grads(x, w, dy, scaling=0.5, train_a=train_a)
    assert rel_err(y, ref.lora_mlp(x, **w, scaling=0.5)) < FP32_TOL
    assert rel_err(got["dx"], want["dx"]) < FP32_TOL  # computed with the old B
    for k in B_NAMES:
        assert got["d" + k] is None, "sgd_lr must not hand autograd a dB"
        assert rel_err(new_b[k], w[k] - lr * want["d" + k]) < FP32_TOL, k
    for k in A_NAMES:
        if train_a:
            assert rel_err(got["d" + k], want["d" + k]) < FP32_TOL, k
        else:
            assert got["d" + k] is None


def test_sgd_lr_several_steps_match_reference_sgd():
    """A 3-step SGD write on the same batch: B after each step equals reference SGD's B."""
    x, w = make(20, 24, 40, 6, seed=12)
    w["b_gate"].zero_(), w["b_up"].zero_(), w["b_down"].zero_()  # TMEM init: B0 = 0
    target = torch.randn(20, 24, generator=torch.Generator().manual_seed(13))
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
            assert rel_err(fused[k].detach(), tb.detach()) < FP32_TOL, k
    assert fused["b_gate"].abs().max() > 0  # it did move


def test_sgd_lr_bumps_version_counter():
    """B changed in place: a second graph that saved the old B must refuse to backprop through it."""
    x, w = make(8, 40, 56, 6, seed=14)
    for k in B_NAMES:
        w[k].requires_grad_(True)
    before = w["b_gate"]._version
    lora_mlp(x, **w, sgd_lr=0.1).sum().backward()
    assert w["b_gate"]._version > before


# ------------------------------------------------------------------------------------------------
# bf16 / fp16 (loose: the interpreter does not emulate 16-bit tl.dot; operands are upcast there)
# ------------------------------------------------------------------------------------------------

BF16_TOL = 2e-2


@pytest.mark.parametrize(
    "r, dtype", [(1, torch.bfloat16), (6, torch.bfloat16), (16, torch.bfloat16), (6, torch.float16)]
)
def test_16bit_forward_backward(r, dtype):
    x, w = make(37, 40, 56, r, dtype=dtype, seed=20 + r)
    dy = torch.randn(37, 40, generator=torch.Generator().manual_seed(2)).to(dtype)
    y, got, _ = run_triton(x, w, dy, train_a=True, config=SMALL if r == 6 else None)
    assert y.dtype == dtype
    x64, w64, dy64 = x.double(), {k: v.double() for k, v in w.items()}, dy.double()
    exact = {"y": ref.lora_mlp(x64, **w64)} | reference_grads(x64, w64, dy64, train_a=True)
    torch_bf16 = {"y": ref.lora_mlp(x, **w)} | reference_grads(x, w, dy, train_a=True)
    got = {"y": y} | got
    for name, value in exact.items():
        assert got[name].dtype == dtype, name
        err, base = rel_err(got[name], value), rel_err(torch_bf16[name], value)
        assert err < BF16_TOL, (name, err)
        assert err < 2 * base + 4e-3, (name, err, base)  # no worse than the bf16 torch composition


def test_bf16_sgd_lr():
    x, w = make(37, 40, 56, 6, dtype=torch.bfloat16, seed=30)
    dy = torch.randn(37, 40, generator=torch.Generator().manual_seed(31)).to(torch.bfloat16)
    _, got, new_b = run_triton(x, w, dy, sgd_lr=0.01)
    want = reference_grads(x.double(), {k: v.double() for k, v in w.items()}, dy.double())
    for k in B_NAMES:
        assert new_b[k].dtype == torch.bfloat16 and got["d" + k] is None
        assert rel_err(new_b[k], w[k].double() - 0.01 * want["d" + k]) < BF16_TOL, k


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors before any launch
# ------------------------------------------------------------------------------------------------


def test_rejects_non_contiguous():
    x, w = make(16, 40, 56, 6)
    with pytest.raises(ValueError, match="x must be contiguous"):
        lora_mlp(torch.randn(40, 16).t(), **w)
    with pytest.raises(ValueError, match="w_down must be contiguous"):
        lora_mlp(x, **(w | {"w_down": w["w_down"].t().contiguous().t()}))


@pytest.mark.parametrize(
    "name, shape",
    [("w_gate", (55, 40)), ("w_up", (56, 41)), ("w_down", (56, 40)), ("a_up", (5, 40)), ("a_down", (6, 55)),
     ("b_gate", (56, 5)), ("b_down", (40, 7))],
)  # fmt: skip
def test_rejects_wrong_shapes(name, shape):
    x, w = make(16, 40, 56, 6)
    with pytest.raises(ValueError, match=f"{name} has shape"):
        lora_mlp(x, **(w | {name: torch.randn(*shape)}))


def test_rejects_bad_rank_dims_dtypes_devices():
    x, w = make(16, 40, 56, 6)
    with pytest.raises(ValueError, match="2-D"):
        lora_mlp(x.view(2, 8, 40), **w)
    big = make(16, 40, 56, MAX_RANK + 1)[1]
    with pytest.raises(ValueError, match="larger than the padded rank block"):
        lora_mlp(x, **big)
    with pytest.raises(ValueError, match="rank"):
        lora_mlp(x, **make(16, 40, 56, 0)[1])
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
@pytest.mark.parametrize("n, h, i", [(1, 24, 40), (37, 40, 56), (512, 576, 1536), (4096, 2560, 9728)])
@pytest.mark.parametrize("config", [None, SMALL], ids=["default", "small-tiles"])
def test_launch_configs_follow_gpu_rules(n, h, i, r, dtype, config):
    configs = launch_configs(n, h, i, r, dtype, config)
    assert set(configs) == {"fwd_gate_up", "fwd_down", "bwd_dh", "bwd_dx", "sgd_apply"}
    for name, c in configs.items():
        for key, value in c["constexprs"].items():
            assert _pow2(value), (name, key, value)
        assert _pow2(c["num_warps"]) and c["num_warps"] <= 16
        for dot in c["dots"]:
            assert min(dot) >= MIN_DOT, (name, dot)  # tl.dot: every dimension >= 16 on a GPU
        pad = c["constexprs"].get("R_PAD") or c["constexprs"].get("RS_PAD")
        if pad is not None:
            assert pad >= MIN_DOT and pad >= (2 * r if "RS_PAD" in c["constexprs"] else r), (name, pad)
    grid = configs["fwd_gate_up"]["grid"]
    bm, bn = configs["fwd_gate_up"]["constexprs"]["BLOCK_M"], configs["fwd_gate_up"]["constexprs"]["BLOCK_N"]
    assert grid[0] * bm >= n and grid[1] * bn >= i


def test_default_configs_are_tensor_core_tiles():
    for dtype in (torch.float16, torch.bfloat16):
        for kc in vars(default_config(dtype)).values():
            if isinstance(kc, KernelConfig):
                assert kc.block_m >= 64 and kc.block_n >= 64 and kc.block_k >= 32


H100_SMEM = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)

_COMPILE_SCRIPT = r"""
import json, re, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tmem_kernels import lora_mlp as L

dtype = getattr(torch, sys.argv[1])
tl_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
n, h, i, r = 4096, 2560, 9728, int(sys.argv[2])
variant = {  # constexpr branches: the B-only write, train_a, and every flag flipped (inference-like)
    "b_only": {"SAVE": True, "NEED_DB": True, "NEED_DA": False, "NEED_DX": True},
    "train_a": {"SAVE": True, "NEED_DB": True, "NEED_DA": True, "NEED_DX": True},
    "flipped": {"SAVE": False, "NEED_DB": False, "NEED_DA": True, "NEED_DX": False},
}[sys.argv[3]]
lc = L.launch_configs(n, h, i, r, dtype)
fp32_args = {"dbg_ptr", "dbu_ptr", "dbd_ptr", "dad_ptr", "da_ptr", "w0_ptr", "w1_ptr", "w2_ptr"}
kernels = {"fwd_gate_up": L._fwd_gate_up_kernel, "fwd_down": L._fwd_down_kernel, "bwd_dh": L._bwd_dh_kernel,
           "bwd_dx": L._bwd_dx_kernel, "sgd_apply": L._sgd_apply_kernel}
flags = dict(variant, INPUT_PRECISION="ieee" if dtype == torch.float32 else "tf32", INTERPRET=False)
try:  # ptxas -v: register spills and wgmma serialisation (Triton-version dependent: best effort)
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(90).path
except Exception:
    ptxas = None
out = {}
for name, fn in kernels.items():
    c = lc[name]
    constexprs = {k: v for k, v in {**c["constexprs"], **flags}.items() if k in fn.arg_names}
    sig = {}
    for a in fn.arg_names:
        if a in constexprs:
            sig[a] = "constexpr"
        elif a.endswith("_ptr"):
            sig[a] = "*fp32" if a in fp32_args else "*" + tl_name
        elif a in ("scaling", "lr"):
            sig[a] = "fp32"
        else:
            sig[a] = "i32"
    # what a real launch specialises on: 16-byte aligned pointers, sizes divisible by 16 (not the rank);
    # without these Triton does not pipeline the K loop and the shared-memory figure is too small
    dims = {"N": n, "H": h, "I_DIM": i, "n0": i * r, "n1": i * r, "n2": h * r}
    attrs = {(j,): [["tt.divisibility", 16]] for j, a in enumerate(fn.arg_names)
             if sig[a].startswith("*") or (a in dims and dims[a] % 16 == 0)}
    k = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": c["num_warps"], "num_stages": c["num_stages"]})
    meta = {"shared": k.metadata.shared, "cubin_bytes": len(k.asm["cubin"]), "spill_bytes": None,
            "wgmma_serialized": None}
    if ptxas is not None:
        with tempfile.TemporaryDirectory() as tmp:
            with open(tmp + "/k.ptx", "w") as f:
                f.write(k.asm["ptx"])
            log = subprocess.run([ptxas, "-arch=sm_90a", "-v", tmp + "/k.ptx", "-o", tmp + "/k.o"],
                                 capture_output=True, text=True).stderr
        spills = re.findall(r"(\d+) bytes spill stores", log)
        meta["spill_bytes"] = int(spills[0]) if spills else None
        meta["wgmma_serialized"] = "C7514" in log or "C7515" in log
    out[name] = meta
print(json.dumps(out))
"""


@pytest.mark.parametrize(
    "dtype, r, variant", [("bfloat16", 6, "b_only"), ("bfloat16", 16, "flipped"), ("float32", 16, "train_a")]
)
def test_gpu_compile(dtype, r, variant):
    """Compile every kernel (default tiles) for sm_90 without a GPU: shared memory fits an H100; for 16-bit
    also no register spills and no serialised wgmma (as reported by ptxas -v, when it can be found)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, dtype, str(r), variant], env=env,
                          cwd=root, capture_output=True, text=True, timeout=900)  # fmt: skip
    if proc.returncode != 0 and "ptxas" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("no ptxas in this Triton install")
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {"fwd_gate_up", "fwd_down", "bwd_dh", "bwd_dx", "sgd_apply"}
    for name, meta in result.items():
        assert meta["cubin_bytes"] > 0, name
        assert meta["shared"] <= H100_SMEM, (name, meta["shared"])
        if dtype != "float32":
            assert meta["spill_bytes"] in (0, None), (name, meta)
            assert not meta["wgmma_serialized"], (name, meta)
