"""The C++ top-p threshold and sparsify op (kernels/cpu/top_p_select.h) against the torch rule
(vllm_sparsity.rule) bit for bit and the paper's sort rule (tests/reference.py), on rows built to
reach every branch of its bf16/fp16 passes: magnitudes over many exponents down to subnormals, one
exponent only, many ties in the boundary bin, NaN payloads of every level-0 bin from +Inf's up, row
lengths off the vector widths (tails of every pass), strided rows, per-row p across thread tasks.

Each instruction set the CPU runs (the avx512 and avx2 builds of kernels/cpu_backend.py) is
checked in a subprocess of its own (``VLLM_SPARSITY_CPU_ISA``), as one process loads one build.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_sparsity.kernels import cpu_backend
from vllm_sparsity.rule import top_p_sparsify, top_p_threshold

HERE = Path(__file__).resolve().parent
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Exponent ranges (powers of two) whose float64 sums stay exact over a row (rule.py's premise for
# bit identity), from the dtype's subnormals up; and some of the largest magnitudes.
LOW_RANGE = {torch.bfloat16: (-133, -103), torch.float16: (-24, 15), torch.float32: (-149, -119)}
HIGH_RANGE = {torch.bfloat16: (95, 126), torch.float16: (-10, 15), torch.float32: (95, 126)}
# NaN and Inf bit patterns with their sign: each NaN level-0 bin (bf16: 255; fp16: 248-255).
SPECIALS = {torch.bfloat16: [0x7F80, 0x7FC0, 0x7F81, 0xFFFF, 0xFF80],
            torch.float16: [0x7C00, 0x7C01, 0x7E00, 0x7FFF, 0xFC00, 0x7C80, 0xFD00],
            torch.float32: [0x7F800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0xFF800000]}


def spread(m, k, dtype, lo, hi, seed):
    """[m, k] of random sign times 2^uniform(lo, hi)."""
    g = torch.Generator().manual_seed(seed)
    e = torch.rand(m, k, generator=g, dtype=torch.float64) * (hi - lo) + lo
    sign = torch.randint(0, 2, (m, k), generator=g).double() * 2 - 1
    return (sign * torch.exp2(e)).to(dtype)


def cases(dtype, k, seed):
    """Named [m, k] batches of ``dtype`` for a row length k."""
    g = torch.Generator().manual_seed(seed)
    out = {"low": spread(5, k, dtype, *LOW_RANGE[dtype], seed),
           "high": spread(5, k, dtype, *HIGH_RANGE[dtype], seed + 1),
           "one exponent": (1 + torch.rand(4, k, generator=g)).to(dtype),
           # A few distinct magnitudes: most entries tie with others in the boundary bin.
           "ties": (torch.randint(1, 4, (4, k), generator=g) * 0.25 + 1).to(dtype)}
    edge = spread(6, k, dtype, -8, 8, seed + 2)
    edge[0] = 0
    edge[1, k // 2] = float("inf")
    edge[2, 0], edge[2, k - 1] = float("inf"), float("-inf")
    edge[3, k // 3] = float("nan")
    edge[4, k - 1] = 1e4 if dtype == torch.float16 else 1e30  # one outlier holding all the mass
    out["edge"] = edge
    # Each NaN (or -Inf) pattern in a row of its own, with an Inf at its side.
    rows = spread(len(SPECIALS[dtype]), k, dtype, -8, 8, seed + 3)
    width = 8 * rows.element_size()
    bits = rows.view(torch.int32 if width == 32 else torch.int16)
    for i, pattern in enumerate(SPECIALS[dtype]):
        bits[i, (7 * i) % k] = pattern - (1 << width if pattern >= 1 << (width - 1) else 0)
        bits[i, (7 * i + 1) % k] = SPECIALS[dtype][0]
    out["nan payloads"] = rows
    return out


def assert_rule(x, p, what):
    """cpu_top_p_threshold and cpu_top_p_sparsify of x against the torch rule, bit for bit."""
    ops = torch.ops.vllm_sparsity
    iv = torch.int32 if x.dtype == torch.float32 else torch.int16
    t, ref_t = ops.cpu_top_p_threshold(x, p), top_p_threshold(x, p)
    assert torch.equal(t.view(iv), ref_t.view(iv)), f"{what}: threshold"
    (xs, kept), (ref_xs, ref_kept) = ops.cpu_top_p_sparsify(x, p), top_p_sparsify(x, p)
    assert torch.equal(xs.view(iv), ref_xs.view(iv)), f"{what}: sparsified x"
    assert torch.equal(kept, ref_kept), f"{what}: kept counts"


def check_all() -> None:
    """Every case on the build this process loads (two threads: rows split across tasks)."""
    from reference import paper_top_p_mask

    cpu_backend.load_ops()
    torch.set_num_threads(2)
    for dtype in DTYPES:
        for k in (1, 15, 33, 301, 14343):
            for name, x in cases(dtype, k, seed=k).items():
                for p in (0.1, 0.5, 0.9, 0.999, 1.0):
                    what = f"{dtype} K={k} {name} p={p}"
                    assert_rule(x, torch.tensor([p], dtype=torch.float64), what)
                    if name in ("low", "one exponent", "ties"):  # no NaN/Inf: the paper's rule
                        xs, _ = torch.ops.vllm_sparsity.cpu_top_p_sparsify(
                            x, torch.tensor([p], dtype=torch.float64))
                        assert torch.equal(xs != 0, paper_top_p_mask(x, p)), what
        # Strided rows (row stride > K), and per-row p over more rows than one thread task takes.
        wide = spread(8, 700, dtype, -8, 8, seed=5)
        assert_rule(wide[:, 3:640], torch.tensor([0.6], dtype=torch.float64), f"{dtype} strided")
        x = spread(600, 301, dtype, -8, 8, seed=6)
        p = torch.rand(600, 1, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        p[::7] = 1.0
        assert_rule(x, p, f"{dtype} per-row p")
    print("checked", cpu_backend.select_isa()[0])


@pytest.mark.parametrize("isa", sorted(cpu_backend.ISAS))
def test_threshold_and_sparsify_are_the_torch_rule_on_each_build(isa, monkeypatch):
    monkeypatch.setenv(cpu_backend.ISA_ENV, isa)
    _, reason = cpu_backend.select_isa()
    if reason is not None:  # tests/skip_policy.py allows only a CPU or torch without the ISA
        pytest.skip(f"cpu kernels unavailable here: {reason}")
    env = {**os.environ, cpu_backend.ISA_ENV: isa,
           "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent),
                                          os.environ.get("PYTHONPATH", "")])}
    code = "import test_cpu_top_p_select as t; t.check_all()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"checked {isa}" in proc.stdout
