"""Compile every kernel configuration the launchers can pick for sm_80 and sm_90, without a GPU.

``python -m vllm_sparsity.kernels.compile_check`` prints registers and spill bytes per kernel,
configuration and architecture, and exits 1 if anything spills. ``triton.compile`` builds the
cubin with no device present; its metadata has no register counts (those come from the driver at
load time), so each build runs in a fresh Triton cache (a cached cubin skips ptxas) with Triton's
``dump_ptxas_log`` knob on: the counts are those of the ptxas command this Triton version itself
runs (flags and ptxas differ between versions: 3.7 added ``--regAllocOptLevel=2``; 3.9 builds
sm_90 with CUDA 13's ptxas).

Must run with TRITON_INTERPRET unset: under it ``@triton.jit`` builds interpreter functions, which
cannot be compiled (the tests run this module in a subprocess for that reason).
``kernels/version_matrix.py`` runs it under other Triton versions.
"""

import argparse
import hashlib
import itertools
import json
import os
import re
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from vllm_sparsity.codes import CODE_BITS, INF_CODE, SHORT_NAMES

ARCHS = (80, 90)
_DTYPE = {name: dtype for dtype, name in SHORT_NAMES.items()}  # "bf16" -> torch.bfloat16
_TY = {name: f"*{name}" for name in _DTYPE}


# Integer arguments that are multiples of 16 for real models (hidden and intermediate sizes, their
# TP shards, strides of contiguous tensors). The JIT specialises such launches with divisibility
# hints (vectorised loads), so each kernel is checked both with the hints ("aligned", as models
# run) and without ("unaligned", any other shape, e.g. the tests').
_ALIGNED_INTS = {"K", "N", "MN", "k_per_split", "stride_xm", "stride_ym", "stride_wk", "stride_os",
                 "stride_om"}


def configs() -> list[tuple[str, str, dict, dict, int, int]]:
    """``(label, kernel name, signature, constexprs, num_warps, num_stages)`` of every launch the
    launchers can make (block sizes are the modules' constants, so this follows any retuning)."""
    from vllm_sparsity.kernels import sparse_gemv as g
    from vllm_sparsity.kernels import top_p_threshold as t

    out = []
    for dt, write_y in itertools.product(("bf16", "fp16", "fp32"), (False, True)):
        bits, inf = CODE_BITS[_DTYPE[dt]], INF_CODE[_DTYPE[dt]]
        sig = {"x_ptr": _TY[dt], "p_ptr": "*fp64", "thr_ptr": "*i32", "kept_ptr": "*i64",
               "y_ptr": _TY[dt], "K": "i32", "stride_xm": "i32", "stride_ym": "i32",
               "stride_pm": "i32", "CODE_BITS": "constexpr", "INF_CODE": "constexpr", "BLOCK": "constexpr",
               "WRITE_Y": "constexpr"}
        out.append((f"{dt} write_y={int(write_y)}", "top_p_threshold._top_p_threshold_kernel", sig,
                    {"CODE_BITS": bits, "INF_CODE": inf, "BLOCK": t.BLOCK, "WRITE_Y": write_y},
                    t.NUM_WARPS, 3))
    for dt in ("bf16", "fp16", "fp32"):
        sig = {"x_ptr": _TY[dt], "lo_ptr": "*i64", "out_ptr": "*fp64", "K": "i32",
               "stride_xm": "i32", "shift": "i32", "CODE_BITS": "constexpr", "BLOCK": "constexpr"}
        out.append((dt, "top_p_threshold._top_p_partial_mass_kernel", sig,
                    {"CODE_BITS": CODE_BITS[_DTYPE[dt]], "BLOCK": t.BLOCK}, t.NUM_WARPS, 3))
    for dt, bias, partial in itertools.product(("bf16", "fp16"), (False, True), (False, True)):
        sig = {"x_ptr": _TY[dt], "thr_ptr": "*i32", "wt_ptr": _TY[dt], "bias_ptr": _TY[dt],
               "out_ptr": "*fp32" if partial else _TY[dt], "M": "i32", "N": "i32", "K": "i32",
               "k_per_split": "i32", "stride_xm": "i32", "stride_wk": "i32", "stride_os": "i32",
               "stride_om": "i32", "HAS_BIAS": "constexpr", "PARTIAL": "constexpr",
               "UPCAST_DOT": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
               "BLOCK_K": "constexpr"}
        out.append((f"{dt} bias={int(bias)} partial={int(partial)}",
                    "sparse_gemv._sparse_gemv_kernel", sig,
                    {"HAS_BIAS": bias, "PARTIAL": partial, "UPCAST_DOT": False,
                     "BLOCK_M": g.BLOCK_M, "BLOCK_N": g.BLOCK_N, "BLOCK_K": g.BLOCK_K},
                    g.NUM_WARPS, g.NUM_STAGES))
    for dt, bias in itertools.product(("bf16", "fp16"), (False, True)):
        sig = {"part_ptr": "*fp32", "bias_ptr": _TY[dt], "out_ptr": _TY[dt], "MN": "i32",
               "N": "i32", "SPLIT_K": "i32", "HAS_BIAS": "constexpr", "BLOCK": "constexpr"}
        out.append((f"{dt} bias={int(bias)}", "sparse_gemv._split_k_reduce_kernel", sig,
                    {"HAS_BIAS": bias, "BLOCK": g.REDUCE_BLOCK}, 4, 3))
    return out


def _attrs(sig: dict, aligned: bool) -> dict:
    """Divisibility hints as the JIT gives them: 16-byte aligned pointers, ints % 16 == 0."""
    if not aligned:
        return {}
    return {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(sig.items())
            if ty.startswith("*") or name in _ALIGNED_INTS}


def _compile(job) -> dict:
    label, kernel_name, sig, constexprs, num_warps, num_stages, arch, aligned = job
    import contextlib
    import importlib
    import io

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    module, name = kernel_name.split(".")
    fn = getattr(importlib.import_module(f"vllm_sparsity.kernels.{module}"), name)
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=_attrs(sig, aligned))
    log = io.StringIO()
    with tempfile.TemporaryDirectory() as cache, contextlib.redirect_stdout(log):
        triton.knobs.cache.dir = cache
        triton.knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas -v's report
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
    report = log.getvalue()
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if regs is None or spills is None:
        raise RuntimeError(f"no ptxas report for {name} {label} sm_{arch}: {report[-2000:]!r}")
    return {"kernel": name, "config": label + (" aligned" if aligned else " unaligned"),
            "arch": f"sm_{arch}a" if arch >= 90 else f"sm_{arch}", "num_warps": num_warps,
            "n_regs": int(regs.group(1)), "n_spills": int(spills.group(1)) + int(spills.group(2)),
            "shared_bytes": compiled.metadata.shared, "triton": triton.__version__,
            "ptxas": get_ptxas(arch).version}


def _key(job) -> str:
    """What decides a build's registers: the kernel source and its callees, signature, constexprs
    and hints (``ASTSource.hash``), target, options, this Triton and its ptxas."""
    label, kernel_name, sig, constexprs, num_warps, num_stages, arch, aligned = job
    import importlib

    import triton
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    module, name = kernel_name.split(".")
    fn = getattr(importlib.import_module(f"vllm_sparsity.kernels.{module}"), name)
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=_attrs(sig, aligned))
    parts = [src.hash(), arch, num_warps, num_stages, triton.__version__, get_ptxas(arch).path,
             os.environ.get("TRITON_DEFAULT_FP_FUSION", "")]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _cache_file() -> Path:
    import triton

    from vllm_sparsity.cache import cache_dir

    return cache_dir() / "compile-check" / f"triton-{triton.__version__}.json"


def check(archs=ARCHS, workers: int = 2, use_cache: bool = True) -> list[dict]:
    """Compile every ``configs()`` entry for each arch; one dict per (config, arch).

    Results are cached per Triton version under ``cache.cache_dir() / "compile-check"``,
    keyed by everything that decides the build (``_key``): a changed kernel is compiled again,
    an unchanged one is not (``use_cache=False`` compiles everything).
    """
    jobs = [(*c, arch, aligned) for c in configs() for arch in archs for aligned in (True, False)]
    keys = [_key(job) for job in jobs]
    cache_file = _cache_file()
    cached = json.loads(cache_file.read_text()) if use_cache and cache_file.exists() else {}
    todo = [(key, job) for key, job in zip(keys, jobs) if key not in cached]
    if todo:
        with ProcessPoolExecutor(workers) as pool:
            cached.update(zip([k for k, _ in todo], pool.map(_compile, [j for _, j in todo])))
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({k: cached[k] for k in keys}))
        tmp.replace(cache_file)
    return [cached[k] for k in keys]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_sparsity.kernels.compile_check",
        description="Compile every kernel configuration for sm_80 and sm_90 (no GPU needed); "
                    "exit 1 if any spills registers.")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--no-cache", action="store_true",
                        help="compile everything, ignoring cached results of unchanged builds")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)",
              file=sys.stderr)
        return 2
    # The launchers leave FP fusion at Triton's default (on); 3.9 warns once per process unless set.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    results = check(use_cache=not args.no_cache)
    if args.json:
        print(json.dumps(results))
    else:
        import triton

        print(f"triton {triton.__version__}")
        for r in results:
            print(f"{r['kernel']:<28} {r['config']:<26} {r['arch']:<6} warps={r['num_warps']} "
                  f"regs={r['n_regs']:<4} spills={r['n_spills']} smem={r['shared_bytes']}")
    return 1 if any(r["n_spills"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
