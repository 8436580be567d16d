"""The sweep: one vLLM server, lm-eval scoring each p point against ``/v1/completions``.

Two ways to run a point at p (``--p-mode``):

- ``request`` (the default where the server applies a request's own p: ``GET /v1/sparsity``
  answers ``request_p.applied``): every request of the point carries its p in
  ``vllm_xargs.sparsity_p`` (lm-eval model ``sparsity-completions``, ``lm_eval_model``), so all
  points of the grid score at once, in one pass, and the server's own p and target are never
  changed (its other traffic goes on as before). The sparsity of each point comes from the
  server's per-p counters (``request_p.counters``). The server's target must be the sweep's.
- ``global``: one point at a time, ``POST /v1/sparsity`` sets the server's p and target, then
  lm-eval's ``local-completions`` scores the tasks; the server's counters, read before and after,
  give the sparsity. Nothing else may use the server meanwhile.

A point's p is one number for every site of the target, or one per site (``{"input": 0.95,
"intermediate": 0.85}``, written ``input=0.95,intermediate=0.85`` as ``--sparsity-p`` takes it).
A per-site point runs in global mode only (a request carries one number), and not with ``search``
(``check_grid``); its folder is ``points/pinput=0.95,intermediate=0.85`` (``config.describe_p``).

Either way lm-eval keeps per-document outputs (``--log_samples``), a finished point leaves
``points/p<p>/point.json`` (with its mode) and is skipped when the sweep runs again, and
``report.build`` then turns the points into ``results.json``. Greedy scoring is deterministic,
so both modes give the same accuracies on the same server (tested).

The dense reference is the rule's dense point (``grid.dense_p``: p = 1.0 for top-p, top-k and
lq, scored like any other point). max-p has none (it keeps everything only at p = 0, outside the
plugin's range), so its dense reference (``grid.DENSE``, folder ``points/dense``) is scored on a
server without sparsity: one the sweep starts without the plugin's flags before its own, or the
one at ``--dense-url`` (``run_dense_point``). Its sparsity is 0 by definition (nothing measured).

With ``search`` the points are not all scored: ``search.bisect`` picks them from the grid, one at a
time, and its trace goes to ``search.json``. The tasks are resolved (``registry.resolve``) and
their definitions copied into ``<out>/tasks/`` before a server starts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from vllm_sparsity.eval import comparable, convert, registry, report, search
from vllm_sparsity.eval.errors import NotComparable, ServerError, UsageError
from vllm_sparsity.eval.grid import (DENSE, Point, SweepConfig, check_grid, check_rule, dense_p,
                                     measured_sparsity, p_mode, per_site, point_dir, point_name)
from vllm_sparsity.sites import sites_of
from vllm_sparsity.eval.server import Server, serve_dtype, serve_flags, served

# ---------------------------------------------------------------- lm-eval


def lm_eval_command(tasks: list[str], include_path: Path, served_name: str, base_url: str,
                    tokenizer: str, out: Path, limit: int | None, num_concurrent: int = 2,
                    batch_size: int = 4, sparsity_p: float | None = None) -> list[str]:
    """lm-eval's own CLI, scoring ``tasks`` (lm-eval task or group names) against a
    ``/v1/completions`` endpoint: its ``local-completions`` model, or with ``sparsity_p`` the
    ``sparsity-completions`` one (``lm_eval_model``), whose every request carries that p.

    ``tokenized_requests=True`` with ``add_bos_token=True``: lm-eval tokenizes with the model's
    tokenizer, prepends ``<bos>`` (Gemma needs it) and sends token ids, so the context length it
    cuts the echoed logprobs at counts the same tokens the server scored. Sent as text instead, the
    server adds a ``<bos>`` lm-eval does not count, and the score takes in the last context token.
    """
    model_args = (f"model={served_name},base_url={base_url}/v1/completions,tokenizer={tokenizer},"
                  f"tokenizer_backend=huggingface,tokenized_requests=True,add_bos_token=True,"
                  f"num_concurrent={num_concurrent},max_retries=3,timeout=600")
    if sparsity_p is None:
        cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions"]
    else:
        from vllm_sparsity.eval.lm_eval_model import MODEL

        cmd = [sys.executable, "-m", "vllm_sparsity.eval.lm_eval_model", "run", "--model", MODEL]
        model_args = f"sparsity_p={sparsity_p!r},{model_args}"
    cmd += ["--model_args", model_args, "--tasks", ",".join(tasks),
           "--include_path", str(include_path), "--batch_size", str(batch_size),
           "--output_path", str(out), "--log_samples"]
    return cmd + (["--limit", str(limit)] if limit else [])


def lm_eval_env(api_key: str | None) -> dict:
    # local-completions reads its key from OPENAI_API_KEY (kept off the command line, which lm-eval
    # copies into its results file). Offline: no Hub look-ups for local paths.
    return {**os.environ, "OPENAI_API_KEY": api_key or "", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# ---------------------------------------------------------------- the sweep


def _score(server: Server, cfg: SweepConfig, ps: list[Point], out: Path, include_path: Path,
           served_name: str, lm_tasks: list[str], per_request: bool) -> list[float]:
    """lm-eval at each p of ``ps``, all at once (one subprocess per p; its requests carry p when
    ``per_request``: numbers only), into each point's folder; returns each one's wall time in
    seconds, in the order of ``ps``. ServerError naming the p and its log when one fails."""
    runs = []
    for p in ps:
        pdir = point_dir(out, p)
        shutil.rmtree(pdir, ignore_errors=True)  # an unfinished point starts over
        pdir.mkdir(parents=True)
        cmd = lm_eval_command(lm_tasks, include_path, served_name, server.url, cfg.model,
                              pdir / "lm_eval", cfg.limit, sparsity_p=p if per_request else None)
        log = (pdir / "lm_eval.log").open("w")
        runs.append((p, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env=lm_eval_env(server.api_key)), log, time.monotonic()))
    walls, failed = [], []
    try:
        for p, proc, log, t0 in runs:
            rc = proc.wait()
            walls.append(time.monotonic() - t0)
            if rc != 0:
                failed.append(f"p={point_name(p)} (exit {rc}; log: "
                              f"{point_dir(out, p) / 'lm_eval.log'})")
    finally:
        for _, proc, log, _ in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    if failed:
        raise ServerError(f"lm-eval failed at {', '.join(failed)}")
    return walls


def run_point(server: Server, cfg: SweepConfig, p: Point, out: Path, include_path: Path,
              served_name: str, lm_tasks: list[str], set_p=None) -> dict:
    """``--p-mode global``: set the server's p, score every task at it and record the sparsity
    measured for those requests (the server's counters before and after).

    ``set_p(server, p, target) -> state`` defaults to ``Server.set``; tests replace it to play a
    broken deployment (a server at another p than the one asked for).
    """
    state = (set_p or Server.set)(server, p, cfg.target)
    before = server.state()
    wall, = _score(server, cfg, [p], out, include_path, served_name, lm_tasks, False)
    after = server.state()
    point = {"p": p, "target": cfg.target, "p_mode": "global", "server_p": state["p"],
             "server_target": state["target"], "sparsity": measured_sparsity(before, after,
                                                                            cfg.target),
             "wall_s": round(wall, 1)}
    (point_dir(out, p) / "point.json").write_text(json.dumps(point, indent=1) + "\n")
    return point


def run_dense_point(server: Server, cfg: SweepConfig, out: Path, include_path: Path,
                    lm_tasks: list[str]) -> dict:
    """The dense reference of a rule without a dense p (``grid.DENSE``): every task scored on
    ``server``, which must run without sparsity (its ``GET /v1/sparsity`` answers 404, no plugin
    route, or 409, sparsity off; else SystemExit naming ``--dense-url``). Its sparsity is 0 at
    every site by definition (no rule ran, nothing was counted: ``activations`` 0)."""
    r = server._get("/v1/sparsity")
    if r.status_code not in (404, 409):
        raise SystemExit(f"--dense-url {server.url}: the dense reference needs a server without "
                         f"sparsity, but GET /v1/sparsity answers HTTP {r.status_code} (sparsity "
                         "on); start it without --sparsity-p")
    wall, = _score(server, cfg, [DENSE], out, include_path, server.served_model(cfg.model),
                   lm_tasks, False)
    point = {"p": DENSE, "target": cfg.target, "p_mode": "dense", "server_p": None,
             "server_target": None,
             "sparsity": {**{s: 0.0 for s in sites_of(cfg.target)}, "overall": 0.0,
                          "activations": 0},
             "wall_s": round(wall, 1)}
    (point_dir(out, DENSE) / "point.json").write_text(json.dumps(point, indent=1) + "\n")
    return point


def run_points_by_request(server: Server, cfg: SweepConfig, ps: list[float], out: Path,
                          include_path: Path, served_name: str, lm_tasks: list[str]
                          ) -> dict[float, dict]:
    """``--p-mode request``: score every p of ``ps`` at once, each request carrying its p, and
    record each point's sparsity from the server's per-p counters (before and after). The server's
    settings are not touched: its target must already be the sweep's (``sweep`` checks).
    ServerError when the server counted no activation for a p (it did not apply it)."""
    before = server.state()
    walls = _score(server, cfg, ps, out, include_path, served_name, lm_tasks, True)
    after = server.state()
    points = {}
    for p, wall in zip(ps, walls):
        sparsity = measured_sparsity(before, after, cfg.target, p)
        if not sparsity["activations"]:
            raise ServerError(
                f"p={p}: the server counted no activation for requests carrying it: it did not "
                f"apply them, or its per-p counters ({after['request_p']['slots']} distinct p "
                "per start-up) are all taken; rerun with --p-mode global")
        points[p] = {"p": p, "target": cfg.target, "p_mode": "request", "server_p": p,
                     "server_target": after["target"], "sparsity": sparsity,
                     "wall_s": round(wall, 1)}
        (point_dir(out, p) / "point.json").write_text(json.dumps(points[p], indent=1) + "\n")
    return points


def prepare_tasks(cfg: SweepConfig, out: Path) -> tuple[list[registry.TaskSpec], Path]:
    """Resolve the tasks (``registry.resolve``: fails at once on a wrong one) and lay out
    ``<out>/tasks/``, the folder lm-eval is given: the built-in tasks' YAMLs (their data stay in
    the cache) and a copy of ``--include-path`` under ``user/``. Writes ``<out>/tasks.json``."""
    specs = registry.resolve(cfg.tasks, cfg.include_path)
    if cfg.include_path and out.is_relative_to(Path(cfg.include_path).resolve()):
        raise UsageError(f"--out {out} lies inside --include-path {cfg.include_path}, whose copy "
                         "goes into it; put it elsewhere")
    folder = out / "tasks"
    shutil.rmtree(folder, ignore_errors=True)  # follows the current definitions
    convert.build_tasks([s.name for s in specs if s.name in convert.TASKS], yaml_dir=folder)
    if cfg.include_path:
        shutil.copytree(cfg.include_path, folder / "user")
    (out / "tasks.json").write_text(json.dumps([s.to_json() for s in specs], indent=1) + "\n")
    return specs, folder


def _stored_config(cfg_file: Path) -> dict:
    """sweep.json as written, with the fields added since it was written at their defaults."""
    defaults = asdict(SweepConfig("", [], [], "", None))
    return {**{k: v for k, v in defaults.items() if k not in ("model", "tasks", "grid", "target",
                                                               "limit")},
            **json.loads(cfg_file.read_text())}


def sweep(cfg: SweepConfig, out: Path, url: str | None = None, api_key: str | None = None,
          set_p=None, mode: str = "auto", dense_url: str | None = None) -> dict:
    """Run (or resume) the sweep into ``out`` and write its results; returns results.json's dict.
    ``mode``: one of ``grid.P_MODES`` (see the module doc; ``set_p`` as ``run_point``, global only).
    ``dense_url``: for a rule without a dense p (max-p), the server without sparsity that scores
    the dense reference (same ``api_key``); required with ``url``, else the sweep starts one.

    Raises:
        EvalError: in one sentence, with its exit status (``errors``): UsageError (a task that
            cannot be scored: ``registry``; per-site points it cannot run: ``check_grid``),
            NotComparable (a folder holding another sweep, or points another server scored:
            ``comparable.record_serving``), ServerError (a server that does not fit or fails:
            ``Server``, ``served``; lm-eval failing).
    """
    from tqdm import tqdm

    check_grid(cfg, mode)
    if dense_p(cfg.rule) is not None and dense_url:
        raise SystemExit(f"--dense-url: the {cfg.rule} rule's dense point is p = "
                         f"{dense_p(cfg.rule):g} on the sweep's own server; --dense-url is for "
                         "a rule without a dense p (max-p): drop it")
    if dense_p(cfg.rule) is None and url and not dense_url:
        raise SystemExit(f"--rule {cfg.rule} has no dense p (it keeps every entry only at p = 0, "
                         "outside the plugin's range), so its dense reference is scored on a "
                         "server without sparsity: with --url, give that server's address as "
                         "--dense-url (or drop --url: the sweep then starts both)")
    if url and cfg.dtype != "auto":
        raise UsageError(f"--dtype {cfg.dtype}: applies to a server the sweep starts; the server "
                         f"at --url {url} computes in the dtype it was started with")
    if not url:
        cfg = replace(cfg, dtype=serve_dtype(cfg.dtype))
    out = out.resolve()  # lm-eval's file names are recorded relative to it
    out.mkdir(parents=True, exist_ok=True)
    cfg_file = out / "sweep.json"
    if cfg_file.exists() and _stored_config(cfg_file) != asdict(cfg):
        raise NotComparable(f"{out} holds a sweep with other settings ({cfg_file}); "
                         "use another --out, or delete it")
    specs, include_path = prepare_tasks(cfg, out)
    cfg_file.write_text(json.dumps(asdict(cfg), indent=1) + "\n")
    lm_tasks = [s.lm_eval for s in specs]
    if DENSE in cfg.grid and not (point_dir(out, DENSE) / "point.json").exists():
        with served(cfg.model, out / "server-dense.log", dense_url, api_key, [],
                    cfg.dtype) as server:
            run_dense_point(server, cfg, out, include_path, lm_tasks)
    if cfg.search:  # search.json is written when the search ends
        todo = not (out / "search.json").exists()
    else:
        todo = any(not (point_dir(out, p) / "point.json").exists() for p in cfg.grid)
    if todo:
        with served(cfg.model, out / "server.log", url, api_key,
                    serve_flags(cfg.target, cfg.rule, cfg.q), cfg.dtype) as server:
            served_name, initial = server.served_model(cfg.model), server.state()
            comparable.record_serving(out, initial)  # results.json's "serving"
            check_rule(initial, cfg)
            # An attached server at another target keeps it in request mode, and a request
            # carries one p: auto goes global for either.
            mode = p_mode(initial, mode, not per_site(cfg.grid) and (
                server.proc is not None or initial["target"] == cfg.target))
            restore = mode == "global"  # request mode changes nothing of an attached server
            if mode == "request" and initial["target"] != cfg.target:
                if server.proc is None:
                    raise ServerError(
                        f"--p-mode request: the server's target is {initial['target']}, the "
                        f"sweep's {cfg.target}; a request's p applies at the server's target "
                        "only: set the server's target, or use --p-mode global")
                server.set(initial["p"], cfg.target)  # the server this sweep started
            bar = tqdm(total=None if cfg.search else len(cfg.grid), unit="p", file=sys.stderr,
                       desc=f"{'search' if cfg.search else 'sweep'} {cfg.target}")

            def measure(p: Point) -> dict:
                bar.set_postfix_str(f"p={point_name(p)}")
                if (point_dir(out, p) / "point.json").exists():
                    point = json.loads((point_dir(out, p) / "point.json").read_text())
                elif mode == "request":
                    point = run_points_by_request(server, cfg, [p], out, include_path,
                                                  served_name, lm_tasks)[p]
                else:
                    point = run_point(server, cfg, p, out, include_path, served_name, lm_tasks,
                                      set_p)
                bar.update()
                bar.set_postfix_str(f"p={point_name(p)} "
                                    f"sparsity={point['sparsity']['overall']:.3f} "
                                    f"{point['wall_s']:.0f}s")
                return point

            try:
                if cfg.search:
                    def scored(p):
                        point = measure(p)
                        _, docs = report.load_point(point_dir(out, p), specs)
                        return point["sparsity"]["overall"], docs

                    trace = search.bisect(cfg.grid, scored, cfg.tol, cfg.max_points, cfg.rule)
                    (out / "search.json").write_text(json.dumps(trace, indent=1) + "\n")
                elif mode == "request":  # every point at once: one pass over the server
                    todo_ps = [p for p in cfg.grid
                               if not (point_dir(out, p) / "point.json").exists()]
                    bar.set_postfix_str(f"{len(todo_ps)} points at once")
                    if todo_ps:
                        run_points_by_request(server, cfg, todo_ps, out, include_path,
                                              served_name, lm_tasks)
                    bar.update(len(cfg.grid))
                else:
                    for p in cfg.grid:
                        measure(p)
            finally:  # an attached server goes back to its owner's settings
                bar.close()
                if restore:
                    server.set(initial["p"], initial["target"])
    return report.build(out)
