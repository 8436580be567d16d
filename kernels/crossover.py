"""The CPU backend's crossover: up to how many rows of x the input-sparse GEMV beats the layer's own
dense GEMM, decided by measurement on the CPU that serves, per weight shape.

``cpu_input_sparse_gemv`` reads only the weight rows some row of x keeps (their union), but pays one
fp32 FMA per weight read per row of x, while the dense GEMM (vLLM-CPU's oneDNN, AMX where present;
``F.linear`` where vLLM falls back) reads all of W once whatever M is. So the sparse kernel wins at
small M and loses above some M that depends on the CPU, its dense path, the dtype and the shape:
no constant serves every machine. ``decide_for(wt, dense)`` finds it:

- Inputs: for each M in 1 .. ``cpu_input_sparse_gemv_max_rows()``, x [M, K] with exactly
  ``round(s * K)`` zeros per row at ``s = EXPECTED_SPARSITY`` on a random support per row (fixed
  seeds), run at p = 1 (the rule still runs all its passes and keeps every nonzero). Random
  supports make the union of kept rows grow as ``1 - s^M``, faster than real activations, whose
  heavy channels are shared by the rows: the measured sparse time is an upper bound there.
- Timing: alternating rounds (dense then sparse, then sparse then dense, ...) of samples that each
  sum calls for at least ``SAMPLE_S`` (at most ``SAMPLE_CALLS`` calls); per M the median over
  ``ROUNDS`` of the per-round ratio sparse / dense (paired, so that load from other processes
  cancels out). Every call starts with cold caches (``CacheEvictor``: a read of twice the
  last-level cache, untimed), as in serving, where each layer's weights are evicted by the other
  layers' before its next call. Called back to back on one weight, the sparse kernel's kept rows
  (a share 1 - s of it) stay in a large L3 where the whole dense weight does not, which favoured
  the sparse path by up to 1.5x on a 32 MB L3 and layer weights of 32-64 MB.
- Decision: the largest M such that the sparse kernel was faster (median ratio < 1) at every
  M' <= M; 0 when it loses at M = 1. Timing stops at the first M where it loses: the op's policy
  is a prefix (``M <= m_max`` takes the sparse path), so a later win could not be used.
- The dense side is timed without the rule (``cpu_top_p_sparsify``) that the op runs before it on
  its dense branch: the sparse path is chosen only where it beats plain dense, the plugin-off cost.

Cache: ``cache_dir() / "cpu_crossover.json"``, one entry per key: CPU model name and flags
(/proc/cpuinfo), torch and vLLM versions, the kernel build (instruction set, source hash), torch's
thread count, dtype, N, K and the expected sparsity. A hit skips the timing; any other key misses
and is measured (and added). One decision per key and process (``_DECIDED``), so all layers of one
shape share one measurement and one log line (logger ``vllm.vllm_sparsity``).

Override: ``VLLM_SPARSITY_CPU_M_MAX=<0 .. max rows>`` fixes the crossover of every layer, with no
timing and no cache (tests, comparisons).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger("vllm.vllm_sparsity")  # under vLLM's handler and format

# Share of each row's inputs the rule is expected to drop at the sites served. Lower than the
# sparsities the plugin is run at (0.5-0.7 for the paper's p of 0.7-0.9): the sparse kernel's time
# falls with s, so a crossover measured at a lower s never sends to it an M it loses at serving.
EXPECTED_SPARSITY = 0.5
ROUNDS = 5  # timing rounds per M (odd: the median is one of them)
SAMPLE_S = 0.005  # seconds of calls per timing sample (clock resolution, call overhead)
SAMPLE_CALLS = 8  # at most this many calls per sample (each call pays an untimed cache eviction)
ENV = "VLLM_SPARSITY_CPU_M_MAX"
CACHE_FILE = "cpu_crossover.json"
# Bump when the measurement changes (inputs, timing, decision): older entries then miss.
METHOD = 3
# The kernels' sources (a change invalidates the cached decisions).
SOURCES = sorted((Path(__file__).resolve().parent / "cpu").glob("*.[ch]*"))

# (path, M) -> seconds per call; path is "sparse" or "dense".
Timer = Callable[[str, int], float]


@dataclasses.dataclass(frozen=True)
class Decision:
    """The crossover of one key.

    Attributes:
        m_max: rows up to which the sparse GEMV runs (0 = never), in [0, max rows].
        source: "measured", "cache", the override variable's name, or why it was not measured.
        ratios: median sparse / dense time per M timed (empty for the override).
    """

    m_max: int
    source: str
    ratios: dict[int, float]


def decide(timer: Timer, max_rows: int, rounds: int = ROUNDS) -> tuple[int, dict[int, float]]:
    """The crossover from ``timer``: largest M whose median sparse / dense ratio, and every smaller
    M's, is < 1 (0 when M = 1 already loses).

    Args:
        timer: ``timer(path, m)`` -> seconds per call of ``path`` ("sparse"/"dense") at M = m.
        max_rows: largest M the sparse path can take (the kernel's limit), >= 1.
        rounds: alternating rounds per M, >= 1.

    Returns:
        ``(m_max, ratios)``: ratios {M: median ratio} for every M timed (up to the first loss).
    """
    ratios: dict[int, float] = {}
    for m in range(1, max_rows + 1):
        per_round = []
        for r in range(rounds):
            if r % 2 == 0:
                dense = timer("dense", m)
                sparse = timer("sparse", m)
            else:
                sparse = timer("sparse", m)
                dense = timer("dense", m)
            per_round.append(sparse / dense)
        ratios[m] = statistics.median(per_round)
        if ratios[m] >= 1.0:
            return m - 1, ratios
    return max_rows, ratios


def sparse_inputs(m: int, k: int, dtype: torch.dtype, sparsity: float,
                  seed: int = 0) -> torch.Tensor:
    """x [m, k] of ``dtype`` with exactly ``round(sparsity * k)`` zeros per row, each row's zeros at
    its own random positions, every other entry nonzero (Gaussian)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x = torch.where(x.to(dtype) == 0, torch.ones_like(x), x)  # no accidental zeros
    zeros = round(sparsity * k)
    for row in x:
        row[torch.randperm(k, generator=g)[:zeros]] = 0.0
    return x.to(dtype)


def last_level_cache_bytes() -> int:
    """Bytes of last-level cache the CPUs this process may run on use: for each of them (its
    affinity), the highest-level cache sysfs lists (``/sys/devices/system/cpu/cpuN/cache/index*/``
    ``level``, ``size`` e.g. "32768K", ``shared_cpu_list``), summed once per distinct cache (a CPU
    with several L3s, or sockets, spreads a multi-threaded read over all of them); 0 where sysfs
    lists none."""
    caches: dict[tuple[int, str], int] = {}
    for cpu in sorted(os.sched_getaffinity(0)):
        found = []
        for d in Path(f"/sys/devices/system/cpu/cpu{cpu}/cache").glob("index*"):
            try:
                level = int((d / "level").read_text())
                m = re.fullmatch(r"(\d+)([KMG]?)", (d / "size").read_text().strip())
                shared = (d / "shared_cpu_list").read_text().strip()
            except (OSError, ValueError):
                continue
            if m:
                found.append((level, shared,
                              int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]))
        if found:
            level, shared, size = max(found)
            caches[(level, shared)] = size
    top = max((level for level, _ in caches), default=0)
    return sum(size for (level, _), size in caches.items() if level == top)


class CacheEvictor:
    """``evict()`` reads a buffer of twice the last-level cache (``last_level_cache_bytes``; 64 MiB
    where sysfs lists none), which leaves mostly its own clean lines in the caches: the next call
    reads its weights from memory, as in serving.

    Not perfectly cold: on a Zen 5 with a 32 MB L3, a 1B-shaped gate_up_proj's kept rows (26 MB)
    took 0.6-0.8 ms a call after one read, 0.83 ms rotating over four copies of the weight,
    0.94-0.99 ms after two reads. Two reads were tried in the crossover and sent M = 2 of that
    model's down_proj to the dense GEMM, where serving showed the sparse path paying (2 streams:
    x1.12, against x1.28 with one read); the crossover's inputs are already conservative (s = 0.5
    on random supports, below real sites' sparsity and overlap). Results:
    kernels/bench/results/cpu-amd-epyc-zen5-avx512bf16-2026-12-08/."""

    FALLBACK_BYTES = 32 << 20

    def __init__(self) -> None:
        llc = last_level_cache_bytes() or self.FALLBACK_BYTES
        self.buffer = torch.ones(2 * llc // 4, dtype=torch.float32)

    def evict(self) -> None:
        self.buffer.sum()


def timed_cold(fn: Callable[[], object], evictor: CacheEvictor, sample_s: float = SAMPLE_S,
               max_calls: int = SAMPLE_CALLS, clock: Callable[[], float] | None = None) -> float:
    """Seconds per call of ``fn``, each call after ``evictor.evict()`` (untimed): calls are summed
    until ``sample_s`` or ``max_calls``. ``clock``: seconds now (default ``time.perf_counter``;
    a CPU clock where other jobs share the cores)."""
    now = clock or time.perf_counter
    elapsed, calls = 0.0, 0
    while elapsed < sample_s and calls < max_calls:
        evictor.evict()
        t0 = now()
        fn()
        elapsed += now() - t0
        calls += 1
    return elapsed / calls


class LayerTimer:
    """The real ``Timer`` of one layer: ``cpu_input_sparse_gemv`` on its K-major copy ``wt`` [K, N]
    against ``dense(x, None)``, on ``sparse_inputs`` at ``sparsity``, with cold caches
    (``timed_cold``). One call per path and M warms up before its first sample."""

    def __init__(self, wt: torch.Tensor, dense: Callable[[torch.Tensor, None], torch.Tensor],
                 sparsity: float = EXPECTED_SPARSITY, sample_s: float = SAMPLE_S):
        self.wt, self.dense, self.sparsity, self.sample_s = wt, dense, sparsity, sample_s
        self.p = torch.ones(1, dtype=torch.float64)  # keeps every nonzero: exactly 1 - s per row
        self.x: dict[int, torch.Tensor] = {}
        self.evictor = CacheEvictor()

    def _fn(self, path: str, m: int) -> Callable[[], object]:
        if m not in self.x:
            self.x[m] = sparse_inputs(m, self.wt.shape[0], self.wt.dtype, self.sparsity, seed=m)
            self.dense(self.x[m], None)
            torch.ops.vllm_sparsity.cpu_input_sparse_gemv(self.x[m], self.p, self.wt, None)
        x = self.x[m]
        if path == "dense":
            return lambda: self.dense(x, None)
        return lambda: torch.ops.vllm_sparsity.cpu_input_sparse_gemv(x, self.p, self.wt, None)

    def __call__(self, path: str, m: int) -> float:
        return timed_cold(self._fn(path, m), self.evictor, self.sample_s)


def cpu_identity() -> tuple[str, str]:
    """``(model, flags)`` of the first CPU in /proc/cpuinfo: its model name with family, model and
    stepping numbers (hypervisors may shorten the name to e.g. "AMD EPYC"), and its flags sorted,
    space-separated; empty strings where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", ""

    def field(name: str) -> str:
        m = re.search(rf"^{name}\s*:\s*(.*)$", text, re.MULTILINE)
        return m.group(1).strip() if m else "?"

    model = (f"{field('model name')} (family {field('cpu family')}, model {field('model')}, "
             f"stepping {field('stepping')})")
    return model, " ".join(sorted(field("flags").split()))


def cache_key(dtype: torch.dtype, n: int, k: int, sparsity: float, build: str | None) -> dict:
    """Everything the crossover of a [N, K] weight of ``dtype`` depends on, as a JSON-able dict
    (``build``: the kernel build's instruction set, ``cpu_backend.select_isa``)."""
    try:
        import vllm

        vllm_version = vllm.__version__
    except ImportError:
        vllm_version = "none"
    model, flags = cpu_identity()
    return {"method": METHOD, "cpu": model, "flags": flags, "torch": torch.__version__,
            "vllm": vllm_version, "isa": build,
            "kernel": hashlib.sha256(b"".join(f.read_bytes() for f in SOURCES)).hexdigest()[:16],
            "threads": torch.get_num_threads(), "dtype": str(dtype).removeprefix("torch."),
            "N": n, "K": k, "sparsity": sparsity}


def cache_path() -> Path:
    """The decisions' JSON file, in the plugin's cache folder."""
    from vllm_sparsity.cache import cache_dir

    return cache_dir() / CACHE_FILE


def _entry_id(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # missing or damaged: measured again, then rewritten
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, key: dict, m_max: int, ratios: dict[int, float]) -> None:
    """Add one entry (read, merge, atomic replace: other processes may write beside us; a lost
    race only costs them a measurement next time)."""
    data = _read_cache(path)
    data[_entry_id(key)] = {"key": key, "m_max": m_max,
                            "ratios": {str(m): round(r, 4) for m, r in ratios.items()},
                            "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def env_override(max_rows: int) -> int | None:
    """``VLLM_SPARSITY_CPU_M_MAX`` as an int, None when unset or empty.

    Raises:
        ValueError: not an integer in [0, max_rows] (the message names the variable and range).
    """
    raw = os.environ.get(ENV, "").strip()
    if raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= max_rows:
        raise ValueError(f"{ENV}={raw!r}: must be an integer from 0 to {max_rows} (rows of x up "
                         f"to which the cpu backend's sparse GEMV runs; unset: measured)")
    return value


# key id -> decision, for this process: one measurement and one log line per key.
_DECIDED: dict[str, Decision] = {}


def decide_for(wt: torch.Tensor, dense: Callable[[torch.Tensor, None], torch.Tensor], *,
               build: str | None = None, sparsity: float = EXPECTED_SPARSITY,
               timer: Timer | None = None, max_rows: int | None = None) -> Decision:
    """The crossover of a layer: override, else this process's decision for its key, else the
    cache, else measured (then cached). Logs one line per key and process.

    Args:
        wt: the layer's K-major weight [K, N] (bf16/fp16/fp32, contiguous, on the CPU), the one
            ``cpu_input_sparse_gemv`` reads.
        dense: the layer's dense GEMM, ``dense(x [M, K], bias=None) -> y [M, N]``.
        build: the kernel build's instruction set (``cpu_backend.select_isa()[0]``), part of the
            cache key.
        sparsity: expected share of zeros per row, in [0, 1).
        timer: replaces ``LayerTimer(wt, dense, sparsity)`` (tests).
        max_rows: largest M timed (default: ``cpu_input_sparse_gemv_max_rows()``).

    Raises:
        ValueError: a bad ``VLLM_SPARSITY_CPU_M_MAX`` or ``sparsity``.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if max_rows is None:
        max_rows = int(torch.ops.vllm_sparsity.cpu_input_sparse_gemv_max_rows())
    forced = env_override(max_rows)
    if forced is not None:
        return Decision(forced, ENV, {})
    if wt.device.type != "cpu":  # no data to time (a meta weight): the dense path, always safe
        return Decision(0, f"not measured: weight on {wt.device.type}", {})
    k, n = wt.shape
    key = cache_key(wt.dtype, n, k, sparsity, build)
    kid = _entry_id(key)
    if kid in _DECIDED:
        return _DECIDED[kid]
    path = cache_path()
    entry = _read_cache(path).get(kid)
    what = f"{key['dtype']} [N {n}, K {k}] at s = {sparsity}, {key['threads']} thread(s)"
    if isinstance(entry, dict) and entry.get("key") == key and isinstance(entry.get("m_max"), int):
        decision = Decision(entry["m_max"], "cache",
                            {int(m): r for m, r in entry.get("ratios", {}).items()})
        how = f"from the cache {path}"
    else:
        t0 = time.perf_counter()
        m_max, ratios = decide(timer or LayerTimer(wt, dense, sparsity), max_rows)
        decision = Decision(m_max, "measured", ratios)
        how = f"measured in {time.perf_counter() - t0:.1f} s, cached in {path}"
        try:
            _write_cache(path, key, m_max, ratios)
        except OSError as e:  # read-only cache: still decided, measured again next start
            how = f"measured in {time.perf_counter() - t0:.1f} s, not cached ({e})"
    _DECIDED[kid] = decision
    shown = " ".join(f"{m}:{r:.2f}" for m, r in sorted(decision.ratios.items()))
    logger.info("vllm-sparsity cpu crossover for %s: sparse GEMV up to M = %d, dense above "
                "(%s; sparse/dense time by M %s)", what, decision.m_max, how, shown or "-")
    return decision
