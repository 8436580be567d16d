"""One GPU check of the Triton kernels: correctness on CUDA, then timings against cuBLAS.

Run on a CUDA machine from a plain checkout (needs only torch and triton: no vLLM, no install, no
network, no weights; planned to take under 6 minutes on one H100/H200)::

    PYTHONUNBUFFERED=1 python kernels/bench/gpu_check.py --out DIR

1. Correctness (every check is counted; any failure makes the exit status 1). For bf16 and fp16,
   M = 1..16 and the MLP linears of the models below (K up to 21504), with edge rows (all zero,
   a NaN, a massive outlier, a tie) when M >= 4:
   - ``top_p_threshold``: the kept set (``code(x) >= thr``) and kept counts equal those of the torch
     rule ``vllm_sparsity.rule.top_p_mask``; ``top_p_sparsify`` equals ``where(mask, x, 0)``;
   - ``sparse_gemv`` and ``input_sparse_linear`` (the op the plugin runs, both sides of
     ``triton_backend.M_MAX``): outputs within the float64-reference bound of
     ``tests/kernels/gemv_reference.py``, kept counts and weight rows read exact;
   - one ``input_sparse_linear`` captured in ``torch.cuda.graph`` and replayed on new x and p:
     bit-equal to eager; one sparse MLP through ``torch.compile(fullgraph=True)``: its first linear
     bit-equal to eager, its second within the bound of the reference on the compiled input.
2. Timings, bf16 (``--dtype``), CUDA events, median of ``--reps`` (default 100) replays of a CUDA
   graph per configuration (as vLLM decodes), L2 flushed before each (every weight here is larger
   than an H100/H200 L2 as well): cuBLAS ``F.linear(x, W)`` (W [N, K] row-major) against the
   threshold kernel + sparse GEMV (K-major weight) on each MLP linear, and the whole MLP
   (gate_up_proj -> act-and-mul -> down_proj, thresholds included) against the dense MLP, at
   s in {0.3, 0.5, 0.7} and M in {1, 2, 4, 8, 16}. p is calibrated per s so that each row keeps
   about 1 - s of its entries (x: log-normal column scales times normal noise). Also timed: the
   sparse GEMV alone, the threshold alone, and ``input_sparse_linear`` (the plugin's op, with its
   counting, sparse only up to M_MAX).
3. A small sweep of block sizes (sparse GEMV: BLOCK_N x BLOCK_K, then warps; threshold: BLOCK x
   warps) on Gemma-3-27B's shapes at s = 0.5, each configuration checked against the reference.
   ``--no-sweep`` skips it.

Writes ``gpu_check.csv`` (one row per model, op, M, s; columns ``COLUMNS``) and ``gpu_check.png``
(sparse / dense time against s, one line per M; skipped with a message when matplotlib is absent)
to ``--out``, prints the M_MAX and block sizes the data supports, and one summary line last.

``--smoke`` runs the same code on CPU under ``TRITON_INTERPRET=1`` with a tiny shape and a few
repetitions (CUDA graphs, torch.compile and CUDA events are skipped, with a message; times are
wall-clock and mean nothing): what ``tests/kernels/test_gpu_check.py`` runs.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import itertools
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# name -> (hidden, intermediate, activation of the act-and-mul); from the models' HF configs.
MODELS = {
    "gemma-3-27b": (5376, 21504, "gelu_tanh"),
    "llama-3.1-8b": (4096, 14336, "silu"),
    "qwen2.5-7b": (3584, 18944, "silu"),
}
SMOKE_MODELS = {"tiny": (64, 96, "gelu_tanh")}
SPARSITIES = (0.3, 0.5, 0.7)
BATCHES = (1, 2, 4, 8, 16)
SMOKE_SPARSITIES = (0.5,)
SMOKE_BATCHES = (1, 2)
OPS = ("gate_up_proj", "down_proj", "mlp")
COLUMNS = ("gpu", "torch", "triton", "git_sha", "dtype", "model", "op", "M", "K", "N", "s",
           "p_input", "p_intermediate", "kept_frac", "read_frac", "dense_us", "sparse_us",
           "gemv_us", "threshold_us", "plugin_us", "sparse_over_dense", "gemv_over_dense",
           "plugin_over_dense", "launch", "reps")


def use_checkout(repo: Path = REPO):
    """Import ``vllm_sparsity`` and ``vllm_sparsity.kernels`` from the plain checkout at ``repo``.

    pyproject.toml installs the folder ``kernels/`` as the package ``vllm_sparsity.kernels``, which
    a ``sys.path`` entry cannot express: the repository root goes first on ``sys.path`` (so its
    ``vllm_sparsity/`` wins over any installed copy), and ``kernels/`` is registered under the
    package name with importlib (its submodules then import by that name). ``vllm_sparsity``'s
    ``__init__`` imports only its config module (standard library), so no vLLM is needed.

    Returns:
        The ``vllm_sparsity.kernels`` module (its ``__file__`` shows where it came from).

    Raises:
        ImportError: ``repo`` lacks ``vllm_sparsity/`` or ``kernels/__init__.py``, or another
            ``vllm_sparsity`` was imported first.
    """
    init = repo / "kernels" / "__init__.py"
    if not (repo / "vllm_sparsity" / "__init__.py").is_file() or not init.is_file():
        raise ImportError(f"{repo} is not a vllm-sparsity checkout (no vllm_sparsity/ or kernels/)")
    sys.path.insert(0, str(repo))
    import vllm_sparsity

    if Path(vllm_sparsity.__file__).resolve().parent != (repo / "vllm_sparsity").resolve():
        raise ImportError(f"vllm_sparsity was already imported from {vllm_sparsity.__file__}")
    name = "vllm_sparsity.kernels"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, init, submodule_search_locations=[str(init.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        vllm_sparsity.kernels = module
    return sys.modules[name]


def git_sha() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Checks:
    """Counts correctness checks; a failing one is printed and makes the exit status 1."""

    def __init__(self):
        self.passed, self.failed = 0, []

    def run(self, label: str, fn) -> None:
        try:
            fn()
            self.passed += 1
        except Exception as e:  # noqa: BLE001 -- every failure is reported, the run goes on
            self.failed.append(label)
            print(f"FAIL {label}: {type(e).__name__}: {str(e)[:500]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.csv and gpu_check.png")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU under TRITON_INTERPRET=1, tiny shapes (a test of this script)")
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16", help="of the timings")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed repetitions per configuration (default 100; 1 with --smoke)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the block-size sweep")
    args = ap.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        ap.error(f"--reps must be >= 1, got {args.reps}")
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    elif os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        ap.error("unset TRITON_INTERPRET (or pass --smoke): the interpreter cannot be timed")
    t_start = time.monotonic()
    kernels_pkg = use_checkout()

    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); run with --smoke "
              "for the CPU dry run. Nothing was checked.", file=sys.stderr)
        return 2
    import vllm_sparsity

    print(f"imports: vllm_sparsity from {Path(vllm_sparsity.__file__).parent}, "
          f"vllm_sparsity.kernels from {Path(kernels_pkg.__file__).parent}, "
          f"vllm loaded: {'vllm' in sys.modules}")
    run = Run(args, torch)
    run.correctness()
    run.timings()
    run.write_outputs()  # before the sweep: a run cut short still leaves the CSV and PNG
    if not args.no_sweep:
        try:
            run.sweep()
        except Exception as e:  # noqa: BLE001 -- the sweep only advises; report and go on
            print(f"sweep aborted: {type(e).__name__}: {str(e)[:500]}")
    run.report_supported()
    return run.summary(time.monotonic() - t_start)


class Run:
    """State of one check: device, dtype, models, kernels, correctness counts, CSV rows."""

    def __init__(self, args, torch):
        import triton

        sys.path.insert(0, str(REPO / "tests" / "kernels"))
        import gemv_reference  # the tests' float64 reference and tolerance (torch only)

        from vllm_sparsity import rule
        from vllm_sparsity.kernels import sparse_gemv, triton_backend, top_p_threshold

        self.args, self.torch, self.triton = args, torch, triton
        self.ref, self.rule = gemv_reference, rule
        self.mods = {"backend": triton_backend, "sparse_gemv": sparse_gemv,
                     "top_p_threshold": top_p_threshold}
        self.ops = torch.ops.vllm_sparsity
        self.smoke = args.smoke
        self.device = torch.device("cpu" if self.smoke else "cuda")
        self.models = SMOKE_MODELS if self.smoke else MODELS
        self.batches = SMOKE_BATCHES if self.smoke else BATCHES
        self.sparsities = SMOKE_SPARSITIES if self.smoke else SPARSITIES
        self.reps = args.reps or (1 if self.smoke else 100)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        self.m_max = triton_backend.M_MAX
        self.checks = Checks()
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.gen = torch.Generator(device=self.device).manual_seed(0)
        self.gpu = "cpu (smoke)" if self.smoke else torch.cuda.get_device_name()
        l2 = 0 if self.smoke else getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0)
        # Written before every timed repetition, so the weights come from HBM, not from L2.
        self.flush_buf = torch.empty(max(2 * l2, 1 << 20 if self.smoke else 256 << 20),
                                     dtype=torch.int8, device=self.device)
        self.sha = git_sha()
        print(f"gpu_check on {self.gpu}: torch {torch.__version__}, triton {triton.__version__}, "
              f"git {self.sha}, M_MAX {self.m_max}, timed dtype {args.dtype}, reps {self.reps}")

    # ---------------------------------------------------------------- inputs

    def make_x(self, m: int, k: int, dtype, edge_rows: bool = False):
        """[m, k] activations: log-normal per-column scale (shared by the rows, as real channels
        have consistent magnitudes) x per-row scale e^0..e^2 x normal noise; with ``edge_rows``
        (m >= 4) row 0 all zero, row 1 a NaN, row 2 a massive outlier, row 3 a tie at its top."""
        torch = self.torch
        col = torch.randn(k, generator=self.gen, device=self.device).exp()
        row = torch.rand(m, 1, generator=self.gen, device=self.device).mul(2).exp()
        x = (torch.randn(m, k, generator=self.gen, device=self.device) * col * row).to(dtype)
        if edge_rows and m >= 4:
            x[0] = 0
            x[1, k // 3] = float("nan")
            x[2, min(5, k - 1)] = 3000.0
            top = int(x[3].abs().argmax())
            x[3, (top + 1) % k] = -x[3, top]
        return x

    def make_w(self, n: int, k: int, dtype):
        """(W [N, K] row-major as vLLM holds it, Wt [K, N] the K-major copy the backend makes)."""
        w = self.torch.randn(n, k, generator=self.gen, device=self.device) * k**-0.5
        w = w.to(dtype)
        return w, w.t().contiguous()

    def ptensor(self, p: float):
        return self.torch.tensor([p], dtype=self.torch.float64, device=self.device)

    def calibrate_p(self, x, s: float) -> float:
        """p whose top-p rule keeps about 1 - s of each row of x: the mean share of |x| mass in
        each row's largest round((1 - s) K) entries."""
        a = x.abs().double().sort(dim=-1, descending=True).values
        k = max(1, round((1.0 - s) * x.shape[1]))
        return float((a[:, :k].sum(-1) / a.sum(-1)).mean())

    def keep_of(self, x, thr):
        """bool [M, K]: entries of x (bf16/fp16) with magnitude code >= thr (the kernels' rule)."""
        return (x.view(self.torch.int16).to(self.torch.int32) & 0x7FFF) >= thr[:, None]

    def act_and_mul(self, gate_up, act: str):
        F = self.torch.nn.functional
        inter = gate_up.shape[1] // 2
        gate, up = gate_up[:, :inter], gate_up[:, inter:]
        return (F.gelu(gate, approximate="tanh") if act == "gelu_tanh" else F.silu(gate)) * up

    # ---------------------------------------------------------------- correctness

    def check_linear(self, x, p: float, w, wt):
        """Threshold, sparsify, sparse GEMV and input_sparse_linear on (x, p) against the rule."""
        torch = self.torch
        pt = self.ptensor(p)
        mask = self.rule.top_p_mask(x, p)
        thr, kept = self.ops.top_p_threshold(x, pt)
        keep = self.keep_of(x, thr)
        assert torch.equal(keep, mask), f"kept set differs in {int((keep != mask).sum())} entries"
        assert torch.equal(kept, mask.sum(-1)), "kept counts differ from the rule's"
        y_s, kept_s = self.ops.top_p_sparsify(x, pt)
        assert torch.equal(y_s.view(torch.int16), torch.where(mask, x, 0).view(torch.int16)), \
            "top_p_sparsify output is not where(mask, x, 0) bit for bit"
        assert torch.equal(kept_s, kept)
        ref, mag = self.ref.ref_sparse_gemv(x, p, w)
        self.ref.assert_close_to_ref(self.ops.sparse_gemv(x, thr, wt, None, 0), ref, mag,
                                     x.shape[1])
        y, kept_op, read = self.ops.input_sparse_linear(x, pt, wt, None, self.m_max)
        self.ref.assert_close_to_ref(y, ref, mag, x.shape[1])
        assert torch.equal(kept_op, kept)
        want_read = mask.any(0).sum() if x.shape[0] <= self.m_max else x.shape[1]
        assert int(read) == int(want_read), f"columns_read {int(read)} != {int(want_read)}"

    def correctness(self):
        torch = self.torch
        t0 = time.monotonic()
        ms = (1, self.m_max + 1) if self.smoke else range(1, 17)
        for dtype in (torch.bfloat16, torch.float16):
            for model, (hidden, inter, _) in self.models.items():
                for op, K, N in (("gate_up_proj", hidden, 2 * inter), ("down_proj", inter, hidden)):
                    w, wt = self.make_w(N, K, dtype)
                    for M in ms:
                        p = (0.6, 0.9, 1.0)[M % 3]
                        x = self.make_x(M, K, dtype, edge_rows=True)
                        self.checks.run(f"{dtype} {model} {op} M={M} K={K} N={N} p={p}",
                                        lambda: self.check_linear(x, p, w, wt))
                    del w, wt
        print(f"correctness: {self.checks.passed} passed, {len(self.checks.failed)} failed "
              f"({time.monotonic() - t0:.0f} s)")
        if self.smoke:
            print("correctness: CUDA graph and torch.compile checks skipped (--smoke: no CUDA)")
            return
        self.checks.run("cuda graph capture and replay of input_sparse_linear", self.check_graph)
        self.checks.run("torch.compile of a sparse MLP", self.check_compile)
        print(f"correctness with graph and compile: {self.checks.passed} passed, "
              f"{len(self.checks.failed)} failed ({time.monotonic() - t0:.0f} s)")

    def check_graph(self):
        """Capture input_sparse_linear on static (x, p) for a sparse (M = 4) and a dense
        (M = 16 > M_MAX) batch, write new x and p, replay: bit-equal to eager, close to the
        reference."""
        torch = self.torch
        hidden, inter, _ = next(iter(self.models.values()))  # Gemma-3-27B: down_proj K = 21504
        w, wt = self.make_w(hidden, inter, torch.bfloat16)
        for M in (4, 16):
            x = self.make_x(M, inter, torch.bfloat16)
            p = self.ptensor(0.5)
            fn = lambda: self.ops.input_sparse_linear(x, p, wt, None, self.m_max)  # noqa: E731
            graph, outs = self.capture(fn)
            x.copy_(self.make_x(M, inter, torch.bfloat16, edge_rows=True))
            p.fill_(0.8)
            graph.replay()
            eager = fn()
            for name, a, b in zip(("y", "kept", "columns_read"), outs, eager):
                assert torch.equal(a, b), f"M={M}: replayed {name} differs from eager"
            ref, mag = self.ref.ref_sparse_gemv(x, 0.8, w)
            self.ref.assert_close_to_ref(outs[0], ref, mag, inter)

    def check_compile(self):
        """A sparse Gemma MLP (threshold + GEMV, GELU-tanh-and-mul, threshold + GEMV) through
        torch.compile(fullgraph=True): the opaque first linear bit-equal to eager, the second
        within the reference bound on the compiled act-and-mul output."""
        torch = self.torch
        hidden, inter, act = next(iter(self.models.values()))
        w_gu, wt_gu = self.make_w(2 * inter, hidden, torch.bfloat16)
        w_dn, wt_dn = self.make_w(hidden, inter, torch.bfloat16)
        p_in, p_int = self.ptensor(0.6), self.ptensor(0.5)

        def mlp(x):
            y_gu = self.ops.input_sparse_linear(x, p_in, wt_gu, None, self.m_max)[0]
            h = self.act_and_mul(y_gu, act)
            return y_gu, h, self.ops.input_sparse_linear(h, p_int, wt_dn, None, self.m_max)[0]

        compiled = torch.compile(mlp, fullgraph=True, dynamic=False)
        x = self.make_x(4, hidden, torch.bfloat16)
        y_gu, h, y = compiled(x)
        assert torch.equal(y_gu, mlp(x)[0]), "compiled gate_up_proj output differs from eager"
        ref, mag = self.ref.ref_sparse_gemv(h, 0.5, w_dn)
        self.ref.assert_close_to_ref(y, ref, mag, inter)

    # ---------------------------------------------------------------- timing

    def capture(self, fn):
        """(CUDA graph of one call of fn, fn's outputs in the graph's memory)."""
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compiles) outside the capture
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = fn()
        return graph, outs

    def median_us(self, fn) -> tuple[float, str]:
        """(median microseconds of ``reps`` runs of fn, each after an L2 flush; "graph" or
        "eager"). On CUDA fn is replayed from a CUDA graph (no launch overhead, as vLLM decodes)
        and timed with CUDA events; under --smoke it is called and timed with the host clock."""
        torch = self.torch
        if self.smoke:
            times = []
            for _ in range(self.reps):
                self.flush_buf.zero_()
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e6)
            return statistics.median(times), "eager"
        graph, _ = self.capture(fn)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for start, end in zip(starts, ends):
            self.flush_buf.zero_()
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)), "graph"

    def row(self, **kw) -> dict:
        torch, triton = self.torch, self.triton
        base = {"gpu": self.gpu, "torch": torch.__version__, "triton": triton.__version__,
                "git_sha": self.sha, "dtype": self.args.dtype, "reps": self.reps}
        r = {c: "" for c in COLUMNS} | base | kw
        for a, b in (("sparse_over_dense", "sparse_us"), ("gemv_over_dense", "gemv_us"),
                     ("plugin_over_dense", "plugin_us")):
            if r[b] != "":
                r[a] = r[b] / r["dense_us"]
        self.rows.append(r)
        return r

    def time_linear(self, model, op, K, N, w, wt, M, s):
        x = self.make_x(M, K, self.dtype)
        p = self.calibrate_p(x, s)
        pt = self.ptensor(p)
        F = self.torch.nn.functional
        thr, kept = self.ops.top_p_threshold(x, pt)
        dense, launch = self.median_us(lambda: F.linear(x, w))
        sparse, _ = self.median_us(lambda: self.ops.sparse_gemv(
            x, self.ops.top_p_threshold(x, pt)[0], wt, None, 0))
        gemv, _ = self.median_us(lambda: self.ops.sparse_gemv(x, thr, wt, None, 0))
        threshold, _ = self.median_us(lambda: self.ops.top_p_threshold(x, pt))
        plugin, _ = self.median_us(
            lambda: self.ops.input_sparse_linear(x, pt, wt, None, self.m_max))
        return self.row(model=model, op=op, M=M, K=K, N=N, s=s,
                        **{"p_input" if op == "gate_up_proj" else "p_intermediate": p},
                        kept_frac=float(kept.double().mean()) / K,
                        read_frac=float(self.keep_of(x, thr).any(0).double().mean()),
                        dense_us=dense, sparse_us=sparse, gemv_us=gemv, threshold_us=threshold,
                        plugin_us=plugin, launch=launch)

    def time_mlp(self, model, hidden, inter, act, ws, M, s):
        """Dense MLP (cuBLAS, act-and-mul) against the sparse one (threshold + sparse GEMV at both
        sites, for every M) and the plugin's op (sparse up to M_MAX)."""
        (w_gu, wt_gu), (w_dn, wt_dn) = ws
        F = self.torch.nn.functional
        x = self.make_x(M, hidden, self.dtype)
        p_in = self.calibrate_p(x, s)
        pt_in = self.ptensor(p_in)
        thr_in, kept_in = self.ops.top_p_threshold(x, pt_in)
        h = self.act_and_mul(self.ops.sparse_gemv(x, thr_in, wt_gu, None, 0), act)
        p_int = self.calibrate_p(h, s)
        pt_int = self.ptensor(p_int)
        thr_int, kept_int = self.ops.top_p_threshold(h, pt_int)

        def sparse_linear(a, pt, wt):
            return self.ops.sparse_gemv(a, self.ops.top_p_threshold(a, pt)[0], wt, None, 0)

        def plugin_linear(a, pt, wt):
            return self.ops.input_sparse_linear(a, pt, wt, None, self.m_max)[0]

        dense, launch = self.median_us(
            lambda: F.linear(self.act_and_mul(F.linear(x, w_gu), act), w_dn))
        sparse, _ = self.median_us(lambda: sparse_linear(
            self.act_and_mul(sparse_linear(x, pt_in, wt_gu), act), pt_int, wt_dn))
        plugin, _ = self.median_us(lambda: plugin_linear(
            self.act_and_mul(plugin_linear(x, pt_in, wt_gu), act), pt_int, wt_dn))
        # Shares weighted by the bytes of the two weights: gate_up_proj holds 2/3 of the MLP's.
        kept = (2 * float(kept_in.double().mean()) / hidden
                + float(kept_int.double().mean()) / inter) / 3
        read = (2 * float(self.keep_of(x, thr_in).any(0).double().mean())
                + float(self.keep_of(h, thr_int).any(0).double().mean())) / 3
        return self.row(model=model, op="mlp", M=M, K=hidden, N=inter, s=s, p_input=p_in,
                        p_intermediate=p_int, kept_frac=kept, read_frac=read, dense_us=dense,
                        sparse_us=sparse, plugin_us=plugin, launch=launch)

    def timings(self):
        t0 = time.monotonic()
        print(f"{'model':<13} {'op':<12} {'M':>2} {'s':>4} {'kept':>5} {'read':>5} "
              f"{'dense us':>9} {'sparse us':>9} {'sp/dn':>6} {'gemv/dn':>7} {'plugin/dn':>9}")
        for model, (hidden, inter, act) in self.models.items():
            try:
                ws = (self.make_w(2 * inter, hidden, self.dtype),
                      self.make_w(hidden, inter, self.dtype))
                for (op, K, N), (w, wt) in zip((("gate_up_proj", hidden, 2 * inter),
                                                ("down_proj", inter, hidden)), ws):
                    for M, s in itertools.product(self.batches, self.sparsities):
                        self.print_row(self.time_linear(model, op, K, N, w, wt, M, s))
                for M, s in itertools.product(self.batches, self.sparsities):
                    self.print_row(self.time_mlp(model, hidden, inter, act, ws, M, s))
                del ws
            except Exception as e:  # noqa: BLE001 -- keep the other models' rows
                self.checks.failed.append(f"timing {model}")
                print(f"FAIL timing {model}: {type(e).__name__}: {str(e)[:500]}")
        print(f"timings: {len(self.rows)} rows ({time.monotonic() - t0:.0f} s)")

    @staticmethod
    def print_row(r):
        fmt = lambda v, w, d: f"{v:>{w}.{d}f}" if v != "" else " " * w  # noqa: E731
        print(f"{r['model']:<13} {r['op']:<12} {r['M']:>2} {r['s']:>4} {r['kept_frac']:>5.2f} "
              f"{r['read_frac']:>5.2f} {r['dense_us']:>9.1f} {r['sparse_us']:>9.1f} "
              f"{r['sparse_over_dense']:>6.3f} {fmt(r['gemv_over_dense'], 7, 3)} "
              f"{r['plugin_over_dense']:>9.3f}")

    # ---------------------------------------------------------------- block sizes

    def sweep(self):
        """Time other launch constants of the two kernels (module constants, restored after)."""
        t0 = time.monotonic()
        sg, tpt = self.mods["sparse_gemv"], self.mods["top_p_threshold"]
        if not all(hasattr(sg, a) for a in ("BLOCK_N", "BLOCK_K", "NUM_WARPS")) or \
                not all(hasattr(tpt, a) for a in ("BLOCK", "NUM_WARPS")):
            print("sweep: skipped (the kernels' launch constants have moved)")
            return
        model = next(iter(self.models))
        hidden, inter, _ = self.models[model]
        cases = []  # (op, x, thr, p tensor, w, wt)
        for op, K, N in (("gate_up_proj", hidden, 2 * inter), ("down_proj", inter, hidden)):
            w, wt = self.make_w(N, K, self.dtype)
            for M in ((1,) if self.smoke else (1, 4, 8)):
                x = self.make_x(M, K, self.dtype)
                pt = self.ptensor(self.calibrate_p(x, 0.5))
                cases.append((f"{op} M={M}", x, self.ops.top_p_threshold(x, pt)[0], pt, w, wt))

        def gemv_times(cfg):
            saved = {a: getattr(sg, a) for a in cfg}
            try:
                for a, v in cfg.items():
                    setattr(sg, a, v)
                times = []
                for label, x, thr, pt, w, wt in cases:
                    y = self.ops.sparse_gemv(x, thr, wt, None, 0)
                    ref, mag = self.ref.ref_sparse_gemv(x, pt, w)
                    self.checks.run(f"sweep sparse_gemv {cfg} {label}",
                                    lambda: self.ref.assert_close_to_ref(y, ref, mag, x.shape[1]))
                    times.append(self.median_us(
                        lambda: self.ops.sparse_gemv(x, thr, wt, None, 0))[0])
                return times
            finally:
                for a, v in saved.items():
                    setattr(sg, a, v)

        def threshold_times(cfg):
            saved = {a: getattr(tpt, a) for a in cfg}
            try:
                for a, v in cfg.items():
                    setattr(tpt, a, v)
                times = []
                for label, x, thr, pt, _, _ in cases:
                    got = self.ops.top_p_threshold(x, pt)[0]

                    def same():
                        assert self.torch.equal(got, thr), "thr differs from the default's"

                    self.checks.run(f"sweep top_p_threshold {cfg} {label}", same)
                    times.append(self.median_us(lambda: self.ops.top_p_threshold(x, pt))[0])
                return times
            finally:
                for a, v in saved.items():
                    setattr(tpt, a, v)

        labels = [c[0] for c in cases]
        gemv_grid = [{"BLOCK_N": n, "BLOCK_K": k} for n, k in itertools.product(
            (64,) if self.smoke else (32, 64, 128), (64,) if self.smoke else (64, 128, 256))]
        best = self.report_sweep("sparse_gemv", gemv_grid, gemv_times, labels,
                                 {"BLOCK_N": sg.BLOCK_N, "BLOCK_K": sg.BLOCK_K})
        warps = (4,) if self.smoke else (4, 8, 16)
        self.report_sweep("sparse_gemv warps", [best | {"NUM_WARPS": w} for w in warps],
                          gemv_times, labels, {"NUM_WARPS": sg.NUM_WARPS} | best)
        thr_grid = [{"BLOCK": b, "NUM_WARPS": w} for b, w in itertools.product(
            (512,) if self.smoke else (512, 1024, 2048), (8,) if self.smoke else (4, 8, 16))]
        self.report_sweep("top_p_threshold", thr_grid, threshold_times, labels,
                          {"BLOCK": tpt.BLOCK, "NUM_WARPS": tpt.NUM_WARPS})
        if self.smoke:
            self.notes.append("sweep under --smoke runs the interpreter's launch configuration")
        print(f"sweep: {time.monotonic() - t0:.0f} s")

    def report_sweep(self, name, grid, times_of, labels, default) -> dict:
        """Print each configuration's time per case relative to the default's; return the one with
        the smallest geometric mean."""
        base = times_of(default)
        print(f"sweep {name}: time / default {default} per case: {', '.join(labels)}")
        best, best_gm = default, 1.0
        for cfg in grid:
            try:
                rel = [t / b for t, b in zip(times_of(cfg), base)]
            except Exception as e:  # noqa: BLE001 -- e.g. out of shared memory on this GPU
                print(f"  {cfg}: skipped, {type(e).__name__}: {str(e)[:200]}")
                continue
            gm = math.exp(sum(map(math.log, rel)) / len(rel))
            print(f"  {cfg}: " + " ".join(f"{r:.3f}" for r in rel) + f"  geomean {gm:.3f}")
            if gm < best_gm:
                best, best_gm = cfg, gm
        print(f"sweep {name}: the data supports {best} (geomean {best_gm:.3f} of the default)")
        self.notes.append(f"{name}: {best} ({best_gm:.3f}x the default's time)")
        return {k: v for k, v in best.items() if k != "NUM_WARPS"}

    # ---------------------------------------------------------------- outputs

    def supported_m_max(self) -> dict:
        """s -> largest M (of the timed batches, all smaller ones too) at which the sparse MLP
        beats the dense one on every model; 0 when none does."""
        out = {}
        for s in self.sparsities:
            best = 0
            for M in self.batches:
                ratios = [r["sparse_over_dense"] for r in self.rows
                          if r["op"] == "mlp" and r["M"] == M and r["s"] == s]
                if not ratios or max(ratios) >= 1.0:
                    break
                best = M
            out[s] = best
        return out

    def write_outputs(self):
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        with (out / "gpu_check.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows)
        print(f"wrote {out / 'gpu_check.csv'} ({len(self.rows)} rows)")
        self.plot(out / "gpu_check.png")

    def report_supported(self):
        m_max = self.supported_m_max()
        print("M_MAX the data supports (largest M with the sparse MLP faster than the dense one on "
              "every model): " + ", ".join(f"s={s}: {m}" for s, m in m_max.items())
              + f" (triton_backend.M_MAX is {self.m_max})")
        for note in self.notes:
            print(f"block sizes: {note}")

    def plot(self, path: Path):
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("gpu_check.png skipped: matplotlib is not installed (the CSV has the data)")
            return
        models = list(self.models)
        fig, axes = plt.subplots(len(models), len(OPS), figsize=(4 * len(OPS), 3 * len(models)),
                                 squeeze=False, sharey=True)
        for (i, model), (j, op) in itertools.product(enumerate(models), enumerate(OPS)):
            ax = axes[i][j]
            for M in self.batches:
                pts = sorted((r["s"], r["sparse_over_dense"]) for r in self.rows
                             if r["model"] == model and r["op"] == op and r["M"] == M)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"M={M}")
            ax.plot(self.sparsities, [1 - s for s in self.sparsities], "k--", lw=0.8,
                    label="1 - s")
            ax.axhline(1.0, color="grey", lw=0.5)
            ax.set_title(f"{model} {op}", fontsize=9)
            ax.set_xlabel("sparsity s")
            if j == 0:
                ax.set_ylabel("sparse / dense time")
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{self.gpu}, {self.args.dtype}: sparse (threshold included) / cuBLAS")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        print(f"wrote {path}")

    def summary(self, seconds: float) -> int:
        def ratio(op, M):
            for r in self.rows:
                if (r["model"], r["op"], r["M"], r["s"]) == ("gemma-3-27b", op, M, 0.5):
                    return f"{r['sparse_over_dense']:.3f}"
            return "n/a"

        ok = not self.checks.failed
        goals = (f"gemma-3-27b s=0.5 sparse/dense gate_up_proj M=1 {ratio('gate_up_proj', 1)}, "
                 f"down_proj M=1 {ratio('down_proj', 1)} (goal <= 0.55), M=4 "
                 f"{ratio('gate_up_proj', 4)} / {ratio('down_proj', 4)} (goal <= 0.8)")
        print(f"gpu_check {'PASS' if ok else 'FAIL'}: {self.checks.passed} checks passed, "
              f"{len(self.checks.failed)} failed; {goals}; {len(self.rows)} timing rows; "
              f"{seconds:.0f} s{' (smoke: CPU, times meaningless)' if self.smoke else ''}")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
