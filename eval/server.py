"""The vLLM server a sweep scores against: one started here (``served``: its flags, environment
and dtype) or one already running (``--url``), and the HTTP calls the sweep makes to it."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from vllm_sparsity.config import ENV_PREFIX, FIELDS, describe_p
from vllm_sparsity.eval.errors import ServerError
from vllm_sparsity.eval.grid import Point
from vllm_sparsity.sites import sites_of, target_of

START_TIMEOUT_S = 900  # Inductor compile makes start-up take minutes on a small CPU


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
            raise ServerError(f"--url {self.url}: no server answers there (connection "
                             "failed); pass the address of a running `vllm serve`") from None
        if r.status_code == 401:
            raise ServerError(f"--api-key: the server at {self.url} refused "
                             f"{'the key' if self.api_key else 'a request without a key'} "
                             "(HTTP 401); pass the --api-key it was started with")
        return r

    def state(self) -> dict:
        r = self._get("/v1/sparsity")
        if r.status_code == 404:
            raise ServerError(f"--url {self.url}: the server has no /v1/sparsity route, so it runs "
                             "without the plugin's endpoint; start it with VLLM_PLUGINS=sparsity "
                             "in its environment and --sparsity-p 1.0")
        if r.status_code == 409:
            raise ServerError(f"--url {self.url}: the server runs with sparsity off; start it with "
                             "--sparsity-p 1.0 (and VLLM_PLUGINS=sparsity)")
        if r.status_code != 200:
            raise ServerError(f"GET {self.url}/v1/sparsity: HTTP {r.status_code} {r.text[:300]} "
                               "(start the server with VLLM_PLUGINS=sparsity and --sparsity-p)")
        return r.json()

    def set(self, p: Point, target: str) -> dict:
        r = requests.post(f"{self.url}/v1/sparsity", json={"p": p, "target": target},
                          headers=self.headers, timeout=60)
        if r.status_code != 200:
            raise ServerError(f"POST {self.url}/v1/sparsity p={describe_p(p)} target={target}: "
                               f"HTTP {r.status_code} {r.text[:300]}")
        return r.json()

    def served_model(self, model: str) -> str:
        """The name under which the server serves ``model`` (a path, or the name it serves).

        vLLM's ``/v1/models`` lists each model with ``id`` (the served name) and ``root`` (the path
        it was loaded from); ``model`` matches either, or the last part of either path.

        Raises:
            ServerError: the server does not serve ``model``, or is not an OpenAI-compatible one.
        """
        r = self._get("/v1/models")
        try:
            served = r.json()["data"] if r.status_code == 200 else None
        except (ValueError, KeyError, TypeError):
            served = None
        if not served:
            raise ServerError(f"--url {self.url}: GET /v1/models gave HTTP {r.status_code} without "
                             "a model list; is it a `vllm serve` (OpenAI-compatible) server?")
        wanted = {model.rstrip("/"), Path(model.rstrip("/")).name}
        for m in served:
            names = {m["id"], m.get("root") or m["id"]}
            if wanted & (names | {Path(n).name for n in names}):
                return m["id"]
        listed = ", ".join(f"{m['id']} (from {m.get('root') or m['id']})" for m in served)
        raise ServerError(f"--model {model}: the server at {self.url} serves {listed}, not this "
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


def serve_env(environ: dict[str, str], cpus: int, sparsity: bool = True) -> dict[str, str]:
    """The environment of a ``vllm serve`` started for a sweep: ``environ`` plus the plugin
    (``VLLM_PLUGINS=sparsity``), a 1 GiB KV cache and, on a machine of at most ``ALL_CPUS_UP_TO``
    CPUs (``cpus``: how many this process may run on), ``VLLM_CPU_NUM_OF_RESERVED_CPU=0``.
    Without ``sparsity`` (a dense reference's server) the ``VLLM_SPARSITY_<FIELD>`` variables
    are dropped, so that sparsity stays off.

    vLLM-CPU's own thread binding (one OpenMP thread per physical core of the rank's NUMA node)
    keeps one core back for its scheduler and API server (``vllm/utils/ompmultiprocessing.py``):
    on a 2-core machine the model then runs on one thread. Scoring is prefill-bound and the
    scheduler mostly waits, so there a point takes about 0.6 of the time with both cores
    (eval/README.md); vLLM logs a warning that the reservation is below its minimum. On larger
    machines the reserved core costs little and is kept. Where the user set
    ``VLLM_CPU_NUM_OF_RESERVED_CPU`` or ``VLLM_CPU_OMP_THREADS_BIND`` nothing is changed.
    """
    env = {**environ, "VLLM_PLUGINS": "sparsity"}
    if not sparsity:  # no field set anywhere: the plugin stays off (config.resolve)
        env = {k: v for k, v in env.items()
               if k not in {ENV_PREFIX + field.upper() for field in FIELDS}}
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
    every target can be set at runtime; ``[]``: sparsity off, a dense reference) and ``--dtype
    dtype`` as vLLM reads it (auto: the checkpoint's), stopped on exit whatever happened. An
    attached server computes in its own dtype (``dtype`` unused). ServerError when the started one
    exits or is not ready within ``START_TIMEOUT_S``."""
    if url:
        yield Server(url.rstrip("/"), api_key)
        return
    port, api_key = _free_port(), secrets.token_hex(16)
    cmd = [str(Path(sys.executable).with_name("vllm")), "serve", model, "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", "2048", "--dtype", dtype,
           *(serve_flags() if flags is None else flags), "--api-key", api_key]
    env = serve_env(dict(os.environ), len(os.sched_getaffinity(0)), sparsity=flags != [])
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
                raise ServerError(f"vllm serve exited with {proc.returncode}; log: {log}")
            try:
                if requests.get(f"{server.url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"vllm serve not ready after {START_TIMEOUT_S} s; log: {log}")
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
