"""``kernels/bench/gpu_check.py --smoke`` from a plain copy of the checkout.

The GPU check must run where nothing is installed: it imports ``vllm_sparsity`` and registers
``kernels/`` as ``vllm_sparsity.kernels`` itself. This venv has the package installed (editable),
so the test runs the script from a copy of the checkout layout in a temporary folder and asserts
that every module came from the copy. The smoke run takes the CPU code paths of the real check
(interpreter, tiny shape); the CSV's rows are then checked against the measured inputs.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COLUMNS = ["gpu", "torch", "triton", "git_sha", "dtype", "model", "op", "M", "K", "N", "s",
           "p_input", "p_intermediate", "kept_frac", "read_frac", "dense_us", "sparse_us",
           "gemv_us", "threshold_us", "plugin_us", "sparse_over_dense", "gemv_over_dense",
           "plugin_over_dense", "launch", "reps"]


def plain_checkout(dst: Path) -> Path:
    """The folders the GPU machine receives, without .git, .venv or build outputs."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("vllm_sparsity", "kernels"):
        shutil.copytree(REPO / folder, dst / folder, ignore=ignore)
    (dst / "tests" / "kernels").mkdir(parents=True)
    shutil.copy(REPO / "tests" / "kernels" / "gemv_reference.py", dst / "tests" / "kernels")
    return dst


def test_smoke_runs_from_a_plain_checkout_and_writes_the_csv(tmp_path):
    root = plain_checkout(tmp_path / "checkout")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    proc = subprocess.run(
        [sys.executable, str(root / "kernels" / "bench" / "gpu_check.py"), "--smoke", "--out",
         str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert (f"imports: vllm_sparsity from {root / 'vllm_sparsity'}, vllm_sparsity.kernels from "
            f"{root / 'kernels'}, vllm loaded: False") in lines
    assert lines[-1].startswith("gpu_check PASS: "), lines[-1]
    assert "0 failed" in lines[-1]

    with (out / "gpu_check.csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    # --smoke: one tiny model (hidden 64, intermediate 96), M in {1, 2}, s = 0.5, three ops.
    assert sorted((r["op"], int(r["M"])) for r in rows) == sorted(
        (op, m) for op in ("gate_up_proj", "down_proj", "mlp") for m in (1, 2))
    shapes = {"gate_up_proj": (64, 192), "down_proj": (96, 64), "mlp": (64, 96)}
    for r in rows:
        assert (int(r["K"]), int(r["N"])) == shapes[r["op"]]
        assert float(r["s"]) == 0.5
        kept, read = float(r["kept_frac"]), float(r["read_frac"])
        # p is calibrated to keep about half of each row; the union of the rows' kept inputs is
        # the row's own set at M = 1 and at least as large at M = 2.
        assert abs(kept - 0.5) < 0.1, r
        assert read == kept if r["M"] == "1" and r["op"] != "mlp" else read >= kept - 1e-12, r
        for col in ("dense_us", "sparse_us", "plugin_us"):
            assert float(r[col]) > 0, r
        assert float(r["sparse_over_dense"]) == float(r["sparse_us"]) / float(r["dense_us"])
        assert (r["gemv_us"] == "") == (r["op"] == "mlp")
        p_cols = {"gate_up_proj": ("p_input",), "down_proj": ("p_intermediate",),
                  "mlp": ("p_input", "p_intermediate")}[r["op"]]
        for col in ("p_input", "p_intermediate"):
            assert (r[col] != "") == (col in p_cols), r
            if r[col]:
                assert 0.5 < float(r[col]) < 1.0, r  # half the entries hold more than half the mass
    png = out / "gpu_check.png"
    assert png.exists() and png.stat().st_size > 0 or "matplotlib is not installed" in proc.stdout

    # The CSV feeds `vllm-sparsity predict`: at batch 1 its gate_up_proj time ratio is the row's.
    from vllm_sparsity.tools import predict

    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96, "vocab_size": 100,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32}))
    shape = predict.ModelShape.from_config(config)
    timings = predict.KernelTimings(out / "gpu_check.csv", shape, "bf16", m_max=8)
    assert "predicted from kernel timings" in timings.label
    (row,) = [r for r in rows if (r["op"], r["M"]) == ("gate_up_proj", "1")]
    assert timings.ratio("input", 1, 0.5) == pytest.approx(float(row["sparse_over_dense"]))
