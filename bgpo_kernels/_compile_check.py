"""Compile the Triton kernels for sm_80 / sm_90 on a machine without a GPU, and report their resources.

The interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute, not that they compile for a
GPU: this script runs Triton's real compiler (TTIR -> TTGIR -> PTX) for a chosen architecture and
``ptxas -v`` (shipped with triton) on the PTX, for every autotune config, and prints the shared memory,
registers and spill bytes of each.  It fails on a compile error, on shared memory over the
architecture's limit, or (with ``--strict``) on register spills of any config: bf16, fp16, fp32 with IEEE
products (``fp32``, the FMA path: what fp32 inputs run by default) and with TF32 products (``fp32-tf32``,
under ``torch.set_float32_matmul_precision("high")``), and bf16 rows against an fp32 W (``bf16+w32``).

Operands are marked 16-byte aligned (``tt.divisibility=16``) as Triton does at a real launch with
torch tensors and H, V multiples of 16; without that hint the loads are not pipelined.

    python -m bgpo_kernels._compile_check --arch 90 --strict
    python -m bgpo_kernels._compile_check --arch 80 --kernels fwd --dtypes bf16 fp32
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("unset TRITON_INTERPRET: this script compiles the kernels for a GPU")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from . import _configs  # noqa: E402
from . import fused_elbo_loss as fel  # noqa: E402
from ._fused_elbo_kernels import _CELLS  # noqa: E402
from . import random_mask as rm  # noqa: E402

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # opt-in dynamic shared memory per block
DTYPE = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32", "fp32-tf32": "*fp32"}
DTYPES = ["bf16", "fp16", "fp32", "fp32-tf32", "bf16+w32"]
# "bf16+w32": bf16 rows against an fp32 W, rounded per tile (autocast with an fp32 LM head: ROUND_W)
ALIGNED_INTS = {"H", "V", "V_SPLIT", "stride_w", "stride_dz", "C", "stride_ids", "stride_maskable",
                "stride_noisy", "stride_masked"}
ELBO_KERNELS = ("fwd", "dz", "grad_w", "grad_h")


def _jit_function(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def compile_kernel(kernel, types: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int,
                   enable_fp_fusion: bool = True) -> dict:
    """Compile one specialisation; returns shared bytes, registers, spill bytes and the FMA count."""
    fn = _jit_function(kernel)
    signature = {name: "constexpr" if name in constexprs else types[name] for name in fn.arg_names}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if name not in constexprs and (signature[name].startswith("*") or name in ALIGNED_INTS)
    }
    compiled = triton.compile(
        ASTSource(fn, signature, constexprs, attrs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": enable_fp_fusion},
    )
    ptx = compiled.asm["ptx"]
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, f"-arch=sm_{arch}{'a' if arch == 90 else ''}", "-v", path, "-o",
                              os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True, check=True)
    registers = int(re.search(r"Used (\d+) registers", out.stderr).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", out.stderr).group(1))
    return {"shared": compiled.metadata.shared, "registers": registers, "spills": spills,
            "fma": ptx.count("fma.rn.f32")}


def _elbo_cases(kernel: str, dtype: str):
    """(kernel, argument types, constexpr flags, config table) of one kernel of the fused ELBO op."""
    compute, _, weight = dtype.partition("+")
    ptr = DTYPE[compute]
    wptr = "*fp32" if weight == "w32" else ptr
    precision = "ieee" if dtype == "fp32" else "tf32"
    element_size = 4 if compute.startswith("fp32") else 2
    rounding = dict(ROUND_W=wptr != ptr, BF16_BITS=False)
    logit_flags = dict(DOT_PRECISION=precision, GROUP_N=8, HAS_BIAS=True, HAS_SOFTCAP=True, EVEN_V=False,
                       EVEN_H=True, UPCAST=False, **rounding)
    if kernel == "fwd":
        types = dict(h_ptr=ptr, weight_ptr=wptr, bias_ptr=ptr, y_ptr="*i64", max_ptr="*fp32", sum_ptr="*fp32",
                     target_logit_ptr="*fp32", N="i32", H="i32", V="i32", V_SPLIT="i32", S="i32", stride_w="i32",
                     softcap="fp32", N_BUCKET="i32")
        return fel._fwd_kernel, types, logit_flags, _configs.FWD, element_size
    if kernel == "dz":
        types = dict(h_ptr=ptr, weight_ptr=wptr, bias_ptr=ptr, y_ptr="*i64", lse_ptr="*fp32", coef_ptr="*fp32",
                     dz_ptr=ptr, skip_ptr="*i8", N="i32", H="i32", V="i32", v0="i32", VC="i32", stride_w="i32",
                     stride_dz="i32", stride_skip="i32", softcap="fp32", filter_eps="fp32", N_BUCKET="i32")
        return fel._dz_kernel, types, dict(logit_flags, FILTER=True), _configs.DZ, element_size
    if kernel == "grad_w":
        types = dict(h_ptr=ptr, dz_ptr=ptr, grad_w_ptr=wptr, grad_b_ptr=ptr, skip_ptr="*i8", N="i32", H="i32", V="i32",
                     v0="i32", VC="i32", stride_dz="i32", stride_skip="i32", N_BUCKET="i32")
        flags = dict(NEED_WEIGHT=True, NEED_BIAS=True, DOT_PRECISION=precision, GROUP_V=8, UPCAST=False, FILTER=True)
        return fel._grad_w_kernel, types, flags, _configs.GRAD_W, element_size
    types = dict(dz_ptr=ptr, weight_ptr=wptr, grad_h_ptr="*fp32", skip_ptr="*i8", N="i32", H="i32", V="i32", v0="i32",
                 VC="i32", stride_dz="i32", stride_w="i32", stride_skip="i32", N_BUCKET="i32")
    flags = dict(FIRST=False, DOT_PRECISION=precision, GROUP_N=8, UPCAST=False, FILTER=True, **rounding)
    return fel._grad_h_kernel, types, flags, _configs.GRAD_H, element_size


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, choices=(80, 90), default=90)
    parser.add_argument("--kernels", nargs="*", default=[*ELBO_KERNELS, "reduce", "random_mask"])
    parser.add_argument("--dtypes", nargs="*", default=DTYPES, choices=DTYPES)
    parser.add_argument("--first", action="store_true", help="only the first autotune config of each list")
    parser.add_argument("--strict", action="store_true", help="fail on register spills of any config")
    args = parser.parse_args(argv)
    failures = []

    def report(name, result):
        print(f"{name:<60} shared {result['shared']:>6} B  registers {result['registers']:>3}  "
              f"spills {result['spills']:>5} B", flush=True)
        if result["shared"] > SMEM_LIMIT[args.arch]:
            print(f"    (over the {SMEM_LIMIT[args.arch]} B shared-memory limit: the autotuner skips it)")
        if args.strict and result["spills"]:
            failures.append(f"{name}: {result['spills']} bytes of register spills")

    for kernel_name in ELBO_KERNELS:
        if kernel_name not in args.kernels:
            continue
        for dtype in args.dtypes:
            kernel, types, flags, table, element_size = _elbo_cases(kernel_name, dtype)
            listed = table.for_operands(args.arch, element_size)
            configs = listed[:1] if args.first else listed
            # the backward kernels: exact (the default) and with gradient filtering (cells: the default dz tile)
            variants = (False, True) if "FILTER" in flags else (None,)
            for config, filtering in [(c, f) for c in configs for f in variants]:
                name = (f"{kernel_name} sm_{args.arch} {dtype} {config.kwargs['BLOCK_N']}x{config.kwargs['BLOCK_V']}"
                        f"x{config.kwargs['BLOCK_H']} w{config.num_warps} s{config.num_stages}"
                        f"{' filtered' if filtering else ''}")
                constexprs = dict(config.kwargs, **flags)
                if filtering is not None:
                    constexprs["FILTER"] = filtering
                if kernel_name in ("grad_w", "grad_h"):  # the cells of the default dz tile, as the launcher sets
                    cell = _configs.DZ.for_operands(args.arch, element_size)[0].kwargs
                    constexprs.update(FILTER_N=cell["BLOCK_N"], FILTER_V=cell["BLOCK_V"])
                    named = dict(constexprs, skip_ptr=None if filtering is False else "flags")
                    constexprs.update({flag: rule(named) for flag, rule in _CELLS.items() if flag.startswith("CELLS")})
                try:
                    result = compile_kernel(kernel, types, constexprs, args.arch, config.num_warps, config.num_stages)
                except Exception as err:  # noqa: BLE001 - report every failing specialisation
                    failures.append(f"{name}: {type(err).__name__}: {err}")
                    continue
                report(name, result)
    if "reduce" in args.kernels:
        types = dict(max_ptr="*fp32", sum_ptr="*fp32", target_logit_ptr="*fp32", rows_ptr="*i64",
                     segment_ptr="*i64", elbo_weight_ptr="*fp32", elbo_ptr="*fp32", lse_ptr="*fp32", S="i32")
        report(f"reduce sm_{args.arch}", compile_kernel(fel._reduce_kernel, types, dict(BLOCK_R=128), args.arch, 4, 1))
    if "random_mask" in args.kernels:
        types = dict(ids_ptr="*i64", maskable_ptr="*u8", sequence_ids_ptr="*i64", noisy_ptr="*i64", masked_ptr="*u8",
                     weight_ptr="*fp32", C="i32", stride_ids="i32", stride_maskable="i32", stride_noisy="i32",
                     stride_masked="i32", mask_id="i32", seed="i64", sample_index="i32", num_samples="i32",
                     span="fp32", inv_n="fp32")
        for stratified, single, stratify_t in ((True, True, False), (True, False, False), (False, True, True)):
            name = f"random_mask sm_{args.arch} stratified={stratified} single_tile={single} stratify_t={stratify_t}"
            result = compile_kernel(rm._random_mask_fwd_kernel, types,
                                    dict(STRATIFIED=stratified, STRATIFY_T=stratify_t, LENGTH_NORMALIZE=True,
                                         KEY_BITS=9, BLOCK_C=512, SINGLE_TILE=single),
                                    args.arch, 4, 1, enable_fp_fusion=False)
            report(name, result)
            if result["fma"]:  # bit-exactness with the torch path needs separate roundings
                failures.append(f"{name}: {result['fma']} fp32 FMA instructions with enable_fp_fusion=False")
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
