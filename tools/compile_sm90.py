"""Compile every Triton launch tmem can make for an H100 (sm_90), on a CPU: registers, spills, shared memory.

No GPU needed: Triton's own compiler builds each kernel for GPUTarget("cuda", 90) and ptxas (shipped with
Triton) reports registers, spill bytes and serialised-wgmma warnings. The launches are exactly the ones
`tmem_kernels.tiles.launch_configs` picks for the real models' shapes (SmolLM2-135M, Qwen3-4B) at decode
sizes (1 and 16 rows) and write sizes (152 to 4096 rows), ranks 6 and 16, in the constexpr variants a run
uses (a B-only write, a write that trains A, inference), deduplicated by what changes the code; fp16 at
rank 6 (B-only and inference), fp32 (IEEE and TF32 dots) at three sizes and rank 6, for its shared memory.
Also the `tmem::swiglu` kernels (`swiglu_act_triton`, forward and backward) at those models' intermediate widths
and the same row counts, in every dtype.

    python tools/compile_sm90.py --dtypes bfloat16,float16 --json out.json --table

Prints one JSON list (or writes it with --json): per compiled kernel its dtype, dot precision, constexprs,
warps, stages, shared bytes, registers, spill bytes, wgmma serialisation and the sizes that use it.
Run with TRITON_INTERPRET unset (it is cleared here). Exit status 0 unless a kernel fails to compile.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what a launch gets (Triton 3.9 warns when unset)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {"smollm2": (576, 1536), "qwen3-4b": (2560, 9728)}  # (hidden, intermediate)
DECODE_SIZES = (1, 16)
WRITE_SIZES = (152, 512, 700, 4096)
RANKS = (6, 16)
H100_SMEM = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)
# constexpr flags per variant: a B-only write (the TMEM default), a write that trains A, inference
VARIANTS = {
    "b_only": {"SAVE": True, "NEED_DB": True, "NEED_DA": False, "NEED_DX": True, "SAVE_R": True},
    "train_a": {"SAVE": True, "NEED_DB": True, "NEED_DA": True, "NEED_DX": True, "SAVE_R": True},
    "inference": {"SAVE": False, "SAVE_R": False},
}
FP32_ARGS = {"dbg_ptr", "dbu_ptr", "dbd_ptr", "dad_ptr", "da_ptr", "w0_ptr", "w1_ptr", "w2_ptr", "part_ptr",
             "part_r_ptr"}  # fmt: skip
FLOAT_ARGS = {"scaling", "lr"}


def _kernels() -> dict:
    from tmem_kernels import lora_mlp as L
    from tmem_kernels import swiglu_act_triton as S

    return {"fwd_gate_up": L._fwd_gate_up_kernel, "fwd_down": L._fwd_down_kernel, "bwd_dh": L._bwd_dh_kernel,
            "bwd_dx": L._bwd_dx_kernel, "fwd_down_reduce": L._split_k_reduce_kernel,
            "bwd_dx_reduce": L._split_k_reduce_kernel, "sgd_apply": L._sgd_apply_kernel,
            "swiglu_fwd": S._forward_kernel, "swiglu_bwd": S._backward_kernel}  # fmt: skip


def _swiglu_jobs(dtype: str, precision: str, sizes: tuple[int, ...]) -> list[dict]:
    """The `tmem::swiglu` kernels (`swiglu_act_triton`: the write path's composed MLPs on CUDA) at the models'
    intermediate widths and `sizes` rows, with the blocks and warps `swiglu_act_triton.blocks` picks."""
    from tmem_kernels.swiglu_act_triton import blocks

    found: dict[str, dict] = {}
    for model, (_, i) in SHAPES.items():
        for n in sizes:
            block_m, block_n, _, warps = blocks(n, i)
            for name in ("swiglu_fwd", "swiglu_bwd"):
                consts = {"BLOCK_M": block_m, "BLOCK_N": block_n}
                job = found.setdefault(json.dumps([name, consts, warps]), {
                    "kernel": name, "dtype": dtype, "precision": precision, "constexprs": consts,
                    "num_warps": warps, "num_stages": None, "sizes": [],
                })  # fmt: skip
                job["sizes"].append(f"{model} N={n}")
    return list(found.values())


def jobs(dtypes: list[str], precisions: dict[str, list[str]]) -> list[dict]:
    """Every distinct (kernel, dtype, precision, constexprs, warps, stages) over the sizes and variants."""
    import torch

    from tmem_kernels.tiles import launch_configs

    kernels = _kernels()
    found: dict[str, dict] = {}
    for dtype in dtypes:
        # bf16: every size, both rank blocks, every variant. fp16 (the same code at another element type): rank
        # 6. fp32 (shared memory only: spills are not asserted there): decode, a split write and a large write.
        sizes = DECODE_SIZES + WRITE_SIZES if dtype != "float32" else (1, 152, 4096)
        ranks = RANKS if dtype == "bfloat16" else (6,)
        for model, (h, i) in SHAPES.items():
            for n in sizes:
                for r in ranks:
                    for variant, flags in VARIANTS.items():
                        if variant == "train_a" and r != 16:
                            continue
                        lc = launch_configs(n, h, i, r, getattr(torch, dtype), train_a=variant == "train_a")
                        for name, c in lc.items():
                            if variant == "inference" and not name.startswith("fwd"):
                                continue
                            fn = kernels[name]
                            consts = {k: v for k, v in {**c["constexprs"], **flags}.items() if k in fn.arg_names}
                            if name == "bwd_dx_reduce":  # dx only: the rank term is not saved
                                consts["SAVE_R"] = False
                            for prec in precisions[dtype]:
                                key = json.dumps([name, dtype, prec, consts, c["num_warps"], c["num_stages"]])
                                job = found.setdefault(key, {
                                    "kernel": name, "dtype": dtype, "precision": prec, "constexprs": consts,
                                    "num_warps": c["num_warps"], "num_stages": c["num_stages"], "sizes": [],
                                })  # fmt: skip
                                job["sizes"].append(f"{model} N={n} r={r} {variant}")
    swiglu = [job for dtype in dtypes for job in _swiglu_jobs(dtype, precisions[dtype][0], DECODE_SIZES + WRITE_SIZES)]
    return list(found.values()) + swiglu


def _ptxas() -> str | None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            return get_ptxas().path
        except TypeError:  # Triton >= 3.7 takes the architecture
            return get_ptxas(90).path
    except Exception:  # noqa: BLE001 (no ptxas in this Triton install)
        return None


def compile_one(job: dict) -> dict:
    """Compile one job for sm_90; adds shared, cubin_bytes, registers, spill_bytes, wgmma_serialized."""
    fn = _kernels()[job["kernel"]]
    elt = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[job["dtype"]]
    consts = dict(job["constexprs"], INPUT_PRECISION=job["precision"], INTERPRET=False)
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    sig, attrs = {}, {}
    for j, a in enumerate(fn.arg_names):
        if a in consts:
            sig[a] = "constexpr"
        elif a.endswith("_ptr"):
            sig[a] = "*fp32" if a in FP32_ARGS else "*" + elt
            attrs[(j,)] = [["tt.divisibility", 16]]  # what a real launch specialises on: 16-byte aligned
        elif a in FLOAT_ARGS:
            sig[a] = "fp32"
        else:
            sig[a] = "i32"
            if a in ("H", "I_DIM", "C", "K_SPLIT"):  # the real widths are multiples of 16 (not N, not r)
                attrs[(j,)] = [["tt.divisibility", 16]]
    out = dict(job, error=None)
    try:
        out.update(compile_for_sm90(fn, sig, consts, job["num_warps"], job["num_stages"], attrs))
    except Exception as e:  # noqa: BLE001 (reported per kernel)
        out["error"] = repr(e)[:2000]
    return out


def compile_for_sm90(fn: object, signature: dict, constexprs: dict, num_warps: int, num_stages: int | None = None,
                     attrs: dict | None = None) -> dict:  # fmt: skip
    """Compile Triton kernel `fn` for an H100 (sm_90) on this machine: signature {arg: "*bf16" | "i32" | ...,
    constexpr args: "constexpr"}, their constexprs, launch options. Returns shared (bytes), cubin_bytes,
    registers, spill_bytes, wgmma_serialized (the last three None without ptxas). Raises what Triton raises."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = {"num_warps": num_warps} | ({} if num_stages is None else {"num_stages": num_stages})
    k = triton.compile(ASTSource(fn, signature, constexprs, attrs or {}), target=GPUTarget("cuda", 90, 32),
                       options=options)  # fmt: skip
    out = dict(shared=k.metadata.shared, cubin_bytes=len(k.asm["cubin"]), registers=None, spill_bytes=None,
               wgmma_serialized=None)  # fmt: skip
    ptxas = _ptxas()
    if ptxas is not None:
        with tempfile.TemporaryDirectory() as tmp:
            with open(tmp + "/k.ptx", "w") as f:
                f.write(k.asm["ptx"])
            log = subprocess.run([ptxas, "-arch=sm_90a", "-v", tmp + "/k.ptx", "-o", tmp + "/k.o"],
                                 capture_output=True, text=True).stderr  # fmt: skip
        regs = re.findall(r"Used (\d+) registers", log)
        spills = re.findall(r"(\d+) bytes spill stores", log)
        out["registers"] = int(regs[0]) if regs else None
        out["spill_bytes"] = int(spills[0]) if spills else None
        out["wgmma_serialized"] = any(tag in log for tag in ("C7514", "C7515", "instructions are serialized"))
    return out


def problems(rows: list[dict]) -> list[str]:
    """What would fail on an H100: a compile error, too much shared memory, (16-bit) spills or serialised
    wgmma."""
    bad = []
    for row in rows:
        tag = f"{row['kernel']} {row['dtype']} {row['constexprs']} w{row['num_warps']} s{row['num_stages']}"
        if row["error"]:
            bad.append(f"{tag}: {row['error'][:300]}")
        elif row["shared"] > H100_SMEM:
            bad.append(f"{tag}: shared memory {row['shared']} > {H100_SMEM}")
        elif row["dtype"] != "float32" and (row["spill_bytes"] or row["wgmma_serialized"]):
            bad.append(f"{tag}: spills {row['spill_bytes']} B, wgmma serialised {row['wgmma_serialized']}")
    return bad


def table(rows: list[dict], triton_version: str) -> str:
    """A markdown table: kernel x tile x dtype (Triton version in the header)."""
    lines = [f"| kernel | dtype | tile (M, N, K) / split | warps, stages | regs | spills (B) | smem (KiB) | "
             f"used at (Triton {triton_version}) |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in sorted(rows, key=lambda r: (r["kernel"], r["dtype"], r["precision"], str(r["constexprs"]))):
        c = row["constexprs"]
        tile = f"{c.get('BLOCK_M', '')}x{c.get('BLOCK_N', c.get('BLOCK', ''))}x{c.get('BLOCK_K', '-')}"
        tile += f" r{c.get('R_PAD', c.get('RS_PAD', ''))}" if ("R_PAD" in c or "RS_PAD" in c) else ""
        tile += f" /{c['SPLIT_K']}" if "SPLIT_K" in c else ""
        flags = ",".join(k.lower() for k in ("SAVE", "NEED_DA", "NEED_DX", "SAVE_R") if c.get(k))
        dt = row["dtype"] + ("/tf32" if row["dtype"] == "float32" and row["precision"] == "tf32" else "")
        sizes = sorted({s.split(" r=")[0] for s in row["sizes"]})
        used = ", ".join(sizes[:4]) + (f" +{len(sizes) - 4}" if len(sizes) > 4 else "")
        smem = "ERR" if row["error"] else f"{row['shared'] / 1024:.0f}"
        lines.append(f"| {row['kernel']} [{flags}] | {dt} | {tile} | {row['num_warps']}, {row['num_stages']} | "
                     f"{row.get('registers')} | {row.get('spill_bytes')} | {smem} | {used} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="bfloat16,float16,float32")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", help="write the rows here (default: print them)")
    p.add_argument("--table", action="store_true", help="also print a markdown table")
    args = p.parse_args(argv)
    import triton

    dtypes = args.dtypes.split(",")
    precisions = {d: (["ieee", "tf32"] if d == "float32" else ["tf32"]) for d in dtypes}
    todo = jobs(dtypes, precisions)
    if args.workers > 1:
        import multiprocessing

        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(compile_one, todo))
    else:
        rows = [compile_one(j) for j in todo]
    text = json.dumps({"triton": triton.__version__, "rows": rows})
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    else:
        print(text)
    if args.table:
        print(table(rows, triton.__version__))
    bad = problems(rows)
    for line in bad:
        print("PROBLEM", line, file=sys.stderr)
    print(f"compiled {len(rows)} kernels for sm_90 with Triton {triton.__version__}: {len(bad)} problems",
          file=sys.stderr)  # fmt: skip
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
