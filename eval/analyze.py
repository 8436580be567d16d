"""``vllm-sparsity analyze``: per-layer sparsity, effective rank and mask stability of a served
model over a grid of p (paper Sec. 4.2, 4.6, App. A.3, E), written to ``analysis.json`` and PNGs.

One server (started here as ``eval sweep`` starts its own, plus ``--enforce-eager`` and
``--no-enable-prefix-caching``; or attached with ``--url``). For each p of the grid and each site
of the target (one site at a time, as the paper's per-site configurations; ``--joint``: all the
target's sites at once), the command sets p and the target (``POST /v1/sparsity``), reads the
counters, arms the workers' recording (``POST /v1/sparsity/analysis``, see
``vllm_sparsity/analysis.py``), sends ``--requests`` prompts of the tasks' documents **one at a
time** (greedy, ``--decode-steps`` decode steps each, EOS ignored), fetches the recording (``GET
/v1/sparsity/analysis``) and reads the counters again.

- per-layer sparsity: the counters' difference (``GET /v1/sparsity``, prefill + decode tokens),
  the numbers ``eval sweep`` measures; the recording's own count of its masks sits beside it
  (``mask_zeroed``, ``mask_total``) and must agree;
- effective rank (App. E): of the activations entering the site (before its rule, after the
  upstream sites' rules at that p), per batch of ``--rank-batch`` token rows among the first
  ``--rank-tokens`` tokens, divided by the site's dimension K and averaged over batches (a batch
  of B < K rows is at most B/K: compare values with the same B);
- mask stability (Sec. 4.6): per layer, the mean Jaccard of the kept sets of consecutive decode
  steps, and of each step with the request's first decode step ("drift"). One request at a time
  makes every decode step a one-row step of the same sequence as the step before.

MoE models: the routed experts' sites are not recorded (their rows are (token, expert) pairs);
``moe_experts`` holds, per point, fused-MoE layer and site, the per-expert sparsity from the
route's per-expert counters (``experts``) and its min, mean and max over the experts that saw
tokens (Sec. 4.5, Fig. 6a); null for a model without routed experts.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

from vllm_sparsity.config import RULES, SparsityConfigError, check_together
from vllm_sparsity.eval import convert
from vllm_sparsity.eval.cli import target_arg
from vllm_sparsity.eval.errors import ServerError, UsageError, epilog, run
from vllm_sparsity.eval.grid import check_rule, layer_deltas
from vllm_sparsity.eval.server import Server, serve_flags, served
from vllm_sparsity.sites import sites_of

# Flags added to a server started for an analysis: the recording needs eager execution, and a
# prompt served whole from the prefix cache would look like a decode step (analysis.py).
ANALYSIS_SERVE_FLAGS = ["--enforce-eager", "--no-enable-prefix-caching"]
MEANS = ("effective_rank", "consecutive_jaccard", "drift_jaccard")


@dataclass
class AnalyzeConfig:
    model: str  # model (or, with --url, tokenizer) path
    tasks: list[str]  # built-in tasks (convert.TASKS) whose documents give the prompts
    grid: list[float]
    target: str  # the sites analysed
    joint: bool = False  # all the target's sites sparsified at once, instead of one at a time
    requests: int = 4  # prompts per point, sent one at a time
    decode_steps: int = 64  # decode steps per request (max_tokens = decode_steps + 1)
    rank_tokens: int = 1024  # activation rows kept per layer and site for the effective rank
    rank_batch: int = 256  # rows per effective-rank batch
    rule: str = "top-p"
    q: float | None = None


def prompts(tasks: list[str], n: int) -> list[str]:
    """The first ``n`` prompts of the tasks' documents, taken in turn from each task (the
    context lm-eval scores after: ``query``, WinoGrande's first context, TriviaQA's question).

    Raises:
        UsageError: the tasks hold fewer than ``n`` documents.
    """
    per_task = []
    for task in tasks:
        docs = convert.documents(task)[:n]
        per_task.append([d.get("query") or (d.get("contexts") or [None])[0] or d["question"]
                         for d in docs])
    out = [texts[i] for i in range(n) for texts in per_task if i < len(texts)][:n]
    if len(out) < n:
        raise UsageError(f"--requests {n}: the tasks {','.join(tasks)} hold {len(out)} documents")
    return out


def _post(server: Server, route: str, body: dict, timeout: float = 120) -> dict:
    r = requests.post(f"{server.url}{route}", json=body, headers=server.headers, timeout=timeout)
    if r.status_code != 200:
        raise ServerError(f"POST {route} {body}: HTTP {r.status_code} {r.text[:300]}")
    return r.json()


def fetch_analysis(server: Server) -> dict:
    r = requests.get(f"{server.url}/v1/sparsity/analysis", headers=server.headers, timeout=1000)
    if r.status_code != 200:
        raise ServerError(f"GET /v1/sparsity/analysis: HTTP {r.status_code} {r.text[:300]}")
    return r.json()


def run_point(server: Server, cfg: AnalyzeConfig, served_name: str, texts: list[str], p: float,
              target: str) -> dict:
    """One p with one target: ``{"p", "target", "layers": [...]}`` (see ``analyze``)."""
    server.set(p, target)
    before = server.state()
    _post(server, "/v1/sparsity/analysis", {"tokens": cfg.rank_tokens,
                                            "rank_batch": cfg.rank_batch})
    for text in texts:  # one at a time: batch-1 decode (analysis.py)
        _post(server, "/v1/completions", {
            "model": served_name, "prompt": text, "max_tokens": cfg.decode_steps + 1,
            "temperature": 0.0, "ignore_eos": True}, timeout=900)
    recorded = fetch_analysis(server)
    after = server.state()
    deltas = layer_deltas(before, after)
    layers = []
    for row in recorded["layers"]:
        if row["site"] not in sites_of(target):
            continue
        zeroed, total = deltas[row["layer"], row["site"]]
        layers.append({
            "layer": row["layer"], "site": row["site"], "dim": row["dim"],
            "sparsity": zeroed / total if total else None, "zeroed": zeroed, "total": total,
            "mask_zeroed": row["zeroed"], "mask_total": row["total"],
            **{k: row[k] for k in MEANS}, "rank_rows": row["rows"],
            "rank_batches": row["rank_batches"], "decode_steps": row["decode_steps"],
            "consecutive_pairs": row["consecutive_pairs"], "drift_pairs": row["drift_pairs"]})
    experts = [r for r in expert_rows(before, after) if r["site"] in sites_of(target)]
    return {"p": p, "target": target, "layers": layers, "experts": experts}


def expert_rows(before: dict, after: dict) -> list[dict]:
    """Per-expert sparsity between two ``GET /v1/sparsity`` answers (their ``experts`` rows, the
    routed experts' monotonic per-expert counters; paper Sec. 4.5, Fig. 6a): per fused-MoE layer
    and site, ``min``, ``mean`` and ``max`` over the experts that saw tokens (the mean is over
    experts, each expert's share counting once), ``experts_seen`` of ``experts``, and each
    expert's ``sparsity`` (None for an expert that saw no token). [] for a model without routed
    experts."""
    rows = []
    for b, a in zip(before.get("experts", []), after.get("experts", [])):
        assert (b["layer"], b["site"]) == (a["layer"], a["site"]), "expert rows changed order"
        shares = [(za - zb) / (ta - tb) if ta > tb else None
                  for za, zb, ta, tb in zip(a["zeroed"], b["zeroed"], a["total"], b["total"])]
        seen = [s for s in shares if s is not None]
        rows.append({"layer": a["layer"], "site": a["site"], "experts": len(shares),
                     "experts_seen": len(seen), "min": min(seen, default=None),
                     "mean": sum(seen) / len(seen) if seen else None,
                     "max": max(seen, default=None), "sparsity": shares})
    return rows


def summarise(point_layers: list[dict]) -> dict:
    """A site's numbers at one point over its layers: pooled sparsity (zeroed / total) and the
    plain mean over layers of the effective rank and the two Jaccard means (None without data)."""
    zeroed, total = sum(r["zeroed"] for r in point_layers), sum(r["total"] for r in point_layers)
    out = {"sparsity": zeroed / total if total else None}
    for key in MEANS:
        values = [r[key] for r in point_layers if r[key] is not None]
        out[key] = sum(values) / len(values) if values else None
    return out


def analyze(cfg: AnalyzeConfig, out: Path, url: str | None = None,
            api_key: str | None = None) -> dict:
    """Run the analysis into ``out`` (``analysis.json``, ``server.log`` when a server is started
    here, PNGs when matplotlib is installed); returns analysis.json's dict.

    ``analysis.json``: the settings, then ``sites``: per site ``{"points": [{"p", "target",
    "mean": summarise(...), "layers": [per layer: sparsity, zeroed, total, mask_zeroed,
    mask_total, effective_rank, consecutive_jaccard, drift_jaccard and their counts]}]}``, and
    ``moe_experts``: ``{"points": [{"p", "target", "layers": expert_rows(...)}]}`` for MoE
    models, null for dense ones.
    """
    out.mkdir(parents=True, exist_ok=True)
    texts = prompts(cfg.tasks, cfg.requests)
    runs = [cfg.target] if cfg.joint else list(sites_of(cfg.target))
    sites: dict[str, dict] = {s: {"points": []} for s in sites_of(cfg.target)}
    experts: list[dict] = []
    flags = serve_flags(cfg.target, cfg.rule, cfg.q) + ANALYSIS_SERVE_FLAGS
    with served(cfg.model, out / "server.log", url, api_key, flags) as server:
        served_name, initial = server.served_model(cfg.model), server.state()
        check_rule(initial, cfg)
        try:
            for target in runs:
                for p in cfg.grid:
                    print(f"analyze: target={target} p={p:g}", file=sys.stderr)
                    point = run_point(server, cfg, served_name, texts, p, target)
                    for site in sites_of(target):
                        rows = [r for r in point["layers"] if r["site"] == site]
                        sites[site]["points"].append({"p": p, "target": target,
                                                      "mean": summarise(rows), "layers": rows})
                    if point["experts"]:
                        experts.append({"p": p, "target": target, "layers": point["experts"]})
        finally:  # an attached server goes back to its owner's settings
            server.set(initial["p"], initial["target"])
    result = {**asdict(cfg), "prompts": len(texts), "sites": sites,
              "moe_experts": {"points": experts} if experts else None}
    (out / "analysis.json").write_text(json.dumps(result, indent=1) + "\n")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("analyze: matplotlib is not installed, no PNGs (pip install matplotlib)",
              file=sys.stderr)
    else:
        plot(result, out)
    return result


def plot(result: dict, out: Path) -> list[Path]:
    """``sparsity_<site>.png`` (per-layer sparsity heatmap, layers x p, App. A.3),
    ``effective_rank.png`` and ``stability.png`` (per layer, one line per p) into ``out``, for
    the sites recorded; ``experts.png`` (per layer, per-expert mean with bars from min to max, one
    line per p; Fig. 6a) for MoE models. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for site, data in result["sites"].items():
        pts = sorted(data["points"], key=lambda pt: pt["p"])
        layers = [r["layer"] for r in pts[0]["layers"]]
        if not layers:  # only routed experts at this site (their numbers: moe_experts)
            continue
        grid = [[next(r["sparsity"] for r in pt["layers"] if r["layer"] == layer) for pt in pts]
                for layer in layers]
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(pts), 1.2 + 0.28 * len(layers)))
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(pts)), [f"{pt['p']:g}" for pt in pts])
        ax.set_yticks(range(len(layers)), layers)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if v < 0.6 else "black")
        ax.set_xlabel("p")
        ax.set_ylabel("layer")
        ax.set_title(f"sparsity at {site} (target {pts[0]['target']})", fontsize=9)
        fig.colorbar(im, ax=ax, label="share of activations zeroed")
        fig.tight_layout()
        written.append(out / f"sparsity_{site}.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    names = [site for site, data in result["sites"].items()
             if any(pt["layers"] for pt in data["points"])]
    for name, keys in (("effective_rank", ("effective_rank",)),
                       ("stability", ("consecutive_jaccard", "drift_jaccard"))):
        if not names:  # only routed experts: nothing recorded
            break
        fig, axes = plt.subplots(len(keys), len(names), figsize=(3.2 * len(names), 2.8 * len(keys)),
                                 squeeze=False)
        for col, site in enumerate(names):
            for row, key in enumerate(keys):
                ax = axes[row][col]
                for pt in sorted(result["sites"][site]["points"], key=lambda pt: pt["p"]):
                    xs = [r["layer"] for r in pt["layers"] if r[key] is not None]
                    ys = [r[key] for r in pt["layers"] if r[key] is not None]
                    ax.plot(xs, ys, marker=".", lw=1, label=f"p={pt['p']:g}")
                ax.set_title(f"{site}: {key.replace('_', ' ')}", fontsize=9)
                ax.set_xlabel("layer")
                ax.set_ylim(0, 1.02)
                ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out / f"{name}.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    if result["moe_experts"]:  # per-expert sparsity per layer: mean, bars from min to max
        points = result["moe_experts"]["points"]
        names = list(dict.fromkeys(r["site"] for pt in points for r in pt["layers"]))
        fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3), squeeze=False)
        for ax, site in zip(axes[0], names):
            for pt in sorted(points, key=lambda pt: pt["p"]):
                rows = [r for r in pt["layers"] if r["site"] == site and r["experts_seen"]]
                if not rows:
                    continue
                mean = [r["mean"] for r in rows]
                ax.errorbar([r["layer"] for r in rows], mean, capsize=3, marker="o", lw=1,
                            yerr=[[m - r["min"] for m, r in zip(mean, rows)],
                                  [r["max"] - m for m, r in zip(mean, rows)]],
                            label=f"p={pt['p']:g}")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_title(f"routed experts, {site}: per-expert sparsity", fontsize=9)
            ax.set_xlabel("layer")
            ax.set_ylim(0, 1.02)
            ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out / "experts.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def _tasks(text: str) -> list[str]:
    tasks = [t for t in text.split(",") if t]
    unknown = [t for t in tasks if t not in convert.TASKS]
    if not tasks or unknown:
        raise argparse.ArgumentTypeError(f"built-in tasks only ({', '.join(convert.TASKS)}); "
                                         f"got {text!r}")
    return tasks


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated numbers, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vllm-sparsity analyze", description=__doc__,
                                 epilog=epilog("analyze"),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model path; with --url, its tokenizer's")
    ap.add_argument("--url", help="attach to this server (started with VLLM_PLUGINS=sparsity, "
                    "--sparsity-p, --enforce-eager and --no-enable-prefix-caching)")
    ap.add_argument("--api-key", help="the attached server's --api-key")
    ap.add_argument("--tasks", type=_tasks, default=["piqa", "arc_easy"],
                    help="built-in tasks whose documents are the prompts (default: %(default)s)")
    ap.add_argument("--p-grid", type=_floats, default=[0.5, 0.7, 0.9],
                    help="comma-separated p values in (0, 1] (default: 0.5,0.7,0.9)")
    ap.add_argument("--target", type=target_arg, default="input,gate,up,intermediate",
                    help="the sites analysed: a named target or a comma list of input, gate, up, "
                    "intermediate (default: all four)")
    ap.add_argument("--joint", action="store_true", help="sparsify the target's sites together "
                    "(default: one site at a time)")
    ap.add_argument("--rule", default="top-p", choices=list(RULES))
    ap.add_argument("--q", type=float, help="the exponent of the lq rule (lq only)")
    ap.add_argument("--requests", type=int, default=4, help="prompts per point, sent one at a "
                    "time (default: %(default)s)")
    ap.add_argument("--decode-steps", type=int, default=64, help="decode steps per request "
                    "(default: %(default)s)")
    ap.add_argument("--rank-tokens", type=int, default=1024, help="token rows kept per layer and "
                    "site for the effective rank (memory: rows x K per site; default "
                    "%(default)s)")
    ap.add_argument("--rank-batch", type=int, default=256, help="rows per effective-rank batch "
                    "(default: %(default)s)")
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the analysis; returns its exit status (``errors.ExitCode``: errors print one sentence
    on stderr)."""
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    return run(lambda: _run(args), "vllm-sparsity analyze")


def _run(args: argparse.Namespace) -> int:
    from vllm_sparsity.analysis import MAX_TOKENS

    if not args.p_grid or not all(0 < p <= 1 for p in args.p_grid):
        raise UsageError(f"--p-grid: every p must be in (0, 1], got {args.p_grid}")
    if args.requests < 1:
        raise UsageError(f"--requests: at least 1, got {args.requests}")
    if args.decode_steps < 2:
        raise UsageError(f"--decode-steps: at least 2 (stability compares steps), got "
                         f"{args.decode_steps}")
    if not 0 <= args.rank_tokens <= MAX_TOKENS:
        raise UsageError(f"--rank-tokens: an integer in [0, {MAX_TOKENS}], got {args.rank_tokens}")
    if args.rank_tokens and not 2 <= args.rank_batch <= args.rank_tokens:
        raise UsageError(f"--rank-batch: an integer in [2, --rank-tokens={args.rank_tokens}], got "
                         f"{args.rank_batch}")
    try:
        check_together(1.0, args.target, "auto", args.rule, args.q, lambda field: f"--{field}")
    except SparsityConfigError as e:
        raise UsageError(str(e)) from None
    cfg = AnalyzeConfig(str(args.model), args.tasks, sorted(set(args.p_grid)), args.target,
                        args.joint, args.requests, args.decode_steps, args.rank_tokens,
                        args.rank_batch, args.rule, args.q)
    result = analyze(cfg, args.out, args.url, args.api_key)
    for site, data in result["sites"].items():
        for pt in data["points"]:
            if not pt["layers"]:  # only routed experts at this site: see below
                continue
            m = pt["mean"]
            print(f"{site} p={pt['p']:g}: " + ", ".join(
                f"{k} {m[k]:.3f}" if m[k] is not None else f"{k} -" for k in ("sparsity", *MEANS)))
    for pt in (result["moe_experts"] or {}).get("points", []):
        for r in pt["layers"]:
            if r["experts_seen"]:
                print(f"experts layer {r['layer']} {r['site']} p={pt['p']:g}: per-expert sparsity "
                      f"min {r['min']:.3f} mean {r['mean']:.3f} max {r['max']:.3f} "
                      f"({r['experts_seen']} of {r['experts']} experts saw tokens)")
    print(args.out / "analysis.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
