"""The grid of a sweep and its points: the sweep's configuration, the order points run in and
their folders, the checks a grid and a server's rule must pass, and the sparsity a point measured
from the server's counters (``GET /v1/sparsity`` before and after)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vllm_sparsity.config import P_MIN, describe_p
from vllm_sparsity.eval.errors import ServerError, UsageError
from vllm_sparsity.request_p import counter_key
from vllm_sparsity.rule import KEEP_ALL_P
from vllm_sparsity.sites import sites_of

# The paper's grid (fszatkowski/activation-sparsity-benchmarking, slurm_scripts/harness/
# model_grids/*.sh, `sparsity_setups`) without its p = 0.0, which the plugin rejects (p in
# [1e-6, 1]): top-p's.
PAPER_GRID = (1.0, 0.995, 0.99, 0.985, 0.98, 0.975, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.91,
              0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
# The paper's grids of the other rules (same repository, slurm_scripts/harness/
# grid_sparsified.sh, "topk" and "maxp" setups); its scripts have none for lq, which takes
# top-p's (p is a share of mass for both). A sweep adds the rule's dense point (``dense_p``) and
# orders the points by the rule's sparsity (``sparser_as_p_rises``: max-p's p = 0.9 is its
# sparsest point, 0.001 its least sparse).
PAPER_GRIDS = {
    "top-p": PAPER_GRID,
    "top-k": (0.01, 0.03, 0.05, 0.075, 0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8,
              1.0),
    "max-p": (0.001, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.075, 0.1,
              0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 0.9),
    "lq": PAPER_GRID,
}
P_MODES = ("auto", "request", "global")
# The dense reference of a rule without a dense p (``dense_p``): a run of the model without the
# plugin; its point's p is null in the sweep's files and its folder ``points/dense``.
DENSE = None
DENSE_NAME = "dense"


def dense_p(rule: str) -> float | None:
    """The p of the plugin's range ([``P_MIN``, 1]) at which ``rule`` keeps every nonzero entry,
    so that the model's output is the dense model's: 1.0 for top-p, top-k and lq; None for max-p,
    which keeps everything only at p = 0 (``rule.KEEP_ALL_P``), outside the range: its dense
    reference is a run without the plugin (``DENSE``)."""
    keep_all = KEEP_ALL_P[rule]
    return keep_all if P_MIN <= keep_all <= 1.0 else None


def sparser_as_p_rises(rule: str) -> bool:
    """Whether a higher p zeroes more entries under ``rule``: every rule is monotone in p and keeps
    everything at one end of [0, 1] (``rule.KEEP_ALL_P``), so sparsity grows towards the other.
    False for top-p, top-k and lq (keep all at 1: a lower p is sparser); True for max-p (keep all
    at 0: ``|x| >= p * max|x|`` keeps fewer entries as p grows)."""
    return KEEP_ALL_P[rule] == 0.0


def point_name(p: Point | None) -> str:
    """A point for folders, logs and reports: ``describe_p(p)``, or ``dense`` for ``DENSE``."""
    return DENSE_NAME if p is DENSE else describe_p(p)


@dataclass
class SweepConfig:
    """What a sweep folder holds results for; resuming with a different one is refused."""

    model: str  # model (or, with --url, tokenizer) path
    tasks: list[str]
    # p per point (``Point``; ``DENSE``, None, for max-p's dense reference), as ``ordered_grid``
    # orders it for ``rule``; search: the p it picks from
    grid: list[float | dict[str, float] | None]
    target: str
    limit: int | None
    include_path: str | None = None  # the user's task YAMLs (lm-eval's --include_path)
    search: bool = False  # bisection (search.bisect) instead of every point of the grid
    tol: float = 0.02  # search: stop when the bracket is narrower (measured sparsity)
    max_points: int | None = None  # search: budget of scored points, dense included
    rule: str = "top-p"  # the server's --sparsity-rule (fixed at its start-up)
    q: float | None = None  # the server's --sparsity-q (lq only)
    # --dtype of the server the sweep starts, as ``serve_dtype`` resolves it (so that a folder is
    # never resumed in another dtype); "auto": the checkpoint's, or with --url the server's own
    dtype: str = "auto"


# A point's p: one number for every site of the target, or one per site ({site: p}, in model
# order, as ``config.parse_p_sites`` gives it). A per-site point runs through the global route only:
# a request carries one number (``vllm_xargs.sparsity_p``).
Point = float | dict[str, float]


def per_site(grid: list[Point]) -> list[dict[str, float]]:
    """The grid's per-site points."""
    return [p for p in grid if isinstance(p, dict)]


def ordered_grid(grid: list[Point | None], rule: str = "top-p") -> list[Point | None]:
    """The grid as a sweep runs and reports it: the rule's dense point first (added when
    missing: ``dense_p``, or ``DENSE`` for a rule without one), the numbers from the least to the
    most sparse (descending p, or ascending for max-p: ``sparser_as_p_rises``), then the per-site
    points in the order given; duplicates (same ``describe_p``) dropped."""
    dense = dense_p(rule)
    numbers = {float(p) for p in grid if p is not DENSE and not isinstance(p, dict)}
    numbers = sorted(numbers | ({dense} if dense is not None else set()),
                     reverse=not sparser_as_p_rises(rule))
    if dense is None:
        numbers = [DENSE, *numbers]
    sites = {}
    for p in per_site(grid):
        sites.setdefault(describe_p(p), p)
    return [*numbers, *sites.values()]


def check_order(grid: list[Point | None], rule: str) -> None:
    """ValueError unless ``grid`` is a search's axis for ``rule``: numbers only, the rule's dense
    point first (``dense_p`` or ``DENSE``), then strictly more sparse at every step."""
    dense = dense_p(rule)
    rest = grid[1:]
    step_ok = (lambda a, b: a < b) if sparser_as_p_rises(rule) else (lambda a, b: a > b)
    if (not grid or grid[0] != dense or any(p is DENSE or isinstance(p, dict) for p in rest)
            or (dense is not None and rest and not step_ok(dense, rest[0]))
            or any(not step_ok(a, b) for a, b in zip(rest, rest[1:]))):
        raise ValueError(
            f"a {rule} grid must start at its dense point ({point_name(dense)}), then give "
            f"numbers in {'ascending' if sparser_as_p_rises(rule) else 'descending'} p "
            f"(growing sparsity), got {[point_name(p) for p in grid]}")


def point_dir(out: Path, p: Point | None) -> Path:
    """``<out>/points/p<describe_p(p)>``: ``p0.9``, ``pinput=0.95,intermediate=0.85``; the dense
    reference of a rule without a dense p (``DENSE``): ``<out>/points/dense``."""
    return out / "points" / (DENSE_NAME if p is DENSE else f"p{describe_p(p)}")


def check_rule(state: dict, cfg: SweepConfig) -> None:
    """ServerError unless the server (``GET /v1/sparsity``) runs the sweep's rule and q: the rule
    is a start-up setting of the server, which the sweep cannot change."""
    server_rule = (state.get("rule", "top-p"), state.get("q"))
    if server_rule != (cfg.rule, cfg.q):
        raise ServerError(f"--rule {cfg.rule}" + (f" --q {cfg.q:g}" if cfg.q is not None else "")
                         + f": the server runs rule {server_rule[0]}"
                         + (f" with q {server_rule[1]:g}" if server_rule[1] is not None else "")
                         + "; start it with the same --sparsity-rule/--sparsity-q")


def layer_deltas(before: dict, after: dict) -> dict[tuple[int, str], tuple[int, int]]:
    """Activations zeroed and in all between two ``GET /v1/sparsity`` answers, per
    ``(layer, site)`` (the route's monotonic counters, ``counters.route_layers``); rows of one
    layer and site (a dense MLP and routed experts beside it) are summed."""
    delta: dict[tuple[int, str], tuple[int, int]] = {}
    for b, a in zip(before["layers"], after["layers"]):
        assert (b["layer"], b["site"]) == (a["layer"], a["site"]), "layer rows changed order"
        z, t = delta.get((a["layer"], a["site"]), (0, 0))
        delta[a["layer"], a["site"]] = (z + a["zeroed"] - b["zeroed"], t + a["total"] - b["total"])
    return delta


def p_mode(state: dict, asked: str, target_fits: bool = True) -> str:
    """The mode a sweep runs in: ``asked`` unless "auto", which is "request" when the server
    applies a request's own p (``request_p.applied`` in its ``GET /v1/sparsity`` answer) and
    ``target_fits`` (the sweep may run at the server's target, and its grid holds no per-site
    point), else "global". ServerError for
    "request" on a server that does not apply it."""
    applies = bool(state.get("request_p", {}).get("applied"))
    if asked == "auto":
        return "request" if applies and target_fits else "global"
    if asked == "request" and not applies:
        raise ServerError("--p-mode request: the server does not apply a request's own p (its "
                         "plugin predates it, or its model runner has no per-step hook: see its "
                         "start-up log); use --p-mode global")
    return asked


def measured_sparsity(before: dict, after: dict, target: str, p: float | None = None) -> dict:
    """Share of activations zeroed between two ``GET /v1/sparsity`` answers, per site of the
    target and over all of them (``overall``); None for a site that saw no activations. From the
    per-layer counters (every request), or with ``p`` from the counters of the requests carrying
    that p (``request_p.counters``)."""
    delta = {}
    if p is None:
        for (_, site), (dz, dt) in layer_deltas(before, after).items():
            z, t = delta.get(site, (0, 0))
            delta[site] = (z + dz, t + dt)
    else:
        key = counter_key(p)
        b = before.get("request_p", {}).get("counters", {}).get(key, {})
        for site, a in after.get("request_p", {}).get("counters", {}).get(key, {}).items():
            zb, tb = b.get(site, {}).get("zeroed", 0), b.get(site, {}).get("total", 0)
            delta[site] = (a["zeroed"] - zb, a["total"] - tb)
    out = {}
    for site in sites_of(target):
        z, t = delta.get(site, (0, 0))
        out[site] = z / t if t else None
    zs = sum(delta.get(s, (0, 0))[0] for s in sites_of(target))
    ts = sum(delta.get(s, (0, 0))[1] for s in sites_of(target))
    out["overall"] = zs / ts if ts else None
    out["activations"] = ts
    return out



def check_grid(cfg: SweepConfig, mode: str) -> None:
    """UsageError, in one sentence naming the flag, for per-site points the sweep cannot run: one
    that does not name exactly the sites of the target; any with ``mode`` "request" (a request
    carries one p, ``vllm_xargs.sparsity_p``) or with ``search`` (bisection needs the points on
    one ordered axis of p)."""
    points = per_site(cfg.grid)
    want = sites_of(cfg.target)
    for p in points:
        if set(p) != set(want):
            raise UsageError(f"--p-grid point {describe_p(p)} names the sites {', '.join(p)} but "
                             f"--target {cfg.target} has the sites {', '.join(want)}: a per-site "
                             "point names exactly the target's sites")
    if points and mode == "request":
        raise UsageError(f"--p-mode request: a request carries one p for every site "
                         f"(vllm_xargs.sparsity_p), and --p-grid has the per-site point "
                         f"{describe_p(points[0])}; use --p-mode global or auto (which runs such a "
                         "grid through POST /v1/sparsity)")
    if points and cfg.search:
        raise UsageError(f"--search: bisection needs the points on one ordered axis of p, and "
                         f"--p-grid has the per-site point {describe_p(points[0])}; drop "
                         "--search (every point is scored) or give only numbers")
