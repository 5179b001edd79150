"""Launch configuration of the fused LoRA MLP kernels: tiles by shape, split-K, the decode path, precision.

Everything here is plain Python over shapes, so tests check every launch on a CPU (`launch_configs`) and a
compile check builds exactly these tiles for sm_90 (`tools/compile_sm90.py`).

Tiles by shape (`select_config`), for a card with `num_sms` SMs (an H100's 132 where there is no GPU):

    decode, N <= DECODE_ROWS   16-row tiles, 64 wide, 128-deep K steps (a few rows: the weights stream once)
    otherwise                  `default_config`'s tensor-core tiles, each halved (N first, then M, down to
                               64) while its grid has fewer programs than the card has SMs
    split-K                    fwd_down and bwd_dx (outputs H wide, reduction over I, large): the reduction
                               is split in 2, 4 or 8 while the grid is still under one program per SM and
                               each split keeps >= 2 K blocks; fp32 partials, summed in split order by
                               `_split_k_reduce_kernel` (deterministic: no atomics in the forward)

Decode (`decode_path`): an inference call (no gradient) of N <= DECODE_ROWS rows on CUDA runs the base
products through cuBLAS (`torch.matmul`, the torch composition) plus the small LoRA terms, unless the
config (or $TMEM_DECODE_PATH) asks for the fused kernels; `make gpu-check` times both sides at decode
sizes, per MLP and through a whole model, and reports the winner.

fp32 precision (`dot_precision`): "tf32" tensor-core dots when torch's float32 matmul precision allows
it (`torch.get_float32_matmul_precision() != "highest"`), IEEE otherwise; a config may pin either.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton

__all__ = [
    "DECODE_PATHS",
    "DECODE_ROWS",
    "H100_SMS",
    "MAX_RANK",
    "MAX_SPLIT_K",
    "MIN_DOT",
    "KernelConfig",
    "LoRAMLPConfig",
    "decode_path",
    "default_config",
    "dot_precision",
    "launch_configs",
    "num_sms",
    "select_config",
]

MAX_RANK = 16  # largest LoRA rank the kernels accept (one padded R block)
MIN_DOT = 16  # smallest tl.dot dimension the GPU compiler accepts
DECODE_ROWS = 16  # at most this many rows: decode tiles, and (inference on CUDA) the cuBLAS decode path
H100_SMS = 132  # SM count assumed where no GPU is visible (the interpreter runs an H100's launches)
MAX_SPLIT_K = 8
DECODE_PATHS = ("auto", "fused", "cublas")
APPLY_BLOCK = 1024
_SPLIT_KERNELS = ("fwd_down", "bwd_dx")


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of one kernel (blocks are upper bounds: clamped to the problem).

    split_k: split the reduction over this many programs (fwd_down and bwd_dx only; 1 = no split).
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1


@dataclass(frozen=True)
class LoRAMLPConfig:
    """One `KernelConfig` per kernel; the fp32 `tl.dot` precision; the decode path.

    fp32_precision: "ieee" | "tf32" | None (None: follow torch.get_float32_matmul_precision()).
    decode: "auto" | "fused" | "cublas", how an inference call of <= DECODE_ROWS rows runs (`decode_path`).
    """

    fwd_gate_up: KernelConfig
    fwd_down: KernelConfig
    bwd_dh: KernelConfig
    bwd_dx: KernelConfig
    fp32_precision: str | None = None
    decode: str = "auto"

    def __post_init__(self) -> None:
        if self.fp32_precision not in (None, "ieee", "tf32"):
            raise ValueError(f"fp32_precision must be None, 'ieee' or 'tf32', got {self.fp32_precision!r}")
        if self.decode not in DECODE_PATHS:
            raise ValueError(f"decode must be one of {DECODE_PATHS}, got {self.decode!r}")
        for name in ("fwd_gate_up", "bwd_dh"):
            if getattr(self, name).split_k != 1:
                raise ValueError(f"{name} cannot split its reduction (its epilogue is not linear): split_k=1")
        for name in _SPLIT_KERNELS:
            if not 1 <= getattr(self, name).split_k <= 64:
                raise ValueError(f"{name}.split_k must be in 1..64, got {getattr(self, name).split_k}")


def default_config(dtype: torch.dtype) -> LoRAMLPConfig:
    """The write tiles for an H100 (sm_90), checked there by compiling: no spills, shared memory fits.

    16-bit: tensor-core tiles, 3 stages. bwd_dh's SwiGLU-backward epilogue keeps ~8 tiles live: 64 x 64
    with 8 warps (under Triton 3.6, 64 x 128 spills 732 B and 64 x 64 with 4 warps 340 B).
    fp32 (IEEE dots on CUDA cores, or TF32): smaller tiles.
    """
    if dtype == torch.float32:
        two = KernelConfig(64, 64, 32, num_warps=8, num_stages=3)
        return LoRAMLPConfig(fwd_gate_up=two, fwd_down=two, bwd_dh=two, bwd_dx=two)
    two = KernelConfig(64, 128, 64, num_warps=8, num_stages=3)  # two accumulators (gate/up; dgate/dup)
    one = KernelConfig(128, 128, 64, num_warps=8, num_stages=3)
    dh = KernelConfig(64, 64, 64, num_warps=8, num_stages=3)
    return LoRAMLPConfig(fwd_gate_up=two, fwd_down=one, bwd_dh=dh, bwd_dx=two)


def decode_config(dtype: torch.dtype) -> LoRAMLPConfig:
    """Tiles for N <= DECODE_ROWS: 16 rows, 64-wide outputs; the forward streams the weights in 128-deep K
    steps, 4 stages. The backward (a write of a few rows) keeps 64-deep steps: bwd_dx at 128 spills."""
    if dtype == torch.float32:  # 64-deep fp32 steps spill (12-68 B under Triton 3.6)
        kc = KernelConfig(16, 64, 32, num_warps=4, num_stages=3)
        return LoRAMLPConfig(fwd_gate_up=kc, fwd_down=kc, bwd_dh=kc, bwd_dx=kc)
    fwd = KernelConfig(16, 64, 128, num_warps=4, num_stages=4)
    bwd = KernelConfig(16, 64, 64, num_warps=4, num_stages=3)
    return LoRAMLPConfig(fwd_gate_up=fwd, fwd_down=fwd, bwd_dh=bwd, bwd_dx=bwd)


def _pow2_block(limit: int, size: int) -> int:
    """A power-of-2 block in [MIN_DOT, limit], no larger than `size` rounded up."""
    return max(MIN_DOT, min(triton.next_power_of_2(limit), triton.next_power_of_2(max(size, 1))))


def _rank_blocks(r: int) -> tuple[int, int]:
    """(R_PAD, RS_PAD): padded blocks for one projection's rank and the stacked gate/up pair."""
    return max(MIN_DOT, triton.next_power_of_2(r)), max(MIN_DOT, triton.next_power_of_2(2 * r))


def _dims(n: int, h: int, i: int) -> dict[str, tuple[int, int, int]]:
    """Per kernel: (output rows, output cols, reduction)."""
    return {"fwd_gate_up": (n, i, h), "fwd_down": (n, h, i), "bwd_dh": (n, i, h), "bwd_dx": (n, h, i)}


def _fill(kc: KernelConfig, rows: int, cols: int, red: int, sms: int, splittable: bool) -> KernelConfig:
    """kc with its tile halved (N, then M, down to 64) while the grid has fewer programs than SMs, then (if
    `splittable`) its reduction split in 2/4/8 while still under one program per SM, >= 2 K blocks each."""
    bm, bn = _pow2_block(kc.block_m, rows), _pow2_block(kc.block_n, cols)
    grid = lambda: triton.cdiv(rows, bm) * triton.cdiv(cols, bn)
    while grid() < sms and (bn > 64 or bm > 64):
        if bn > 64:
            bn //= 2
        else:
            bm //= 2
    shrunk = (bm, bn) != (_pow2_block(kc.block_m, rows), _pow2_block(kc.block_n, cols))
    warps = min(kc.num_warps, 4) if shrunk and bm * bn <= 64 * 64 else kc.num_warps  # one warpgroup
    split, k_blocks = 1, triton.cdiv(red, _pow2_block(kc.block_k, red))
    while splittable and grid() * split < sms and 2 * split <= MAX_SPLIT_K and k_blocks >= 4 * split:
        split *= 2
    return replace(kc, block_m=bm, block_n=bn, num_warps=warps, split_k=split)


def select_config(n: int, h: int, i: int, dtype: torch.dtype, sms: int = H100_SMS) -> LoRAMLPConfig:
    """The tiles for x [n, h] and intermediate size i on a card with `sms` SMs (see the module docstring)."""
    base = decode_config(dtype) if n <= DECODE_ROWS else default_config(dtype)
    fitted = {k: _fill(getattr(base, k), *dims, sms, k in _SPLIT_KERNELS) for k, dims in _dims(n, h, i).items()}
    return replace(base, **fitted)


def num_sms(device: torch.device) -> int:
    """The SM count of a CUDA device; H100_SMS elsewhere (CPU tensors under the interpreter)."""
    if device.type != "cuda":
        return H100_SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


_SMS: dict[int, int] = {}


def _cuda_sms(index: int) -> int:
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def dot_precision(dtype: torch.dtype, cfg: LoRAMLPConfig) -> str:
    """The `tl.dot` input_precision: fp32 follows the config, else torch's float32 matmul precision (TF32
    unless it is "highest"); 16-bit operands ignore it."""
    if dtype != torch.float32:
        return "tf32"
    if cfg.fp32_precision is not None:
        return cfg.fp32_precision
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def decode_path(n: int, device: torch.device, cfg: LoRAMLPConfig) -> str:
    """How an inference call (no gradient) of n rows runs: "cublas" (torch.matmul base products + the
    small LoRA terms) or "fused" (the Triton kernels).

    The rule: the config's `decode` if it is not "auto"; else $TMEM_DECODE_PATH if set ("fused" | "cublas",
    how a benchmark times both sides through a whole model); else "cublas" for n <= DECODE_ROWS on CUDA and
    "fused" otherwise. `make gpu-check` (benchmarks/test_bench_decode.py) times both at decode sizes.
    """
    choice = cfg.decode if cfg.decode != "auto" else os.environ.get("TMEM_DECODE_PATH", "auto")
    if choice not in DECODE_PATHS:
        raise ValueError(f"TMEM_DECODE_PATH must be one of {DECODE_PATHS}, got {choice!r}")
    if choice != "auto":
        return choice
    return "cublas" if device.type == "cuda" and n <= DECODE_ROWS else "fused"


def launch_configs(
    n: int,
    h: int,
    i: int,
    r: int,
    dtype: torch.dtype = torch.bfloat16,
    config: LoRAMLPConfig | None = None,
    *,
    train_a: bool = False,
    sms: int = H100_SMS,
) -> dict[str, dict]:
    """Every launch `lora_mlp` makes for x [n, h], intermediate size i and rank r (config None: the tiles
    `select_config` picks for a card with `sms` SMs). `train_a`: the backward computes dA (no split of bwd_dx).

    Returns {kernel name: {"grid", "constexprs", "num_warps", "num_stages", "dots"}}, where "dots" lists the
    (M, N, K) shape of every `tl.dot` in that kernel, so a test can check the GPU compiler's rules
    (every dimension >= 16, power-of-2 blocks) without a GPU. A split kernel also has "k_split" (reduction
    elements per split) and a "<kernel>_reduce" entry for its epilogue launch.
    """
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"LoRA rank {r} is outside 1..{MAX_RANK} (the padded rank block is {MAX_RANK})")
    cfg = config or select_config(n, h, i, dtype, sms)
    rp, rs = _rank_blocks(r)
    out: dict[str, dict] = {}
    for name, (rows, cols, red) in _dims(n, h, i).items():
        kc: KernelConfig = getattr(cfg, name)
        rb = rs if name in ("fwd_gate_up", "bwd_dx") else rp
        bm, bn, bk = _pow2_block(kc.block_m, rows), _pow2_block(kc.block_n, cols), _pow2_block(kc.block_k, red)
        if name == "fwd_gate_up":  # x@Wg, x@Wu, x@A; expand xa@Bg, xa@Bu
            dots = [(bm, bn, bk)] * 2 + [(bm, rb, bk)] + [(bm, bn, rb)] * 2
        elif name == "fwd_down":  # h@Wd, h@Ad; expand ha@Bd
            dots = [(bm, bn, bk), (bm, rb, bk), (bm, bn, rb)]
        elif name == "bwd_dh":  # dy@Wd, dy@Bd; dyb@Ad; xa_g.T@dgate, xa_u.T@dup, dyb.T@h; ha.T@dy
            dots = [(bm, bn, bk), (bm, rb, bk), (bm, bn, rb)] + [(rb, bn, bm)] * 3 + [(rb, bk, bm)]
        else:  # dg@Wg, du@Wu, dg@Bg, du@Bu; dgb@A; dgb.T@x
            dots = [(bm, bn, bk)] * 2 + [(bm, rb, bk)] * 2 + [(bm, bn, rb), (rb, bn, bm)]
        k_blocks = triton.cdiv(red, bk)
        split = 1 if (name == "bwd_dx" and train_a) else min(kc.split_k, k_blocks)
        per_split = triton.cdiv(k_blocks, split)
        split = triton.cdiv(k_blocks, per_split)  # no empty split
        rank_key = "RS_PAD" if name in ("fwd_gate_up", "bwd_dx") else "R_PAD"
        constexprs = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, rank_key: rb}
        if name in _SPLIT_KERNELS:
            constexprs["SPLIT_K"] = split
        out[name] = {
            # bwd_dh: one extra column of programs computes dB_down (when B trains)
            "grid": (triton.cdiv(rows, bm), triton.cdiv(cols, bn) + (name == "bwd_dh"))
            + ((split,) if name in _SPLIT_KERNELS else ()),
            "constexprs": constexprs,
            "num_warps": kc.num_warps,
            "num_stages": kc.num_stages,
            "dots": dots,
        }
        if split > 1:
            out[name]["k_split"] = per_split * bk
            out[name + "_reduce"] = {
                "grid": (triton.cdiv(rows, bm), triton.cdiv(cols, bn)),
                "constexprs": {"BLOCK_M": bm, "BLOCK_N": bn, "R_PAD": rb, "SPLIT_K": split},
                "num_warps": 8 if bm * bn >= 64 * 64 else 4,  # fp32 IEEE at 64 x 64 spills with 4 warps
                "num_stages": 1,
                "dots": [(bm, bn, rb)],
            }
    out["sgd_apply"] = {
        "grid": (triton.cdiv(max(i, h) * r, APPLY_BLOCK), 3),
        "constexprs": {"BLOCK": APPLY_BLOCK},
        "num_warps": 4,
        "num_stages": 1,
        "dots": [],
    }
    return out
