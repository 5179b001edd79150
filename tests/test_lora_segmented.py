"""Segmented LoRA ops (a different B per segment of rows) in every backend against the spec (`reference`).

The spec itself is checked first: each segment's rows of `reference.lora_mlp_segmented` equal
`reference.lora_mlp` with that slot's B's (the bare SwiGLU MLP for slot -1). The native and Triton
backends are then checked against the spec, forward and backward (dx and dB of every slot), on odd shapes
(sizes not multiples of 8 or 16, several column tiles with a ragged tail), with segment layouts that
include sessions of one row, an empty segment, slots absent from the batch (zero gradient), one slot in two
segments (gradients sum) and slot -1. The B stacks are non-contiguous views of a [capacity, numel] slab,
as the session pool lays them out (and stay so through `run`'s copies). The native and torch backends run
on the CPU; Triton on the `device` fixture (conftest.py): the real kernels on a CUDA machine, else the
interpreter (TRITON_INTERPRET=1) on CPU tensors; small tiles so that every kernel sees several column
tiles, row blocks and row splits. The spec runs on the CPU (16-bit: also on Triton's device, for torch's own
16-bit error there).

Tolerances as in test_native.py: fp32, rtol 1e-4 and atol 1e-5 of the reference's largest magnitude.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tmem_kernels import lora_segmented, native
from tmem_kernels import reference as ref
from tmem_kernels.ops import get_ops
from tmem_kernels.segments import row_segments

SMALL = lora_segmented.SegmentedConfig(block_m=16, block_n=32, max_split=3, num_warps=2)
BACKENDS = {
    "native": native,
    "triton": lora_segmented,
}
B_NAMES = ("b_gate", "b_up", "b_down")

# (name, segment lengths, slots, S). Slot 1 of "mixed" is in no segment; slot 2 is in two; one segment is
# empty; "one_row" is a batch of one row; "long" has a segment longer than a row block times the split
# (the row loop wraps).
LAYOUTS = {
    "mixed": ([1, 0, 8, 1, 10, 3], [2, 0, -1, 2, 4, 3], 5),
    "decode": ([1] * 7, [3, 0, 6, 1, -1, 5, 2], 8),
    "single": ([23], [0], 1),
    "one_row": ([1], [1], 2),
    "long": ([2, 57, 1], [1, 0, 1], 3),
    "bare": ([4, 5], [-1, -1], 2),
}
SHAPES = [(37, 141, 6), (17, 33, 1), (40, 70, 16), (24, 200, 5)]  # (H, I, r)


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    """actual == expected within rtol and 1e-5 of expected's largest magnitude, compared on the CPU."""
    actual, expected = actual.cpu(), expected.cpu()
    atol = 1e-5 * max(1.0, expected.abs().max().item() if expected.numel() else 0.0)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def on(backend: str, device: torch.device) -> torch.device:
    """Where `backend` computes: Triton on the test device (CUDA, or the interpreter on the CPU), the rest
    on the CPU."""
    return device if backend == "triton" else torch.device("cpu")


def cpu(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.cpu() for k, v in t.items()}


def copy_layout(t: torch.Tensor) -> torch.Tensor:
    """A copy of t with t's strides (clone() makes a view with gaps, as a B stack of a slab, contiguous)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)


def segments(lengths: list[int], slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    indptr = torch.tensor([0, *lengths]).cumsum(0)
    return indptr, torch.tensor(slots, dtype=torch.int64)


def b_stacks(h: int, i: int, r: int, s: int, g: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """b_gate, b_up [S, I, r], b_down [S, H, r]: views of a [S + 2, numel] slab on `device` (padding around
    each projection's block, so dim 0's stride is not the block size)."""
    numel = (2 * i + h) * r + 5
    slab = torch.randn(s + 2, numel, generator=g).to(device)[1 : s + 1]
    out, off = {}, 3
    for name, rows in (("b_gate", i), ("b_up", i), ("b_down", h)):
        out[name] = slab[:, off : off + rows * r].view(s, rows, r)
        off += rows * r
    assert s == 1 or not out["b_gate"].is_contiguous()
    return out


def make(
    n: int, h: int, i: int, r: int, s: int, seed: int = 0, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """x [n, h], the six W's and A's and the three B stacks (b_stacks) on `device`; the same values on any
    device (drawn on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    plain = {
        "x": torch.randn(n, h, generator=g),
        "w_gate": torch.randn(i, h, generator=g) / h**0.5,
        "w_up": torch.randn(i, h, generator=g) / h**0.5,
        "w_down": torch.randn(h, i, generator=g) / i**0.5,
        "a_gate": torch.randn(r, h, generator=g) / h**0.5,
        "a_up": torch.randn(r, h, generator=g) / h**0.5,
        "a_down": torch.randn(r, i, generator=g) / i**0.5,
    }
    return {k: v.to(device) for k, v in plain.items()} | b_stacks(h, i, r, s, g, torch.device(device))


def run(fn, t: dict, indptr, slot, scaling: float, dy: torch.Tensor | None, **kw) -> dict:  # noqa: ANN001
    """y and (given dy) the gradients of x and the three stacks through `fn` (on t's device; the stacks keep
    their strides)."""
    leaves = {k: copy_layout(v.detach()).requires_grad_(k == "x" or k in B_NAMES) for k, v in t.items()}
    y = fn(**leaves, seg_indptr=indptr, seg_slot=slot, scaling=scaling, **kw)
    out = {"y": y.detach()}
    if dy is not None:
        y.backward(dy)
        # autograd leaves .grad None for a stack no segment reads (all slots -1): that is a zero gradient
        grads = {k: leaves[k].grad if leaves[k].grad is not None else torch.zeros_like(t[k]) for k in B_NAMES}
        out |= {"dx": leaves["x"].grad} | {"d" + k: g for k, g in grads.items()}
    return out


def backend_kw(name: str) -> dict:
    return {"config": SMALL} if name == "triton" else {}


# ------------------------------------------------------------------------------------------ the spec


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_is_lora_mlp_per_segment(layout: str) -> None:
    lengths, slots, s = LAYOUTS[layout]
    n = sum(lengths)
    t = make(n, 37, 141, 6, s)
    indptr, slot = segments(lengths, slots)
    y = ref.lora_mlp_segmented(**t, seg_indptr=indptr, seg_slot=slot, scaling=0.75)
    w = {k: t[k] for k in ("w_gate", "w_up", "w_down", "a_gate", "a_up", "a_down")}
    for start, end, sl in zip(indptr[:-1].tolist(), indptr[1:].tolist(), slots):
        x = t["x"][start:end]
        if sl < 0:
            expected = (torch.nn.functional.silu(x @ t["w_gate"].T) * (x @ t["w_up"].T)) @ t["w_down"].T
        else:
            expected = ref.lora_mlp(x, **w, **{k: t[k][sl] for k in B_NAMES}, scaling=0.75)
        close(y[start:end], expected)


def test_reference_expand_backward_is_autograd_and_zero_for_unused_slots() -> None:
    g = torch.Generator().manual_seed(3)
    lengths, slots, s = LAYOUTS["mixed"]
    n = sum(lengths)
    indptr, slot = segments(lengths, slots)
    xa, b, dy = torch.randn(n, 4, generator=g), torch.randn(s, 9, 4, generator=g), torch.randn(n, 9, generator=g)
    dxa, db = ref.lora_expand_segmented_backward(dy, xa, b, indptr, slot, 1.5)
    assert torch.equal(db[1], torch.zeros(9, 4))  # slot 1 is in no segment
    assert torch.equal(dxa[1:9], torch.zeros(8, 4))  # rows of the slot -1 segment
    rows2 = [0, 9]  # slot 2's two one-row segments: their contributions sum
    close(db[2], 1.5 * dy[rows2].T @ xa[rows2])
    close(dxa[0], 1.5 * dy[0] @ b[2])


def test_row_segments() -> None:
    indptr, slot = row_segments([3, 3, -1, 0], tokens_per_row=2)
    assert indptr.tolist() == [0, 4, 6, 8] and slot.tolist() == [3, -1, 0]
    assert indptr.dtype == slot.dtype == torch.int64
    indptr, slot = row_segments([], tokens_per_row=5)
    assert indptr.tolist() == [0] and slot.tolist() == []
    # a decode batch [B, 1, H]: one segment per run of equal slots; the result is the per-row spec
    t = make(5, 24, 70, 6, 4, seed=17)
    rows = [2, 2, 0, -1, 2]
    indptr, slot = row_segments(rows)
    y = native.lora_mlp_segmented(**t, seg_indptr=indptr, seg_slot=slot)
    per_row = torch.arange(6)
    close(y, ref.lora_mlp_segmented(**t, seg_indptr=per_row, seg_slot=torch.tensor(rows)))


# ------------------------------------------------------------------------------ backends vs the spec


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("h", "i", "r"), SHAPES, ids=[f"H{h}-I{i}-r{r}" for h, i, r in SHAPES])
def test_mlp_forward_backward(backend: str, layout: str, h: int, i: int, r: int, device: torch.device) -> None:
    dev = on(backend, device)
    interpreted = backend == "triton" and dev.type == "cpu"
    if interpreted and (h, i, r) != SHAPES[0] and layout not in ("mixed", "decode", "one_row"):
        pytest.skip("the interpreter is slow: every layout on one shape, every shape on three layouts")
    lengths, slots, s = LAYOUTS[layout]
    n = sum(lengths)
    t = make(n, h, i, r, s, seed=n + r, device=dev)
    indptr, slot = segments(lengths, slots)
    dy = torch.randn(n, h, generator=torch.Generator().manual_seed(9))
    expected = run(ref.lora_mlp_segmented, cpu(t), indptr, slot, 1.25, dy)
    actual = run(BACKENDS[backend].lora_mlp_segmented, t, indptr, slot, 1.25, dy.to(dev), **backend_kw(backend))
    for key, value in expected.items():
        close(actual[key], value)
    used = set(slots) - {-1}
    for sl in range(s):
        if sl not in used:
            for k in B_NAMES:
                assert torch.equal(actual["d" + k][sl], torch.zeros_like(actual["d" + k][sl])), (k, sl)


@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
def test_one_segment_slot_0_is_lora_mlp(backend: str, device: torch.device) -> None:
    """G == 1, slot 0: the result and gradients equal lora_mlp with b_*[0] (of the same backend)."""
    ops, dev = get_ops(backend), on(backend, device)
    t = make(19, 37, 141, 6, 3, seed=5, device=dev)
    indptr, slot = segments([19], [0])
    dy = torch.randn(19, 37, generator=torch.Generator().manual_seed(6)).to(dev)
    seg = run(ops.lora_mlp_segmented, t, indptr, slot, 0.5, dy)

    leaves = {k: (t[k][0] if k in B_NAMES else t[k]).clone().requires_grad_(k == "x" or k in B_NAMES) for k in t}
    order = ("x", "w_gate", "w_up", "w_down", "a_gate", "b_gate", "a_up", "b_up", "a_down", "b_down")
    y = ops.lora_mlp(*(leaves[k] for k in order), 0.5)
    y.backward(dy)
    close(seg["y"], y.detach())
    close(seg["dx"], leaves["x"].grad)
    for k in B_NAMES:
        close(seg["d" + k][0], leaves[k].grad)
        assert torch.equal(seg["d" + k][1:], torch.zeros_like(seg["d" + k][1:]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_w_and_a_partial_grads_no_grad(backend: str, device: torch.device) -> None:
    """W's and A's that require grad get none (and are no error); x without grad (the first adapted layer)
    still gives the B grads; a stack that does not require grad gets none; no_grad inference works."""
    mod, kw, dev = BACKENDS[backend], backend_kw(backend), on(backend, device)
    lengths, slots, s = LAYOUTS["mixed"]
    n = sum(lengths)
    t = make(n, 24, 70, 6, s, seed=7, device=dev)
    indptr, slot = segments(lengths, slots)
    dy = torch.randn(n, 24, generator=torch.Generator().manual_seed(8))
    expected = run(ref.lora_mlp_segmented, cpu(t), indptr, slot, 2.0, dy)

    leaves = {k: copy_layout(v.detach()).requires_grad_(k not in ("x", "b_up")) for k, v in t.items()}
    mod.lora_mlp_segmented(**leaves, seg_indptr=indptr, seg_slot=slot, scaling=2.0, **kw).backward(dy.to(dev))
    for k in ("x", "b_up", "w_gate", "w_up", "w_down", "a_gate", "a_up", "a_down"):
        assert leaves[k].grad is None, k
    close(leaves["b_gate"].grad, expected["db_gate"])
    close(leaves["b_down"].grad, expected["db_down"])

    with torch.no_grad():
        y = mod.lora_mlp_segmented(**leaves, seg_indptr=indptr, seg_slot=slot, scaling=2.0, **kw)
    assert not y.requires_grad
    close(y, expected["y"])


@pytest.mark.parametrize("backend", ["torch", *BACKENDS])
def test_empty_batch(backend: str, device: torch.device) -> None:
    fn = get_ops(backend).lora_mlp_segmented
    t = make(0, 16, 40, 6, 2, device=on(backend, device))
    y = fn(**t, seg_indptr=torch.zeros(1, dtype=torch.int64), seg_slot=torch.zeros(0, dtype=torch.int64))
    assert y.shape == (0, 16) and y.device == t["x"].device


def test_gradient_reaches_the_slab() -> None:
    """The stacks are views: gradients flow back to the slab, each session's row getting its own."""
    lengths, slots, s = LAYOUTS["mixed"]
    n = sum(lengths)
    t = make(n, 24, 70, 6, s, seed=11)
    indptr, slot = segments(lengths, slots)
    dy = torch.randn(n, 24, generator=torch.Generator().manual_seed(12))
    expected = run(ref.lora_mlp_segmented, t, indptr, slot, 1.0, dy)
    slab = t["b_gate"].as_strided((s, t["b_gate"].stride(0)), (t["b_gate"].stride(0), 1)).detach().clone()
    slab.requires_grad_(True)
    b_gate = slab[:, : 70 * 6].view(s, 70, 6)
    args = {**t, "b_gate": b_gate}
    native.lora_mlp_segmented(**args, seg_indptr=indptr, seg_slot=slot).backward(dy)
    close(slab.grad[:, : 70 * 6].view(s, 70, 6), expected["db_gate"])
    assert torch.equal(slab.grad[:, 70 * 6 :], torch.zeros_like(slab.grad[:, 70 * 6 :]))


# ----------------------------------------------------------------------------------- the expand alone


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["mixed", "decode", "long"])
@pytest.mark.parametrize(("m", "r"), [(141, 6), (33, 1), (70, 16)])
def test_expand_forward_backward(backend: str, layout: str, m: int, r: int, device: torch.device) -> None:
    mod, kw, dev = BACKENDS[backend], backend_kw(backend), on(backend, device)
    lengths, slots, s = LAYOUTS[layout]
    n = sum(lengths)
    g = torch.Generator().manual_seed(m + r)
    y, xa, dy = (torch.randn(n, c, generator=g).to(dev) for c in (m, r, m))
    b = torch.randn(s, m * r + 7, generator=g).to(dev)[:, 2 : 2 + m * r].view(s, m, r)  # strided stack
    indptr, slot = segments(lengths, slots)
    y0 = y.clone()

    out = mod.lora_expand_segmented(y, xa, b, indptr, slot, 0.5, **kw)
    close(out, ref.lora_expand_segmented(y.cpu(), xa.cpu(), b.cpu(), indptr, slot, 0.5))
    assert torch.equal(y, y0)  # y is not modified

    dxa, db = mod.lora_expand_segmented_backward(dy, xa, b, indptr, slot, 0.5, **kw)
    dxa_ref, db_ref = ref.lora_expand_segmented_backward(dy.cpu(), xa.cpu(), b.cpu(), indptr, slot, 0.5)
    close(dxa, dxa_ref)
    close(db, db_ref)

    leaves = [copy_layout(t).requires_grad_(True) for t in (y, xa, b)]
    mod.lora_expand_segmented(*leaves, indptr, slot, 0.5, **kw).backward(dy)
    close(leaves[0].grad, dy)
    close(leaves[1].grad, dxa_ref)
    close(leaves[2].grad, db_ref)


# ------------------------------------------------------------------------------------- Triton specifics


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_16bit(dtype: torch.dtype, device: torch.device) -> None:
    """16-bit: within 2e-2 of float64 and within 2x (+4e-3) of the 16-bit torch reference's own error, the
    torch reference running on the same device as Triton (CUDA, or the CPU under the interpreter)."""
    lengths, slots, s = LAYOUTS["mixed"]
    n = sum(lengths)
    t = make(n, 37, 141, 6, s, seed=13)
    indptr, slot = segments(lengths, slots)
    dy = torch.randn(n, 37, generator=torch.Generator().manual_seed(14))
    exact = run(ref.lora_mlp_segmented, {k: v.double() for k, v in t.items()}, indptr, slot, 1.0, dy.double())
    low = {k: v.to(dtype) for k, v in make(n, 37, 141, 6, s, seed=13, device=device).items()}
    torch_16 = run(ref.lora_mlp_segmented, low, indptr, slot, 1.0, dy.to(device, dtype))
    triton_16 = run(lora_segmented.lora_mlp_segmented, low, indptr, slot, 1.0, dy.to(device, dtype), config=SMALL)
    for key, value in exact.items():
        scale = max(1.0, value.abs().max().item())
        err = (triton_16[key].cpu().double() - value).abs().max().item() / scale
        base = (torch_16[key].cpu().double() - value).abs().max().item() / scale
        assert triton_16[key].dtype == dtype
        assert err < 2e-2, (key, err)  # as test_lora_mlp.py's 16-bit tests (measured here: <= 8.3e-3)
        assert err <= 2 * base + 4e-3, (key, err, base)


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@pytest.mark.parametrize(("n", "g"), [(1, 1), (16, 16), (512, 8), (4096, 1), (100, 64)])
@pytest.mark.parametrize("r", [1, 6, 16])
@pytest.mark.parametrize("config", [None, SMALL], ids=["default", "small"])
def test_triton_launch_configs_follow_gpu_rules(n: int, g: int, r: int, config) -> None:  # noqa: ANN001
    for cols in (576, 1536, 9728):
        for name, c in lora_segmented.launch_configs(n, cols, r, g, config).items():
            for key in ("BLOCK_M", "BLOCK_N", "R_PAD"):  # tile sizes (SPLIT is a loop stride: any value)
                assert _pow2(c["constexprs"][key]), (name, key, c["constexprs"])
            for dot in c["dots"]:
                assert min(dot) >= 16, (name, dot)  # tl.dot: every dimension >= 16 on a GPU
            assert c["constexprs"]["R_PAD"] >= r
            grid = c["grid"]
            assert grid[0] * c["constexprs"]["BLOCK_N"] >= cols and grid[1] == g  # host-known sizes only
            assert 1 <= grid[2] <= (config or lora_segmented.SegmentedConfig()).max_split


def test_triton_segments_on_device_are_not_read(device: torch.device) -> None:
    """Segments on the data's device (CUDA, or the CPU under the interpreter) give the spec's result; the
    launch plan is a function of (N, G, r) only."""
    lengths, slots, s = LAYOUTS["decode"]
    n = sum(lengths)
    t = make(n, 24, 70, 6, s, seed=15, device=device)
    for seg in (segments(lengths, slots), segments(lengths, slots[::-1])):
        indptr, slot = (v.to(device) for v in seg)
        y = lora_segmented.lora_mlp_segmented(**t, seg_indptr=indptr, seg_slot=slot, config=SMALL)
        close(y, ref.lora_mlp_segmented(**cpu(t), seg_indptr=seg[0], seg_slot=seg[1]))


@pytest.mark.cuda
def test_triton_cuda_graph_replay(device: torch.device) -> None:
    """Captured once, replayed with other segment values written into the same device tensors."""
    lengths, slots, s = LAYOUTS["decode"]
    n = sum(lengths)
    t = make(n, 64, 192, 6, s, seed=16, device=device)
    indptr, slot = (v.to(device) for v in segments(lengths, slots))
    fn = lambda: lora_segmented.lora_mlp_segmented(**t, seg_indptr=indptr, seg_slot=slot)  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the inputs, made on the current stream
    with torch.cuda.stream(stream), torch.no_grad():
        fn()  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = fn()
    for new_slots in (slots, slots[::-1], [-1] * n):
        slot.copy_(torch.tensor(new_slots))
        graph.replay()
        torch.cuda.synchronize()
        expected = ref.lora_mlp_segmented(**t, seg_indptr=indptr, seg_slot=slot)
        close(y, expected)


_COMPILE_SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tmem_kernels import lora_segmented as L

tl_name, n, g = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
kernels = {"expand": L._expand_kernel, "expand_bwd": L._expand_bwd_kernel, "gate_up_fwd": L._gate_up_fwd_kernel,
           "gate_up_bwd": L._gate_up_bwd_kernel}
fp32 = {"dxa_ptr", "db_ptr", "ha_ptr", "dbg_ptr", "dbu_ptr"}  # workspaces
flags = {"NEED_DXA": True, "NEED_DB": True, "STORE_DGU": True, "INTERPRET": False,
         "INPUT_PRECISION": "ieee" if tl_name == "fp32" else "tf32"}
out = {}
for name, fn in kernels.items():
    c = L.launch_configs(n, 9728, 6, g)[name]
    constexprs = {k: v for k, v in {**c["constexprs"], **flags}.items() if k in fn.arg_names}
    sig = {}
    for a in fn.arg_names:
        if a in constexprs:
            sig[a] = "constexpr"
        elif a in ("indptr_ptr", "slot_ptr"):
            sig[a] = "*i64"
        elif a.endswith("_ptr"):
            sig[a] = "*fp32" if a in fp32 else "*" + tl_name
        elif a == "scaling":
            sig[a] = "fp32"
        else:
            sig[a] = "i64" if a.endswith("stride") else "i32"
    k = triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": c["num_warps"], "num_stages": c["num_stages"]})
    out[name] = {"shared": k.metadata.shared, "cubin_bytes": len(k.asm["cubin"])}
print(json.dumps(out))
"""


@pytest.mark.parametrize(("dtype", "n", "g"), [("bf16", 16, 16), ("fp32", 512, 8)])
def test_triton_gpu_compile(dtype: str, n: int, g: int) -> None:
    """Every segmented kernel (data-dependent row loops included) compiles for sm_90 without a GPU."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = dict(os.environ, TRITON_INTERPRET="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, dtype, str(n), str(g)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    if proc.returncode != 0 and "ptxas" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("no ptxas in this Triton install")
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {"expand", "expand_bwd", "gate_up_fwd", "gate_up_bwd"}
    for name, meta in result.items():
        assert meta["cubin_bytes"] > 0 and meta["shared"] <= 232448, (name, meta)


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("backend", ["torch", *BACKENDS])
def test_bad_segments(backend: str, device: torch.device) -> None:
    """Host (CPU) segments are validated, whatever the data's device."""
    fn = get_ops(backend).lora_mlp_segmented
    t = make(6, 16, 40, 6, 3, device=on(backend, device))
    cases = [
        (torch.tensor([0, 2, 5]), torch.tensor([0, 1]), "from 0 to N = 6"),
        (torch.tensor([1, 2, 6]), torch.tensor([0, 1]), "from 0 to N"),
        (torch.tensor([0, 4, 2, 6]), torch.tensor([0, 1, 2]), "non-decreasing"),
        (torch.tensor([0, 2, 6]), torch.tensor([0, 3]), "outside \\[-1, 3\\)"),
        (torch.tensor([0, 2, 6]), torch.tensor([-2, 0]), "outside"),
        (torch.tensor([0, 2, 6]), torch.tensor([0]), "G \\+ 1"),
        (torch.tensor([0, 2, 6], dtype=torch.int32), torch.tensor([0, 1]), "int64"),
    ]
    for indptr, slot, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn(**t, seg_indptr=indptr, seg_slot=slot)


@pytest.mark.parametrize("backend", ["torch", *BACKENDS])
def test_bad_stacks_and_shapes(backend: str) -> None:
    fn = get_ops(backend).lora_mlp_segmented
    t = make(6, 16, 40, 6, 3)
    seg = dict(seg_indptr=torch.tensor([0, 6]), seg_slot=torch.tensor([0]))
    cases = [
        ({"b_gate": torch.randn(3, 6, 40).transpose(1, 2)}, "contiguous \\[40, 6\\] blocks"),
        ({"b_up": torch.randn(3, 41, 6)}, "b_up has shape"),
        ({"b_down": torch.randn(2, 16, 6)}, "different numbers of slots"),
        ({"b_down": torch.randn(16, 6)}, "expected \\[S, 16, 6\\]"),
        ({"w_up": torch.randn(40, 15)}, "w_up has shape"),
        ({"a_down": torch.randn(5, 40)}, "a_down has shape"),
        ({"x": torch.randn(6, 16, 1)}, "2-D"),
    ]
    for override, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn(**{**t, **override}, **seg)


def test_bad_dtypes_devices() -> None:
    t = make(6, 16, 40, 6, 3)
    seg = dict(seg_indptr=torch.tensor([0, 6]), seg_slot=torch.tensor([0]))
    with pytest.raises(TypeError, match="float32"):
        native.lora_mlp_segmented(**{**t, "b_up": t["b_up"].double()}, **seg)
    with pytest.raises(ValueError, match="CPU"):
        native.lora_mlp_segmented(**{**t, "x": t["x"].to("meta")}, **seg)
    with pytest.raises(TypeError, match="mixed dtypes"):
        lora_segmented.lora_mlp_segmented(**{**t, "b_down": t["b_down"].half()}, **seg)
    with pytest.raises(ValueError, match="contiguous"):
        lora_segmented.lora_mlp_segmented(**{**t, "w_gate": t["w_gate"].T.contiguous().T}, **seg)
    with pytest.raises(ValueError, match="rank"):
        lora_segmented.lora_mlp_segmented(**make(6, 16, 40, 17, 3), **seg)
    with pytest.raises(TypeError, match="scaling"):
        native.lora_mlp_segmented(**t, **seg, scaling=torch.tensor(1.0))
