"""``vllm-sparsity predict``: the decode tokens/s gain of top-p sparsity, predicted for one model.

Model of a decode step (batch B, each sequence ``--context`` tokens long): it is memory-bound, so
its time is the bytes it reads over the memory bandwidth. Dense, it reads per layer the attention
projections (q, k, v, o), the MLP's ``gate_up_proj`` and ``down_proj`` and B sequences' KV cache
(``2 x kv_heads x head_dim`` values per token, sliding-window layers at most their window), plus the
output layer (vocab x hidden: read whole whether tied to the embedding or not) and B embedding rows.
With sparsity each MLP linear's time is multiplied by its ratio r = sparse time / dense time
(threshold included); everything else stays dense::

    gain(B) = tokens/s sparse / tokens/s dense
            = D(B) / (D(B) - sum_site L x W_site x (1 - r_site(B)))

with D(B) the dense bytes of the step, L layers and W_site one layer's weight bytes at the site
(``input``: gate_up_proj, 2 x intermediate x hidden; ``intermediate``: down_proj, intermediate x
hidden). Weights and KV cache are 2-byte (bf16/fp16). Left out: norms, act-and-mul, attention
arithmetic, sampling (all small at decode), and the plugin's counting kernels.

r comes from one of two sources:

- ``--csv``, the CSV of ``kernels/bench/gpu_check.py`` ("predicted from kernel timings"): for
  B <= M_MAX the measured ``sparse_us / dense_us`` (threshold kernel + sparse GEMV against
  cuBLAS) of the model's own shapes, interpolated linearly in s and then in M between measured
  points; above M_MAX ``(dense_us + threshold_us) / dense_us`` (the plugin masks, then runs the
  dense GEMM). Non-MLP bytes are taken to run at the bandwidth of those dense GEMVs.
- otherwise the bandwidth model ("predicted from the bandwidth model, no GPU timings", a guess):
  r = (share of weight rows read) + ``--threshold-us`` x ``--bandwidth-gbs`` / W_site, the share
  being ``1 - s^B`` for B <= M_MAX (the union of B independent row masks that each keep 1 - s;
  real masks overlap more, so this undersells batches) and 1 above.

A site given no sparsity (or 0) is dense: r = 1 (serve with that site outside the target).

Source: the kernels' batch policy is ``vllm_sparsity/kernels/triton_backend.py`` (``M_MAX``); the
sites are the paper's (Szatkowski et al., "Universal Properties of Activation Sparsity in Modern
LLMs", Sec. 3: ``input`` and ``intermediate`` targets).
"""

from __future__ import annotations

import argparse
import bisect
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

SITES = {"input": "gate_up_proj", "intermediate": "down_proj"}
BYTES = 2  # bf16/fp16 weights and KV cache
DEFAULT_BANDWIDTH_GBS = 4000.0  # guess: ~80% of an H200's 4.8 TB/s HBM peak
DEFAULT_THRESHOLD_US = 5.0  # guess: one launch of the one-program-per-row threshold kernel


class PredictError(ValueError):
    """A bad flag value or input file; the message names the flag."""


@dataclass(frozen=True)
class ModelShape:
    """What a decode step reads, from a Hugging Face ``config.json`` (text model fields; a
    multimodal config's ``text_config`` wins over its top level)."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    tied: bool
    heads: int
    kv_heads: int
    head_dim: int
    windows: tuple[int | None, ...]  # per layer: sliding window in tokens, None for full attention

    @classmethod
    def from_config(cls, path: str | Path) -> ModelShape:
        """Read ``num_hidden_layers``, ``hidden_size``, ``intermediate_size``, ``vocab_size``,
        ``num_attention_heads``, ``num_key_value_heads`` (default: heads), ``head_dim`` (default:
        hidden / heads), ``tie_word_embeddings`` (default true, as transformers), and sliding
        windows from ``layer_types`` + ``sliding_window``, or ``sliding_window_pattern`` (Gemma 3:
        every pattern-th layer is global) + ``sliding_window``; otherwise every layer is full.

        Raises:
            PredictError: unreadable file, or a field missing or not a positive integer (the
                message names ``--config`` and the field).
        """
        try:
            top = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PredictError(f"--config: cannot read {path}: {e}") from e
        if not isinstance(top, dict):
            raise PredictError(f"--config: {path} is not a JSON object")
        text = top.get("text_config") or {}

        def field(key, default=None):
            value = text.get(key, top.get(key, default))
            if value is None or isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PredictError(f"--config: {key} must be a positive integer (looked in "
                                   f"text_config and at the top level of {path}), got {value!r}")
            return value

        layers, hidden, heads = (field("num_hidden_layers"), field("hidden_size"),
                                 field("num_attention_heads"))
        windows: list[int | None] = [None] * layers
        window = text.get("sliding_window", top.get("sliding_window"))
        types = text.get("layer_types", top.get("layer_types"))
        pattern = text.get("sliding_window_pattern", top.get("sliding_window_pattern"))
        if window is not None and (types is not None or pattern is not None):
            window = field("sliding_window")
            if types is not None:
                if not isinstance(types, list) or len(types) != layers:
                    raise PredictError(f"--config: layer_types must list {layers} layers")
                windows = [window if t == "sliding_attention" else None for t in types]
            else:
                pattern = field("sliding_window_pattern")
                windows = [None if (i + 1) % pattern == 0 else window for i in range(layers)]
        tied = text.get("tie_word_embeddings", top.get("tie_word_embeddings", True))
        return cls(name=Path(path).parent.name if Path(path).name == "config.json"
                   else Path(path).stem,
                   layers=layers, hidden=hidden, intermediate=field("intermediate_size"),
                   vocab=field("vocab_size"), tied=bool(tied), heads=heads,
                   kv_heads=field("num_key_value_heads", heads),
                   head_dim=field("head_dim", hidden // heads), windows=tuple(windows))

    def site_bytes(self, site: str) -> int:
        """One layer's weight bytes at ``site``: gate_up_proj 2 I H, down_proj I H (x 2 bytes)."""
        return (2 if site == "input" else 1) * self.intermediate * self.hidden * BYTES


def step_bytes(shape: ModelShape, batch: int, context: int) -> dict[str, int]:
    """Bytes one dense decode step reads, by part: ``input`` (gate_up_proj) and ``intermediate``
    (down_proj) over all layers, ``attention`` (q, k, v, o projections), ``output_layer``
    (vocab x hidden), ``embedding`` (batch rows) and ``kv_cache`` (batch sequences of ``context``
    tokens, a sliding layer at most its window)."""
    s = shape
    q_o = 2 * s.hidden * s.heads * s.head_dim
    k_v = 2 * s.hidden * s.kv_heads * s.head_dim
    kv_tokens = sum(context if w is None else min(context, w) for w in s.windows)
    return {
        "input": s.layers * s.site_bytes("input"),
        "intermediate": s.layers * s.site_bytes("intermediate"),
        "attention": s.layers * (q_o + k_v) * BYTES,
        "output_layer": s.vocab * s.hidden * BYTES,
        "embedding": batch * s.hidden * BYTES,
        "kv_cache": batch * kv_tokens * 2 * s.kv_heads * s.head_dim * BYTES,
    }


class BandwidthModel:
    """r = share of weight rows read (1 - s^B up to M_MAX, 1 above) + one threshold's time over
    the site's dense time at ``bandwidth_gbs``. A guess: no GPU timings."""

    def __init__(self, shape: ModelShape, m_max: int, bandwidth_gbs: float, threshold_us: float):
        self.shape, self.m_max = shape, m_max
        self.bytes_per_us, self.threshold_us = bandwidth_gbs * 1e3, threshold_us
        self.label = (f"predicted from the bandwidth model, no GPU timings (a guess: sparse time = "
                      f"dense time x share of weight rows read, 1 - s^B for B <= M_MAX = {m_max} "
                      f"independent rows, else 1, + {threshold_us:g} us per threshold at "
                      f"{bandwidth_gbs:g} GB/s)")

    def ratio(self, site: str, batch: int, s: float) -> float:
        read = 1.0 - s**batch if batch <= self.m_max else 1.0
        return read + self.threshold_us * self.bytes_per_us / self.shape.site_bytes(site)


class KernelTimings:
    """r from a ``gpu_check.py`` CSV: rows of the model's two MLP shapes in one dtype."""

    def __init__(self, path: str | Path, shape: ModelShape, dtype: str, m_max: int):
        self.m_max = m_max
        try:
            with Path(path).open(newline="") as f:
                rows = list(csv.DictReader(f))
        except OSError as e:
            raise PredictError(f"--csv: cannot read {path}: {e}") from e
        need = {"dtype", "op", "M", "K", "N", "s", "dense_us", "sparse_us", "threshold_us", "gpu"}
        if not rows or not need <= rows[0].keys():
            raise PredictError(f"--csv: {path} is not a gpu_check.py CSV (needs columns "
                               f"{sorted(need)})")
        shapes = {"input": (shape.hidden, 2 * shape.intermediate),
                  "intermediate": (shape.intermediate, shape.hidden)}
        # site -> {(M, s): (sparse / dense, (dense + threshold) / dense)}
        self.table: dict[str, dict[tuple[int, float], tuple[float, float]]] = {}
        for site, op in SITES.items():
            t = {}
            for r in rows:
                if (r["op"], r["dtype"], (int(r["K"]), int(r["N"]))) == (op, dtype, shapes[site]):
                    dense = float(r["dense_us"])
                    t[int(r["M"]), float(r["s"])] = (float(r["sparse_us"]) / dense,
                                                     (dense + float(r["threshold_us"])) / dense)
            if not t:
                found = sorted({(r["op"], r["K"], r["N"], r["dtype"]) for r in rows})
                raise PredictError(f"--csv: {path} has no {dtype} {op} rows of K={shapes[site][0]}"
                                   f", N={shapes[site][1]} (this model's shape); it has {found}")
            self.table[site] = t
        gpus = sorted({r["gpu"] for r in rows})
        self.label = (f"predicted from kernel timings ({Path(path).name}: {', '.join(gpus)}, "
                      f"{dtype}; M_MAX = {m_max})")

    def ratio(self, site: str, batch: int, s: float) -> float:
        t = self.table[site]
        ms = sorted({m for m, _ in t})
        if not ms[0] <= batch <= ms[-1]:
            raise PredictError(f"--csv: batch {batch} is outside the timed M range "
                               f"[{ms[0]}, {ms[-1]}] (lower --max-batch)")
        which = 0 if batch <= self.m_max else 1

        def at(m):  # linear in s between the measured sparsities of M = m
            pts = sorted((sv, v[which]) for (mm, sv), v in t.items() if mm == m)
            return _interp([p[0] for p in pts], [p[1] for p in pts], s,
                           f"--sparsity {site}={s:g} (timed s at M={m}: "
                           f"{[p[0] for p in pts]})")

        if batch in ms:
            return at(batch)
        i = bisect.bisect_left(ms, batch)  # linear in M between the timed batches around it
        return _interp([ms[i - 1], ms[i]], [at(ms[i - 1]), at(ms[i])], batch, "batch")


def _interp(xs: list[float], ys: list[float], x: float, what: str) -> float:
    """Piecewise-linear y(x) through sorted xs; x must lie within [xs[0], xs[-1]]."""
    if not xs[0] <= x <= xs[-1]:
        raise PredictError(f"{what} is outside the measured range: give values in "
                           f"[{xs[0]:g}, {xs[-1]:g}] or use the bandwidth model (no --csv)")
    i = bisect.bisect_left(xs, x)
    if xs[i] == x:  # a measured point (also the only one, when one was measured)
        return ys[i]
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def predict(shape: ModelShape, sparsity: dict[str, float], context: int, ratios,
            batches=range(1, 17)) -> list[dict]:
    """Per batch: dense bytes of the step, the MLP's share of them, r per site, and the gain.

    Args:
        shape: the model.
        sparsity: site (``input``/``intermediate``) -> measured sparsity s in [0, 1); a site
            absent or at 0 is dense (r = 1).
        context: tokens per sequence in the KV cache, >= 0.
        ratios: ``BandwidthModel`` or ``KernelTimings`` (anything with ``ratio(site, batch, s)``).
        batches: decode batch sizes (sequences per step).

    Returns:
        One dict per batch: ``batch``, ``dense_bytes``, ``mlp_share``, ``r_input``,
        ``r_intermediate``, ``gain`` (tokens/s sparse over dense).
    """
    out = []
    for b in batches:
        parts = step_bytes(shape, b, context)
        dense = sum(parts.values())
        r = {site: ratios.ratio(site, b, sparsity[site]) if sparsity.get(site, 0.0) > 0 else 1.0
             for site in SITES}
        saved = sum(parts[site] * (1.0 - r[site]) for site in SITES)
        out.append({"batch": b, "dense_bytes": dense,
                    "mlp_share": (parts["input"] + parts["intermediate"]) / dense,
                    "r_input": r["input"], "r_intermediate": r["intermediate"],
                    "gain": dense / (dense - saved)})
    return out


def parse_sparsity(text: str) -> dict[str, float]:
    """``input=0.5,intermediate=0.7`` -> {"input": 0.5, "intermediate": 0.7}; each s in [0, 1).

    Raises:
        PredictError: unknown site, repeated site, or a value that is not a number in [0, 1).
    """
    out: dict[str, float] = {}
    for item in text.split(","):
        site, eq, value = item.strip().partition("=")
        if not eq or site not in SITES:
            raise PredictError(f"--sparsity: expected SITE=S pairs with SITE in {list(SITES)}, "
                               f"separated by commas, got {item.strip()!r}")
        if site in out:
            raise PredictError(f"--sparsity: site {site} is given twice")
        try:
            s = float(value)
        except ValueError:
            s = float("nan")
        if not 0.0 <= s < 1.0:
            raise PredictError(f"--sparsity: {site} must be a number in [0, 1) (share of the "
                               f"site's inputs zeroed), got {value!r}")
        out[site] = s
    return out


def format_table(shape: ModelShape, rows: list[dict], label: str, sparsity: dict[str, float],
                 context: int) -> str:
    sites = ", ".join(f"{k}={v:g}" for k, v in sparsity.items())
    windows = sum(w is not None for w in shape.windows)
    lines = [
        f"{shape.name}: {shape.layers} layers, hidden {shape.hidden}, intermediate "
        f"{shape.intermediate}, vocab {shape.vocab}, {shape.heads} heads / {shape.kv_heads} KV "
        f"heads x {shape.head_dim}"
        + (f", {windows} sliding-window layers" if windows else "")
        + f"; sparsity {sites}; context {context} tokens",
        label,
        "",
        "| batch | dense MB/step | MLP share | gate_up_proj time ratio | down_proj time ratio "
        "| tokens/s gain |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['dense_bytes'] / 1e6:,.0f} | {r['mlp_share']:.3f} | "
                     f"{r['r_input']:.3f} | {r['r_intermediate']:.3f} | {r['gain']:.3f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="vllm-sparsity predict",
        description="Predict the decode tokens/s gain of top-p sparsity at batch 1 to --max-batch "
                    "for one model, from gpu_check.py kernel timings (--csv) or, without them, a "
                    "bandwidth model (a guess).")
    ap.add_argument("--config", required=True, help="the model's Hugging Face config.json")
    ap.add_argument("--sparsity", required=True,
                    help="measured sparsity per site, e.g. input=0.5,intermediate=0.7 (s in "
                         "[0, 1); a site left out is dense)")
    ap.add_argument("--context", type=int, default=4096,
                    help="tokens per sequence in the KV cache (default 4096)")
    ap.add_argument("--csv", help="gpu_check.csv with this model's MLP shapes; without it, the "
                                  "bandwidth model")
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16", help="rows of --csv")
    ap.add_argument("--max-batch", type=int, default=16, help="largest batch (default 16)")
    ap.add_argument("--m-max", type=int, default=None,
                    help="largest batch on the sparse path (default: the triton backend's M_MAX)")
    ap.add_argument("--bandwidth-gbs", type=float, default=DEFAULT_BANDWIDTH_GBS,
                    help=f"bandwidth model: memory bandwidth, GB/s (default "
                         f"{DEFAULT_BANDWIDTH_GBS:g}, a guess)")
    ap.add_argument("--threshold-us", type=float, default=DEFAULT_THRESHOLD_US,
                    help=f"bandwidth model: microseconds per threshold launch (default "
                         f"{DEFAULT_THRESHOLD_US:g}, a guess)")
    args = ap.parse_args(argv)
    try:
        for flag, value, low in (("--context", args.context, 0), ("--max-batch", args.max_batch, 1),
                                 ("--m-max", args.m_max, 0)):
            if value is not None and value < low:
                raise PredictError(f"{flag} must be an integer >= {low}, got {value}")
        if not args.bandwidth_gbs > 0:
            raise PredictError(f"--bandwidth-gbs must be > 0, got {args.bandwidth_gbs}")
        if not args.threshold_us >= 0:
            raise PredictError(f"--threshold-us must be >= 0, got {args.threshold_us}")
        sparsity = parse_sparsity(args.sparsity)
        shape = ModelShape.from_config(args.config)
        m_max = args.m_max
        if m_max is None:
            from vllm_sparsity.kernels.triton_backend import M_MAX as m_max
        ratios = (KernelTimings(args.csv, shape, args.dtype, m_max) if args.csv
                  else BandwidthModel(shape, m_max, args.bandwidth_gbs, args.threshold_us))
        rows = predict(shape, sparsity, args.context, ratios, range(1, args.max_batch + 1))
    except PredictError as e:
        ap.error(str(e))
    print(format_table(shape, rows, ratios.label, sparsity, args.context))
    return 0


if __name__ == "__main__":
    sys.exit(main())
