"""Shared fixtures: the demo model, and real `vllm serve` processes shared by the whole session.

vLLM start-up (Inductor compile included) takes minutes on this CPU, so the session starts at most
two servers, in parallel, on first use: ``sparse_server`` (plugin on, ``--sparsity-p 0.9``, the
runtime-control route enabled, an API key set, ``usage.prompt_tokens_details.cached_tokens`` in
replies) and ``dense_server`` (plugin off), each only if a selected test uses it.
``sites_server`` (every site installed, eager) and ``max_p_server`` (the max-p rule) are started
when first needed and stopped after their last user; their users run together, early. Each is stopped at the end of the session, whatever happened (also after a test killed
one of its processes).
Tests marked ``kills_server`` break ``sparse_server`` for good: they run after every other test
(``pytest_collection_modifyitems``), and ``sparse_server`` keeps its API server up after its engine
dies (``VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=1``) so that they can read ``/health`` and ``/metrics``
then. Both run in float32 (``--dtype float32``), so that
comparisons with HF transformers are not swamped by bf16 rounding (see test_fidelity.py); bf16 is
covered by the rule and kernel tests and by ``make demo``.
"""

from __future__ import annotations

import triton_interpreter  # noqa: F401, I001  (first: before anything imports triton)
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from skip_policy import (pytest_collectreport, pytest_runtest_logreport,  # noqa: F401  (hooks)
                         pytest_sessionfinish, pytest_terminal_summary)

REPO = Path(__file__).resolve().parents[1]
VLLM = Path(sys.executable).with_name("vllm")
API_KEY = "test-key"
SERVED_NAME = "gemma-3-270m"
SITES = ("input", "gate", "up", "intermediate")  # every site the plugin has, in model order
START_TIMEOUT_S = float(os.environ.get("VLLM_SPARSITY_TEST_START_TIMEOUT", 900))
# Every `vllm serve` the suite starts: a small KV cache. vLLM-CPU's default core reservation is
# kept (one core for the API server and engine core, the model on the rest): with two threads the
# model's GEMMs round differently from one batch shape to the next, and the served tests compare
# greedy text across batches, prefix-cache hits and servers.
SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
# The in-process engine (``vllm_process``) gets every CPU: its cases compare with references in
# the same process, never across batch shapes.
ENGINE_ENV = {**SERVER_ENV, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A `vllm serve` subprocess on a loopback port."""

    name: str
    proc: subprocess.Popen
    port: int
    log: Path
    api_key: str | None
    model: str = SERVED_NAME
    # Test-only switch of the workers (worker_rpc.TEST_DELAY_ENV): write {method: seconds} here
    # to make them answer that method late.
    rpc_delay_file: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def wait_ready(self) -> Server:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   + self.log.read_text()[-4000:])
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(2)
        raise TimeoutError(f"{self.name} not ready after {START_TIMEOUT_S} s; log: {self.log}")

    def stop(self) -> None:
        """End the server's whole process group, even when some of its processes (or the API
        server itself) already died: orphaned engine or worker processes keep the group."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:  # no process left in the group
                break
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass  # then SIGKILL; after a clean exit, SIGKILL ends any orphan of the group

    def completion(self, prompt, **kw) -> dict:
        body = {"model": SERVED_NAME, "prompt": prompt, "temperature": 0.0, **kw}
        r = requests.post(f"{self.url}/v1/completions", json=body, headers=self.headers,
                          timeout=300)
        r.raise_for_status()
        return r.json()


def start_server(name: str, args: list[str], log_dir: Path, env: dict | None = None,
                 api_key: str | None = None) -> Server:
    """Start `vllm serve MODEL ARGS` in its own process group (so stop() ends every child)."""
    from vllm_sparsity.tools.demo_model import demo_model_path

    port = free_port()
    log = log_dir / f"{name}.log"
    cmd = [str(VLLM), "serve", str(demo_model_path()), "--served-model-name", SERVED_NAME,
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048", "--dtype", "float32",
           *args]
    if api_key:
        cmd += ["--api-key", api_key]
    full_env = {**os.environ, **SERVER_ENV, **(env or {})}
    for k in list(full_env):  # start from a clean sparsity environment
        if k.startswith("VLLM_SPARSITY_") and k not in (env or {}):
            del full_env[k]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=full_env,
                            start_new_session=True, cwd=log_dir)
    return Server(name, proc, port, log, api_key)


def pytest_configure(config):
    config.addinivalue_line("markers", "kills_server: kills a process of the session's shared "
                            "sparse_server; runs after every other test")


@pytest.fixture(scope="session")
def demo_model() -> Path:
    from vllm_sparsity.tools.demo_model import demo_model_path

    return demo_model_path()


_NEEDED = pytest.StashKey[set]()


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(config, items):
    """Run the ``kills_server`` tests last, in their collected order, and note which servers the
    selected tests use (fixtures named in their closure)."""
    items.sort(key=lambda item: item.get_closest_marker("kills_server") is not None)
    # The users of a lazily stopped server run one after the other, at the first one's place, so
    # that the server is stopped after its last user (pytest_runtest_teardown) instead of living
    # beside the session's servers to the end.
    # The groups run one after the other, at the first group's place: early in the session, where
    # the pytest process is still small (a third server later, beside what in-process tests have
    # grown it to, got a worker OOM-killed on a 24 GiB machine).
    groups = [[item for item in items if name in getattr(item, "fixturenames", ())]
              for name in LAZY_SERVERS]
    lazy = [item for group in groups for item in group]
    if lazy:
        first = min(items.index(item) for item in lazy)
        rest = [item for item in items if item not in lazy]
        items[:] = rest[:first] + lazy + rest[first:]
    config.stash[_NEEDED] = {name.removesuffix("_server") for item in items
                             for name in ("sparse_server", "dense_server")
                             if name in getattr(item, "fixturenames", ())}


@pytest.fixture(scope="session")
def vllm_process(tmp_path_factory, demo_model) -> dict:
    """What ``vllm_process.py`` found in one process holding a vLLM engine on the demo model (see
    there); read by test_step.py and test_replace.py."""
    import torch

    tmp = tmp_path_factory.mktemp("vllm_process")
    out, log = tmp / "results.pt", tmp / "vllm_process.log"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("VLLM_SPARSITY_")},
           **ENGINE_ENV}
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, str(REPO / "tests" / "vllm_process.py"), str(out),
                               str(tmp)], stdout=f, stderr=subprocess.STDOUT, env=env,
                              timeout=START_TIMEOUT_S, cwd=tmp)
    if proc.returncode != 0:
        raise RuntimeError(f"vllm_process.py exited with {proc.returncode}:\n"
                           + log.read_text()[-4000:])
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="session")
def _servers(tmp_path_factory, demo_model, pytestconfig):
    log_dir = tmp_path_factory.mktemp("servers")
    needed = pytestconfig.stash.get(_NEEDED, {"sparse", "dense"})
    servers = {}
    if "sparse" in needed:
        delay = log_dir / "rpc-delay.json"
        servers["sparse"] = start_server(
            "sparse", ["--sparsity-p", "0.9", "--enable-prompt-tokens-details"], log_dir,
            env={"VLLM_PLUGINS": "sparsity", "VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": "1",
                 "VLLM_SPARSITY_TEST_RPC_DELAY_FILE": str(delay),
                 # The cpu backend's sparse GEMV on decode batches of up to 8 rows, whatever
                 # crossover this CPU measures (sites_server runs the measured one).
                 "VLLM_SPARSITY_CPU_M_MAX": "8"},
            api_key=API_KEY)
        servers["sparse"].rpc_delay_file = delay
    if "dense" in needed:
        servers["dense"] = start_server("dense", [], log_dir)
    try:
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture(scope="session")
def sparse_server(_servers) -> Server:
    return _servers["sparse"].wait_ready()


@pytest.fixture(scope="session")
def dense_server(_servers) -> Server:
    return _servers["dense"].wait_ready()


# Session servers stopped right after their last user (``pytest_runtest_teardown``), their users
# grouped together (``pytest_collection_modifyitems``): fixture name -> the running server.
LAZY_SERVERS: dict[str, Server | None] = {"sites_server": None, "max_p_server": None}


def _lazy_server(fixture: str, name: str, args: list[str], tmp_path_factory):
    """A ``LAZY_SERVERS`` server (plugin on, the routes on, API key set): started, recorded under
    ``fixture`` so that ``pytest_runtest_teardown`` stops it after its last user, yielded ready."""
    server = start_server(name, args, tmp_path_factory.mktemp(name),
                          env={"VLLM_PLUGINS": "sparsity"}, api_key=API_KEY)
    LAZY_SERVERS[fixture] = server
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def sites_server(tmp_path_factory, demo_model):
    """Plugin on at p = 1 with every site installed (``--sparsity-target input,gate,up,
    intermediate``), eager and without prefix caching (``analyze``'s flags, so that the analysis
    route works), API key set. Shared by every test that needs it and stopped after the last
    one: beside the session's two servers it would not fit in a 24 GiB machine for long."""
    from vllm_sparsity.eval.analyze import ANALYSIS_SERVE_FLAGS

    yield from _lazy_server("sites_server", "sites", [
        "--sparsity-p", "1.0", "--sparsity-target", ",".join(SITES), "--max-num-seqs", "8",
        *ANALYSIS_SERVE_FLAGS], tmp_path_factory)


@pytest.fixture(scope="session")
def max_p_server(tmp_path_factory, demo_model):
    """The demo model under max-p at p = 0.5 (torch backend: auto's pick for max-p), the route on,
    API key set (``test_rollback.py``). Stopped after its last user, as ``sites_server``."""
    yield from _lazy_server("max_p_server", "max_p", [
        "--sparsity-p", "0.5", "--sparsity-rule", "max-p",
        "--max-num-seqs", "8"], tmp_path_factory)  # a smaller warm-up: a third server


def pytest_runtest_teardown(item, nextitem):
    for name, server in LAZY_SERVERS.items():
        if (server is not None and name in getattr(item, "fixturenames", ())
                and (nextitem is None or name not in getattr(nextitem, "fixturenames", ()))):
            server.stop()  # its last user (users run together): free its memory now
