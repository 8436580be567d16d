"""``vllm-sparsity predict`` against a small model worked out by hand."""

import csv
import json

import pytest

from vllm_sparsity.tools import predict as pr
from vllm_sparsity.tools.cli import main as cli_main

# 2 layers, hidden 4, intermediate 8, 2 heads and 1 KV head of dim 2, vocab 10, 2-byte values:
#   gate_up_proj 2*8*4 = 64 values = 128 B per layer -> 256 B ("input" site, both layers)
#   down_proj      8*4 = 32 values =  64 B per layer -> 128 B ("intermediate")
#   attention q 4*4 + k 4*2 + v 4*2 + o 4*4 = 48 values = 96 B per layer -> 192 B
#   output layer 10*4 = 40 values = 80 B (read whole, tied or not); embedding B rows of 4 = 8B B
#   KV cache, context 3: 2 (K, V) * 1 head * 2 dims * 3 tokens = 12 values = 24 B per layer and
#   sequence -> 48B B
# Dense step bytes: B=1: 256+128+192+80+8+48 = 712; B=2: ...+16+96 = 768; B=3: ...+24+144 = 824.
TINY = {"num_hidden_layers": 2, "hidden_size": 4, "intermediate_size": 8, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 2, "vocab_size": 10, "tie_word_embeddings": True}


def write_config(tmp_path, **extra):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY | extra))
    return path


@pytest.fixture
def tiny(tmp_path):
    return pr.ModelShape.from_config(write_config(tmp_path))


def test_step_bytes_by_hand(tiny):
    assert pr.step_bytes(tiny, 1, 3) == {"input": 256, "intermediate": 128, "attention": 192,
                                         "output_layer": 80, "embedding": 8, "kv_cache": 48}
    assert sum(pr.step_bytes(tiny, 3, 3).values()) == 824


def test_bandwidth_model_by_hand(tiny):
    # 0.001 GB/s = 1 B/us, so a 4 us threshold costs the time of 4 B: per gate_up_proj layer
    # (128 B) r = (1 - s^B) + 4/128. M_MAX = 2: B = 1, 2 sparse, B = 3 masks then runs dense.
    #   B=1: r = 0.5 + 0.03125 = 0.53125 -> 712 - 256 * (1 - 0.53125) = 592   gain 712/592
    #   B=2: r = 0.75 + 0.03125 = 0.78125 -> 768 - 256 * 0.21875 = 712        gain 768/712
    #   B=3: r = 1 + 0.03125             -> 824 + 8 = 832                      gain 824/832
    model = pr.BandwidthModel(tiny, m_max=2, bandwidth_gbs=0.001, threshold_us=4.0)
    rows = pr.predict(tiny, {"input": 0.5}, 3, model, batches=(1, 2, 3))
    assert [r["gain"] for r in rows] == pytest.approx([712 / 592, 768 / 712, 824 / 832])
    assert [r["r_input"] for r in rows] == pytest.approx([0.53125, 0.78125, 1.03125])
    assert [r["r_intermediate"] for r in rows] == [1.0, 1.0, 1.0]  # no sparsity given: dense
    assert rows[0]["mlp_share"] == pytest.approx(384 / 712)


def test_sliding_window_layers_and_intermediate_site(tmp_path):
    # Layer 0 slides with a window of 2 tokens: its KV read at context 3 is 2*1*2*2 = 8 values =
    # 16 B, layer 1 reads 24 B: B=1 dense = 256+128+192+80+8+40 = 704. down_proj at s = 0.5:
    # r = 0.5 + 4/64 = 0.5625 -> 704 - 128 * 0.4375 = 648.
    shape = pr.ModelShape.from_config(write_config(
        tmp_path, layer_types=["sliding_attention", "full_attention"], sliding_window=2))
    assert shape.windows == (2, None)
    model = pr.BandwidthModel(shape, m_max=8, bandwidth_gbs=0.001, threshold_us=4.0)
    (row,) = pr.predict(shape, {"intermediate": 0.5}, 3, model, batches=(1,))
    assert row["dense_bytes"] == 704
    assert row["gain"] == pytest.approx(704 / 648)


def test_gemma3_pattern_and_text_config(tmp_path):
    # A multimodal config: text fields under text_config; every 6th layer global (Gemma 3).
    path = tmp_path / "gemma.json"
    path.write_text(json.dumps({"text_config": {**TINY, "num_hidden_layers": 12,
                                                "sliding_window": 5, "sliding_window_pattern": 6},
                                "tie_word_embeddings": True}))
    shape = pr.ModelShape.from_config(path)
    assert shape.windows == (5,) * 5 + (None,) + (5,) * 5 + (None,)
    assert (shape.layers, shape.name) == (12, "gemma")


def write_csv(path, rows):
    cols = ["gpu", "dtype", "op", "M", "K", "N", "s", "dense_us", "sparse_us", "threshold_us"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows(rows)


def test_kernel_timings_interpolate_by_hand(tiny, tmp_path):
    # gate_up_proj (K=4, N=16), dense 100 us. sparse us: M=1: s=.3 -> 80, s=.7 -> 40;
    # M=4: s=.3 -> 100, s=.7 -> 80; threshold 5 us at M=1, 7 at M=4.
    # s = 0.5 (midway): r(M=1) = 60/100 = 0.6, r(M=4) = 90/100 = 0.9; B=2 is 1/3 of the way:
    # 0.7. M_MAX = 2, so B=3 is dense: (100 + 5 + (7-5)*2/3)/100 = 1.063333.
    #   gains: B=1 712/(712 - 256*0.4) = 712/609.6; B=2 768/(768 - 256*0.3) = 768/691.2;
    #          B=3 824/(824 + 256*0.063333)
    rows = []
    for m, thr, by_s in ((1, 5, {0.3: 80, 0.7: 40}), (4, 7, {0.3: 100, 0.7: 80})):
        for s, us in by_s.items():
            rows.append(["H200", "bf16", "gate_up_proj", m, 4, 16, s, 100, us, thr])
            rows.append(["H200", "bf16", "down_proj", m, 8, 4, s, 50, 50, thr])
    rows.append(["H200", "bf16", "gate_up_proj", 1, 4096, 16, 0.5, 1, 1, 1])  # another model
    path = tmp_path / "gpu_check.csv"
    write_csv(path, rows)
    timings = pr.KernelTimings(path, tiny, "bf16", m_max=2)
    assert [timings.ratio("input", b, 0.5) for b in (1, 2, 3, 4)] == pytest.approx(
        [0.6, 0.7, 1.0 + (5 + 2 * 2 / 3) / 100, 1.07])
    out = pr.predict(tiny, {"input": 0.5}, 3, timings, batches=(1, 2, 3))
    assert [r["gain"] for r in out] == pytest.approx(
        [712 / 609.6, 768 / 691.2, 824 / (824 + 256 * (5 + 4 / 3) / 100)])
    with pytest.raises(pr.PredictError, match=r"--sparsity input=0.8.*\[0.3, 0.7\]"):
        timings.ratio("input", 1, 0.8)
    with pytest.raises(pr.PredictError, match="--csv: batch 5 .*--max-batch"):
        timings.ratio("input", 5, 0.5)


def test_cli_labels_its_source(tiny, tmp_path, capsys):
    config = write_config(tmp_path)
    args = ["predict", "--config", str(config), "--sparsity", "input=0.5", "--context", "3",
            "--max-batch", "2", "--m-max", "2", "--bandwidth-gbs", "0.001", "--threshold-us", "4"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "predicted from the bandwidth model, no GPU timings" in out
    assert f"| 1 | 0 | 0.539 | 0.531 | 1.000 | {712 / 592:.3f}x |" in out
    assert "kernel timings" not in out


@pytest.mark.parametrize("args, flag", [
    (["--sparsity", "input=1.2"], "--sparsity: input must be a number in [0, 1)"),
    (["--sparsity", "input=-0.1"], "--sparsity: input must be a number"),
    (["--sparsity", "gate=0.5"], "--sparsity: expected SITE=S"),
    (["--sparsity", "input"], "--sparsity: expected SITE=S"),
    (["--sparsity", "input=x"], "--sparsity: input must be a number"),
    (["--sparsity", "input=0.5,input=0.6"], "--sparsity: site input is given twice"),
    (["--context", "-1"], "--context must be an integer >= 0"),
    (["--max-batch", "0"], "--max-batch must be an integer >= 1"),
    (["--bandwidth-gbs", "0"], "--bandwidth-gbs must be > 0"),
    (["--threshold-us", "nan"], "--threshold-us must be >= 0"),
    (["--csv", "/nonexistent.csv"], "--csv: cannot read"),
])
def test_bad_flags_name_the_flag(tmp_path, capsys, args, flag):
    base = {"--config": str(write_config(tmp_path)), "--sparsity": "input=0.5", "--m-max": "8"}
    base.update(dict(zip(args[::2], args[1::2])))
    with pytest.raises(SystemExit) as e:
        pr.main([x for kv in base.items() for x in kv])
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("config, message", [
    ({k: v for k, v in TINY.items() if k != "intermediate_size"},
     "--config: intermediate_size must be a positive integer"),
    (TINY | {"vocab_size": 0}, "--config: vocab_size must be a positive integer"),
    (TINY | {"sliding_window": 2, "layer_types": ["full_attention"]},
     "--config: layer_types must list 2 layers"),
])
def test_bad_config_names_the_field(tmp_path, capsys, config, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(SystemExit):
        pr.main(["--config", str(path), "--sparsity", "input=0.5", "--m-max", "8"])
    assert message in capsys.readouterr().err


def test_csv_without_the_models_shape_is_refused(tmp_path, capsys):
    path = tmp_path / "gpu_check.csv"
    write_csv(path, [["H200", "bf16", "gate_up_proj", 1, 4096, 16, 0.5, 1, 1, 1]])
    with pytest.raises(SystemExit):
        pr.main(["--config", str(write_config(tmp_path)), "--sparsity", "input=0.5",
                 "--csv", str(path), "--m-max", "8"])
    assert "--csv: " in (err := capsys.readouterr().err) and "K=4, N=16" in err
