"""The sweep: one vLLM server, p set through its control route, lm-eval scoring each p point.

For each p of the grid (the dense point p = 1.0 first; p = 1.0 is bit-identical to the plugin off),
``POST /v1/sparsity`` sets p and the target, the activation counters are read, lm-eval's
``local-completions`` model scores the tasks against ``/v1/completions`` (log-likelihoods, per-
document outputs kept with ``--log_samples``), and the counters are read again: their difference is
the sparsity of exactly those requests. A finished point leaves ``points/p<p>/point.json`` and is
skipped when the sweep runs again. ``results.build`` then turns the points into ``results.json``.
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
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

from vllm_sparsity.eval import convert
from vllm_sparsity.sites import TARGETS

# The paper's grid (fszatkowski/activation-sparsity-benchmarking, slurm_scripts/harness/
# model_grids/*.sh, `sparsity_setups`) without its p = 0.0, which the plugin rejects (p in (0, 1]).
PAPER_GRID = (1.0, 0.995, 0.99, 0.985, 0.98, 0.975, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.91,
              0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
START_TIMEOUT_S = 900  # Inductor compile makes start-up take minutes on a small CPU


@dataclass
class SweepConfig:
    """What a sweep folder holds results for; resuming with a different one is refused."""

    model: str  # model (or, with --url, tokenizer) path
    tasks: list[str]
    grid: list[float]
    target: str
    limit: int | None


def point_dir(out: Path, p: float) -> Path:
    return out / "points" / f"p{p:g}"


# ---------------------------------------------------------------- the server


@dataclass
class Server:
    url: str
    api_key: str | None = None
    proc: subprocess.Popen | None = None  # set when this process started it

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def state(self) -> dict:
        r = requests.get(f"{self.url}/v1/sparsity", headers=self.headers, timeout=60)
        if r.status_code != 200:
            raise RuntimeError(f"GET {self.url}/v1/sparsity: HTTP {r.status_code} {r.text[:300]} "
                               "(start the server with VLLM_PLUGINS=sparsity and --sparsity-p)")
        return r.json()

    def set(self, p: float, target: str) -> dict:
        r = requests.post(f"{self.url}/v1/sparsity", json={"p": p, "target": target},
                          headers=self.headers, timeout=60)
        if r.status_code != 200:
            raise RuntimeError(f"POST {self.url}/v1/sparsity p={p} target={target}: "
                               f"HTTP {r.status_code} {r.text[:300]}")
        return r.json()

    def served_model(self) -> str:
        r = requests.get(f"{self.url}/v1/models", headers=self.headers, timeout=60)
        r.raise_for_status()
        return r.json()["data"][0]["id"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served(model: str, log: Path, url: str | None = None, api_key: str | None = None):
    """Yield a Server: the one at ``url``, or a ``vllm serve`` subprocess started here (plugin on
    at p = 1.0 with target all_inputs, so that every target can be set at runtime), stopped on
    exit whatever happened."""
    if url:
        yield Server(url.rstrip("/"), api_key)
        return
    port, api_key = _free_port(), secrets.token_hex(16)
    cmd = [str(Path(sys.executable).with_name("vllm")), "serve", model, "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", "2048", "--sparsity-p", "1.0",
           "--sparsity-target", "all_inputs", "--api-key", api_key]
    env = {**os.environ, "VLLM_PLUGINS": "sparsity"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"starting vllm serve on port {port} (minutes: compile; log: {log})", file=sys.stderr)
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


def measured_sparsity(before: dict, after: dict, target: str) -> dict:
    """Share of activations zeroed between two ``GET /v1/sparsity`` answers, per site of the
    target and over all of them (``overall``); None for a site that saw no activations."""
    delta = {}
    for b, a in zip(before["layers"], after["layers"]):
        assert (b["layer"], b["site"]) == (a["layer"], a["site"]), "layer rows changed order"
        z, t = delta.get(a["site"], (0, 0))
        delta[a["site"]] = (z + a["zeroed"] - b["zeroed"], t + a["total"] - b["total"])
    out = {}
    for site in TARGETS[target]:
        z, t = delta.get(site, (0, 0))
        out[site] = z / t if t else None
    zs = sum(delta.get(s, (0, 0))[0] for s in TARGETS[target])
    ts = sum(delta.get(s, (0, 0))[1] for s in TARGETS[target])
    out["overall"] = zs / ts if ts else None
    out["activations"] = ts
    return out


# ---------------------------------------------------------------- lm-eval


def lm_eval_command(tasks: list[str], include_path: Path, served_name: str, base_url: str,
                    tokenizer: str, out: Path, limit: int | None, num_concurrent: int = 2,
                    batch_size: int = 4) -> list[str]:
    """lm-eval's own CLI, scoring ``tasks`` against a ``/v1/completions`` endpoint.

    ``tokenized_requests=True`` with ``add_bos_token=True``: lm-eval tokenizes with the model's
    tokenizer, prepends ``<bos>`` (Gemma needs it) and sends token ids, so the context length it
    cuts the echoed logprobs at counts the same tokens the server scored. Sent as text instead, the
    server adds a ``<bos>`` lm-eval does not count, and the score takes in the last context token.
    """
    model_args = (f"model={served_name},base_url={base_url}/v1/completions,tokenizer={tokenizer},"
                  f"tokenizer_backend=huggingface,tokenized_requests=True,add_bos_token=True,"
                  f"num_concurrent={num_concurrent},max_retries=3,timeout=600")
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions",
           "--model_args", model_args, "--tasks", ",".join(convert.lm_eval_name(t) for t in tasks),
           "--include_path", str(include_path), "--batch_size", str(batch_size),
           "--output_path", str(out), "--log_samples"]
    return cmd + (["--limit", str(limit)] if limit else [])


def lm_eval_env(api_key: str | None) -> dict:
    # local-completions reads its key from OPENAI_API_KEY (kept off the command line, which lm-eval
    # copies into its results file). Offline: no Hub look-ups for local paths.
    return {**os.environ, "OPENAI_API_KEY": api_key or "", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# ---------------------------------------------------------------- the sweep


def run_point(server: Server, cfg: SweepConfig, p: float, out: Path, include_path: Path,
              served_name: str, set_p=None) -> dict:
    """Score every task at one p and record the sparsity measured for those requests.

    ``set_p(server, p, target) -> state`` defaults to ``Server.set``; tests replace it to play a
    broken deployment (a server at another p than the one asked for).
    """
    pdir = point_dir(out, p)
    shutil.rmtree(pdir, ignore_errors=True)  # an unfinished point starts over
    pdir.mkdir(parents=True)
    state = (set_p or Server.set)(server, p, cfg.target)
    before = server.state()
    cmd = lm_eval_command(cfg.tasks, include_path, served_name, server.url, cfg.model,
                          pdir / "lm_eval", cfg.limit)
    t0 = time.monotonic()
    with (pdir / "lm_eval.log").open("w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env=lm_eval_env(server.api_key)).returncode
    wall = time.monotonic() - t0
    if rc != 0:
        raise RuntimeError(f"lm-eval failed at p={p} (exit {rc}); log: {pdir / 'lm_eval.log'}")
    after = server.state()
    point = {"p": p, "target": cfg.target, "server_p": state["p"], "server_target":
             state["target"], "sparsity": measured_sparsity(before, after, cfg.target),
             "wall_s": round(wall, 1)}
    (pdir / "point.json").write_text(json.dumps(point, indent=1) + "\n")
    return point


def sweep(cfg: SweepConfig, out: Path, url: str | None = None, api_key: str | None = None,
          set_p=None) -> dict:
    """Run (or resume) the sweep into ``out`` and write its results; returns results.json's dict."""
    from tqdm import tqdm

    from vllm_sparsity.eval import results

    out = out.resolve()  # lm-eval's file names are recorded relative to it
    out.mkdir(parents=True, exist_ok=True)
    cfg_file = out / "sweep.json"
    if cfg_file.exists() and json.loads(cfg_file.read_text()) != asdict(cfg):
        raise SystemExit(f"{out} holds a sweep with other settings ({cfg_file}); "
                         "use another --out, or delete it")
    cfg_file.write_text(json.dumps(asdict(cfg), indent=1) + "\n")
    include_path = convert.build_tasks(cfg.tasks)
    todo = [p for p in cfg.grid if not (point_dir(out, p) / "point.json").exists()]
    if todo:
        with served(cfg.model, out / "server.log", url, api_key) as server:
            served_name, initial = server.served_model(), server.state()
            try:
                bar = tqdm(cfg.grid, desc=f"sweep {cfg.target}", unit="p", file=sys.stderr)
                for p in bar:
                    bar.set_postfix_str(f"p={p:g}")
                    if p in todo:
                        point = run_point(server, cfg, p, out, include_path, served_name, set_p)
                        bar.set_postfix_str(f"p={p:g} sparsity={point['sparsity']['overall']:.3f}"
                                            f" {point['wall_s']:.0f}s")
            finally:  # an attached server goes back to its owner's settings
                server.set(initial["p"], initial["target"])
    return results.build(out)
