"""Benchmark: input-sparse MLP linears against cuBLAS, on a CUDA GPU.

For each MLP shape (Gemma-3 1B/4B/12B/27B, Llama-3.1-8B), layer (``gate_up_proj``: K = hidden,
N = 2 x intermediate; ``down_proj``: K = intermediate, N = hidden), sparsity s in
{0, .3, .5, .7, .9} and decode batch M in {1, 2, 4, 8}, it times (``triton.testing.do_bench``,
which flushes L2 before every repetition, so weights come from HBM as they do in a full model;
p50/p20/p80 in ms):

- ``dense``: cuBLAS, ``F.linear(x, W)`` with W [N, K] row-major (what vLLM runs without the plugin);
- ``sparse``: threshold kernel + input-sparse GEMV, as
  ``triton_backend.input_sparse_linear`` runs them;
- ``threshold`` and ``gemv``: the two kernels alone.

and prints / appends to a CSV: sparse / dense, the share of the ideal reached
(``bound_reached = kept_frac * dense / sparse``: 1.0 means time fell exactly with the kept share
1 - s; ``union_bound_reached`` uses the share of weight rows actually loaded, the union over the M
rows), and threshold / dense. Each configuration's output is first checked against the reference of
tests/kernels/gemv_reference.py.

Inputs: x [M, K] = per-column scale (log-normal, shared by all rows, as real channels have
consistent magnitudes; ``--column-spread``) x per-entry normal noise. p is calibrated per s on the
generated x: the mean over rows of the mass share of each row's top (1 - s) K entries, so the
kept share is about 1 - s (the measured ``kept_frac`` is reported). Row masks of independent noise
overlap less than real ones may; ``union_frac`` shows how much W the batch really reads.

Run: ``python kernels/bench/bench_sparse_mlp.py [--dtype bf16|fp16] [--csv PATH] [--models ..]``
(estimated 2-4 minutes on an H100-class GPU: not yet run on one). Without CUDA it exits with a
message and measures nothing.
"""

import argparse
import csv
import datetime
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
# (hidden, intermediate) per model.
SHAPES = {
    "gemma-3-1b": (1152, 6912),
    "gemma-3-4b": (2560, 10240),
    "gemma-3-12b": (3840, 15360),
    "gemma-3-27b": (5376, 21504),
    "llama-3.1-8b": (4096, 14336),
}
SPARSITIES = (0.0, 0.3, 0.5, 0.7, 0.9)
BATCHES = (1, 2, 4, 8)
DEVICE = "cuda"  # a module constant so that a dry run can point it elsewhere


def git_sha() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def make_x(m: int, k: int, dtype: torch.dtype, spread: float, gen: torch.Generator) -> torch.Tensor:
    column_scale = torch.randn(k, generator=gen, device=DEVICE).mul(spread).exp()
    return (torch.randn(m, k, generator=gen, device=DEVICE) * column_scale).to(dtype)


def calibrate_p(x: torch.Tensor, s: float) -> float:
    """p whose top-p rule keeps about (1 - s) of each row of x: the mean share of |x| mass held by
    each row's top round((1 - s) K) entries."""
    if s == 0.0:
        return 1.0
    a = x.abs().double().sort(dim=-1, descending=True).values
    k = max(1, round((1.0 - s) * x.shape[1]))
    return float((a[:, :k].sum(-1) / a.sum(-1)).mean())


def ms(fn, bench) -> tuple[float, float, float]:
    return tuple(bench(fn, quantiles=[0.5, 0.2, 0.8]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--csv", default="bench_sparse_mlp.csv", help="CSV to append rows to")
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    ap.add_argument("--column-spread", type=float, default=1.0,
                    help="std of the log column scale (0: independent row masks)")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        print("bench_sparse_mlp: no CUDA GPU here (torch.cuda.is_available() is False); it times "
              "Triton kernels against cuBLAS and needs one. Nothing was measured.", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench_sparse_mlp: unset TRITON_INTERPRET (the interpreter cannot be timed)",
              file=sys.stderr)
        return 2

    import triton
    from triton.testing import do_bench

    from vllm_sparsity.kernels import triton_backend
    from vllm_sparsity.kernels.sparse_gemv import _sparse_gemv
    from vllm_sparsity.kernels.top_p_threshold import launch as threshold

    # The tests' reference, loaded from its file (tests/ is no package).
    spec = importlib.util.spec_from_file_location(
        "gemv_reference", REPO / "tests" / "kernels" / "gemv_reference.py")
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    assert_close_to_ref, ref_sparse_gemv = reference.assert_close_to_ref, reference.ref_sparse_gemv

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    gpu, sha = torch.cuda.get_device_name(), git_sha()
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    path = Path(args.csv)
    new_file = not path.exists()
    out = path.open("a", newline="")
    writer = csv.writer(out)
    header = ["time_utc", "gpu", "git_sha", "torch", "triton", "dtype", "model", "layer", "M", "K",
              "N", "s_target", "p", "kept_frac", "union_frac", "dense_ms_p50", "dense_ms_p20",
              "dense_ms_p80", "sparse_ms_p50", "sparse_ms_p20", "sparse_ms_p80", "gemv_ms_p50",
              "threshold_ms_p50", "sparse_over_dense", "bound_reached", "union_bound_reached",
              "threshold_over_dense", "m_max"]
    if new_file:
        writer.writerow(header)
    print(f"{gpu}  {args.dtype}  git {sha}  -> {path}")
    print(f"{'model':<13} {'layer':<8} {'M':>2} {'s':>4} {'kept':>5} {'union':>5} {'dense ms':>9} "
          f"{'sparse ms':>9} {'sp/dn':>6} {'bound':>6} {'u-bnd':>6} {'thr/dn':>6}")

    for model in args.models:
        hidden, inter = SHAPES[model]
        for layer, K, N in (("gate_up", hidden, 2 * inter), ("down", inter, hidden)):
            w = (torch.randn(N, K, generator=gen, device=DEVICE) * K**-0.5).to(dtype)
            wt = w.t().contiguous()  # the K-major copy triton_backend.prepare makes
            for M in args.batches:
                x = make_x(M, K, dtype, args.column_spread, gen)
                dense = ms(lambda: F.linear(x, w), do_bench)
                for s in SPARSITIES:
                    p = torch.tensor([calibrate_p(x, s)], dtype=torch.float64, device=DEVICE)
                    thr, kept = threshold(x, p, None)
                    y = triton_backend.input_sparse_linear(x, p, wt, None, triton_backend.M_MAX)[0]
                    assert_close_to_ref(y, *ref_sparse_gemv(x, p, w), K)
                    code = x.view(torch.int16).to(torch.int32) & 0x7FFF
                    union = float((code >= thr[:, None]).any(0).float().mean())
                    kept_frac = float(kept.double().mean()) / K
                    sparse = ms(lambda: _sparse_gemv(x, threshold(x, p, None)[0], wt), do_bench)
                    gemv = ms(lambda: _sparse_gemv(x, thr, wt), do_bench)
                    thr_ms = ms(lambda: threshold(x, p, None), do_bench)
                    row = dict(zip(header, [
                        stamp, gpu, sha, torch.__version__, triton.__version__, args.dtype, model,
                        layer, M, K, N, s, float(p), kept_frac, union, *dense, *sparse, gemv[0],
                        thr_ms[0], sparse[0] / dense[0], kept_frac * dense[0] / sparse[0],
                        union * dense[0] / sparse[0], thr_ms[0] / dense[0], triton_backend.M_MAX]))
                    writer.writerow(row.values())
                    out.flush()
                    print(f"{model:<13} {layer:<8} {M:>2} {s:>4} {kept_frac:>5.2f} {union:>5.2f} "
                          f"{dense[0]:>9.4f} {sparse[0]:>9.4f} {row['sparse_over_dense']:>6.2f} "
                          f"{row['bound_reached']:>6.2f} {row['union_bound_reached']:>6.2f} "
                          f"{row['threshold_over_dense']:>6.2f}")
            del w, wt
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
