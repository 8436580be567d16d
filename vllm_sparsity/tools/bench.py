"""End-to-end throughput of the plugin in vLLM: prefill and decode tokens/s against the plugin off.

``vllm-sparsity bench`` starts two offline ``vllm.LLM`` engines (prefix caching off), each in its
own subprocess, one after the other: the plugin off, and the plugin on (``--backend``,
``--target``, ``--mode``), which serves every ``--p`` in turn, switching p at run time between measurements (the
worker RPC behind ``POST /v1/sparsity``; p is a tensor the compiled graph reads, so nothing
recompiles). Both stay alive. It then measures in rounds, one configuration at a time and never two
at once, in an order that alternates from round to round, and prints the median of each
configuration and the median of the per-round ratios to the plugin off, with their range. Why paired
rounds: a machine's speed can drift over minutes (frequency scaling, other load) by more than the
effects measured (``kernels/bench/results/cpu-avx2-2026-12-01/measurements.md``); configurations run minutes
apart would compare the drift. A benchmark, not a test.

- prefill: one prompt of ``--prefill-tokens`` token ids, ``max_tokens=1``.
- decode at each ``--streams`` count S: S different short prompts served together (one batch of S
  decode rows), each generating ``--decode-tokens`` tokens (EOS ignored); decode time is that run's
  time minus the same prompts' ``max_tokens=1`` time; tokens/s counts all S streams. The prompts
  differ, so that the rows of a batch keep different entries (the union of their kept sets is what
  a sparse GEMV over several rows reads).
- crossover: the rows up to which each layer runs the sparse GEMV (the CPU backend measures it per
  layer shape at start-up, ``kernels/crossover.py``), as ``GET /v1/sparsity`` reports it.
- sparsity: the plugin's own counters (``counters``, read with the worker RPC behind ``GET
  /v1/sparsity``) over the decode runs of each p: the share of each site's inputs zeroed, and
  (kernel backends) the share of weight rows read, means over the layers.
- memory: resident set (RSS, and its ratio to the first engine's) and proportional set (PSS,
  shared pages split between processes) of each engine's process tree (the LLM process, its engine
  core and workers), after warm-up.

The engines are created with small ``max_num_batched_tokens`` / ``max_model_len`` /
``max_num_seqs``: vLLM-CPU warms up (compiles) every batch size up to them at start-up.

``--no-off`` leaves out the plugin-off engine (half the memory, for a large model on a small
machine): the ratios are then to the first ``--p`` on the plugin engine, e.g. ``--p 1.0 0.85``
(p = 1 runs the rule, which keeps every nonzero, then vLLM's own dense GEMM).

``vllm-sparsity bench --metrics-overhead --p 0.9`` instead compares p = 0.9 with the metrics
counters off and on (``additional_config["sparsity_metrics"]``; two plugin engines).

``vllm-sparsity bench --sparsity-of URL`` instead measures, on a running server started with
``VLLM_PLUGINS=sparsity`` and ``--sparsity-target all_inputs``, the mean per-layer sparsity of each
target over a fixed prompt set at each p (``eval/sparsity_table.py``, through ``/v1/sparsity``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

# A fixed, model-independent short prompt for decode (token ids inside every vocabulary used here).
SHORT_PROMPT = [2, 818, 5279, 529, 7001, 563]
STREAMS = [1, 2, 4, 8, 16]


def stream_prompts(n: int) -> list[dict]:
    """``n`` different short decode prompts [6 token ids each]: ``SHORT_PROMPT`` for the first,
    the others with its ids after the first shifted by a different step (ids stay in 500-5500)."""
    return [{"prompt_token_ids": SHORT_PROMPT[:1] + [
        SHORT_PROMPT[j] if i == 0 else 500 + (SHORT_PROMPT[j] + 977 * i) % 5000
        for j in range(1, len(SHORT_PROMPT))]} for i in range(n)]


def _decode_counts(llm) -> dict[str, list[float]]:
    """{site: [zeroed, total, weight columns read, weight columns in all]} of the decode phase,
    summed over the layers (the workers' snapshots merged as ``/v1/sparsity`` merges them)."""
    from vllm_sparsity import counters

    merged = counters.merge(llm.collective_rpc("vllm_sparsity_snapshot"))
    out: dict[str, list[float]] = {}
    for (_, site), entry in merged["sites"].items():
        row = entry["rows"][counters.DECODE]
        acc = out.setdefault(site, [0, 0, 0, 0])
        for i, col in enumerate((counters.ZEROED, counters.TOTAL, counters.COLS_READ,
                                 counters.COLS_TOTAL)):
            acc[i] += row[col]
    return out


def _serve_measurements(args: argparse.Namespace) -> None:
    """Child process: start one engine, then answer ``prefill [p]`` / ``decode [p]`` lines on
    stdin (p: set first, plugin engines only) with ``RESULT {"tok_s": ..., "counts": ...}`` lines
    on stdout (counts: ``_decode_counts`` differences over a decode run)."""
    from vllm import LLM, SamplingParams

    # SIGTERM from the parent: exit through Python, so that LLM shuts its engine core down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    kwargs = dict(model=args.model, max_model_len=args.prefill_tokens + args.decode_tokens + 16,
                  max_num_batched_tokens=args.max_num_batched_tokens,
                  max_num_seqs=max(args.streams),
                  dtype="bfloat16", enable_prefix_caching=False, seed=0)
    if args.p is not None:
        kwargs["additional_config"] = {
            "sparsity": {"p": args.p, "target": args.target, "backend": args.backend,
                         "mode": args.mode},
            "sparsity_metrics": args.metrics}
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    startup_s = time.perf_counter() - t0
    # A fixed, model-independent prompt: token ids cycling through an ordinary range.
    long_prompt = {"prompt_token_ids": [2] + [1000 + i % 5000
                                              for i in range(args.prefill_tokens - 1)]}

    def timed(prompts, max_tokens):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    timed([long_prompt], 1)  # warm-up
    for n in args.streams:
        timed(stream_prompts(n), 8)
    ready = {"startup_s": startup_s, "crossover": _crossover(llm) if args.p is not None else None}
    print("READY " + json.dumps(ready), flush=True)
    for line in sys.stdin:
        kind, streams, p = line.split()
        if p != "-":
            llm.collective_rpc("vllm_sparsity_set", args=(float(p), None))
        counts = None
        if kind == "prefill":
            tok_s = args.prefill_tokens / timed([long_prompt], 1)
        else:
            prompts = stream_prompts(int(streams))
            before = _decode_counts(llm) if args.p is not None else None
            tok_s = len(prompts) * args.decode_tokens / (
                timed(prompts, args.decode_tokens + 1) - timed(prompts, 1))
            if before is not None:
                after = _decode_counts(llm)
                counts = {site: [a - b for a, b in zip(after[site], before[site])]
                          for site in after}
        print("RESULT " + json.dumps({"tok_s": tok_s, "counts": counts}), flush=True)


def _crossover(llm) -> dict[str, str]:
    """{"<layer kind> (<site>)": "M (source), ..."}: the rows up to which each kind of layer runs
    its sparse GEMV (``GET /v1/sparsity``'s ``crossover``), the distinct values over the model's
    layers."""
    from vllm_sparsity import counters

    merged = counters.merge(llm.collective_rpc("vllm_sparsity_snapshot"))
    seen: dict[str, set[str]] = {}
    for (_, site), entry in merged["sites"].items():
        c = entry.get("crossover")
        if c:
            kind = f"{entry['name'].rsplit('.', 1)[-1]} ({site})"
            seen.setdefault(kind, set()).add(f"{c['m_max']} ({c['source']})")
    return {kind: ", ".join(sorted(values)) for kind, values in seen.items()}


def _tree_memory_gib(pid: int) -> dict[str, float]:
    """Resident memory in GiB of process ``pid`` and its descendants (the LLM process, its engine
    core, the workers, Inductor's compile workers): ``rss`` and ``pss`` summed over them (PSS splits
    shared pages, so its sum counts them once), and ``worker_rss`` of the largest process (the
    worker holding the weights and the KV cache)."""
    import psutil

    root = psutil.Process(pid)
    rss = pss = largest = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
        except psutil.Error:  # exited meanwhile
            continue
        rss += info.rss
        pss += info.pss
        largest = max(largest, info.rss)
    return {"rss": rss / 2**30, "pss": pss / 2**30, "worker_rss": largest / 2**30}


class _Child:
    """One engine's subprocess (see ``_serve_measurements``)."""

    def __init__(self, args: argparse.Namespace, key: str, p: float | None,
                 metrics_on: bool) -> None:
        cmd = [sys.executable, "-m", "vllm_sparsity.tools.bench", "--_child", "--model", args.model,
               "--target", args.target, "--backend", args.backend, "--mode", args.mode,
               "--prefill-tokens", str(args.prefill_tokens),
               "--decode-tokens", str(args.decode_tokens),
               "--max-num-batched-tokens", str(args.max_num_batched_tokens),
               "--_child-metrics", str(int(metrics_on)),
               "--streams", *map(str, args.streams)]
        if p is not None:
            cmd += ["--_child-p", str(p)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_SPARSITY_")}
        # vLLM's CPU backend otherwise reserves 92% of RAM, and two engines are alive.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env["VLLM_LOGGING_STREAM"] = "ext://sys.stderr"  # stdout carries the READY/RESULT lines
        # vLLM's log, shown if the child fails (kept in --log-dir when given).
        if args.log_dir:
            os.makedirs(args.log_dir, exist_ok=True)
        self.log = (open(os.path.join(args.log_dir, f"{key}.log"), "w+") if args.log_dir
                    else tempfile.TemporaryFile(mode="w+"))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env)
        try:
            ready = self._read("READY ")
            self.startup_s, self.crossover = ready["startup_s"], ready["crossover"]
        except BaseException:  # interrupted while it starts: end it (its handler shuts vLLM down)
            self.proc.terminate()
            self.proc.wait()
            raise
        self.memory_gib = _tree_memory_gib(self.proc.pid)

    def _read(self, prefix: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return json.loads(line[len(prefix):])
        self.log.seek(0)
        sys.stderr.write(self.log.read()[-4000:])
        raise SystemExit(f"bench: a configuration's process exited ({self.proc.wait()})")

    def measure(self, kind: str, streams: int = 1, p: float | None = None) -> dict:
        self.proc.stdin.write(f"{kind} {streams} " + ("-" if p is None else repr(p)) + "\n")
        self.proc.stdin.flush()
        return self._read("RESULT ")

    def close(self) -> None:
        """End the engine: EOF on its stdin ends the child's loop and ``LLM`` shuts its engine
        core down; a child that does not exit in time is terminated."""
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait()


def _sparsity(counts: list[dict]) -> dict[str, float]:
    """Per site, from summed decode counts: ``<site>`` zeroed share, ``<site>_read`` weight rows
    read share (kernel backends); ``all`` the mean over the sites of the zeroed shares."""
    sums: dict[str, list[float]] = {}
    for c in counts:
        for site, values in c.items():
            sums[site] = [a + b for a, b in zip(sums.get(site, [0, 0, 0, 0]), values)]
    out = {}
    for site, (zeroed, total, read, cols) in sums.items():
        if total:
            out[site] = zeroed / total
        if cols and read != cols:  # the torch backend reads every column
            out[f"{site}_read"] = read / cols
    shares = [out[s] for s in sums if s in out]
    if shares:
        out["all"] = sum(shares) / len(shares)
    return out


def _name(kind: str, streams: int) -> str:
    """A measurement's key: ``prefill``, or ``decode@S`` for S concurrent streams."""
    return "prefill" if kind == "prefill" else f"decode@{streams}"


def _summarize(runs: dict, configs: list, names: list[str], children: dict) -> dict:
    """Per configuration: median tok/s of each measurement, the median of its per-round ratios to
    the first configuration with their range, decode sparsity, and its engine's memory with the
    ratio of its RSS to the first configuration's engine."""
    base_label, base_key, _ = configs[0]
    results = {}
    for label, key, _ in configs:
        r = runs[label]
        mem = children[key].memory_gib
        results[label] = {"engine": key, "startup_s": children[key].startup_s,
                          "memory_gib": mem,
                          "rss_ratio": mem["rss"] / children[base_key].memory_gib["rss"],
                          "crossover": children[key].crossover,
                          "decode_sparsity": _sparsity(r["counts"])}
        for name in names:
            ratios = [a / b for a, b in zip(r[name], runs[base_label][name])]
            results[label][name] = {"tok_s": statistics.median(r[name]),
                                    "ratio": statistics.median(ratios),
                                    "ratio_range": [min(ratios), max(ratios)]}
    return results


def _print_tables(results: dict, base: str, names: list[str], children: dict,
                  rounds: int) -> None:
    """Markdown tables: tok/s and ratio (range) to ``base`` per measurement; sparsity; memory;
    the crossover of each plugin engine."""
    print(f"\n| {rounds} rounds | " + " | ".join(names) +
          " | decode sparsity: input / intermediate (rows read) |")
    print("|---" * (len(names) + 2) + "|")
    for label, r in results.items():
        s = r["decode_sparsity"]
        sp = " / ".join(
            f"{s[site]:.3f}" + (f" ({s[site + '_read']:.3f})" if site + "_read" in s else "")
            for site in ("input", "intermediate") if site in s) or "-"
        cells = [f"{r[n]['tok_s']:.1f}" + ("" if label == base else
                 f" x{r[n]['ratio']:.3f} ({r[n]['ratio_range'][0]:.3f}-"
                 f"{r[n]['ratio_range'][1]:.3f})") for n in names]
        print(f"| {label} | " + " | ".join(cells) + f" | {sp} |")
    print("\n| engine | start-up s | RSS GiB (all processes) | RSS ratio | PSS GiB | "
          "largest process RSS GiB |\n|---|---|---|---|---|---|")
    base_rss = next(iter(children.values())).memory_gib["rss"]
    for key, child in children.items():
        mem = child.memory_gib
        print(f"| {key} | {child.startup_s:.0f} | {mem['rss']:.2f} | "
              f"x{mem['rss'] / base_rss:.3f} | {mem['pss']:.2f} | {mem['worker_rss']:.2f} |")
    for key, child in children.items():
        if child.crossover:
            print(f"\ncrossover of engine {key} (sparse GEMV up to M rows; per layer kind):")
            for kind, m_max in sorted(child.crossover.items()):
                print(f"  {kind}: {m_max}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-sparsity bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model path (default: the demo model)")
    parser.add_argument("--p", type=float, nargs="*", default=[0.9, 1.0],
                        help="p values to compare with the plugin off (default: 0.9 1.0)")
    parser.add_argument("--target", default="all_inputs")
    parser.add_argument("--backend", default="auto",
                        help="the plugin's backend: auto, cpu, torch (default: auto)")
    parser.add_argument("--mode", default="exact",
                        help="the plugin's --sparsity-mode: exact or speed (default: exact)")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, nargs="+", default=STREAMS,
                        help="concurrent decode streams to measure, each count in every round "
                        f"(default: {' '.join(map(str, STREAMS))})")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="vLLM's max_num_batched_tokens (default: --prefill-tokens)")
    parser.add_argument("--rounds", type=int, default=10,
                        help="measurement rounds; each measures every configuration once")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--sparsity-of", metavar="URL",
                        help="measure per-target sparsity on this running server instead")
    parser.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY"))
    parser.add_argument("--metrics-overhead", action="store_true",
                        help="instead: the first --p with the metrics counters off (the "
                        "baseline) and on")
    parser.add_argument("--log-dir", help="keep each engine's vLLM log in DIR/<engine>.log")
    parser.add_argument("--no-off", action="store_true",
                        help="no plugin-off engine: ratios to the first --p (see above)")
    parser.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_child-p", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_child-metrics", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.max_num_batched_tokens is None:
        args.max_num_batched_tokens = args.prefill_tokens
    for flag in ("prefill_tokens", "decode_tokens", "rounds", "max_num_batched_tokens"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not all(1 <= n <= 256 for n in args.streams):
        parser.error(f"--streams must be counts in [1, 256], got {args.streams}")
    if not args._child:
        from vllm_sparsity.config import SparsityConfig, SparsityConfigError

        try:  # the plugin's own checks, before minutes of start-up
            for p in args.p or [1.0]:
                SparsityConfig(p=p, target=args.target, backend=args.backend, mode=args.mode)
        except SparsityConfigError as e:
            parser.error(str(e))
    if args.model is None:
        from vllm_sparsity.tools.demo_model import demo_model_path

        args.model = str(demo_model_path())
    if args.sparsity_of:
        from vllm_sparsity.eval.sparsity_table import print_table, sparsity_table

        ps = args.p if args.p != [0.9, 1.0] else [0.5, 0.7, 0.9, 0.95]
        print_table(sparsity_table(args.sparsity_of, ps, args.api_key), ps)
        return 0
    if args._child:
        args.p, args.metrics = args._child_p, bool(args._child_metrics)
        _serve_measurements(args)
        return 0
    if not args.p:
        parser.error("--p needs at least one value")

    # Configurations: (label, engine key, p sent with each measurement); the first is the
    # baseline of the ratios. Engines: key -> (p at start-up, metrics counters on).
    if args.metrics_overhead:
        engines = {"metrics off": (args.p[0], False), "metrics on": (args.p[0], True)}
        configs = [(key, key, None) for key in engines]
    else:
        engines = {"off": (None, True), "plugin": (args.p[0], True)}
        configs = [("off", "off", None)] + [(f"p={p:g}", "plugin", p) for p in args.p]
        if args.no_off:
            del engines["off"]
            configs = configs[1:]
    # A SIGTERM (timeout, kill) unwinds through the finally below, which ends the engines.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    children = {}
    load = os.getloadavg()
    print(f"model {args.model}; backend {args.backend}, target {args.target}, mode {args.mode}; "
          "load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    try:
        for key, (p, metrics_on) in engines.items():  # one at a time: start-up compiles
            children[key] = _Child(args, key, p, metrics_on)
            mem = children[key].memory_gib
            print(f"engine {key:>11}: start-up {children[key].startup_s:6.1f} s, resident "
                  f"{mem['rss']:.2f} GiB RSS, {mem['pss']:.2f} GiB PSS, largest process "
                  f"{mem['worker_rss']:.2f} GiB RSS", flush=True)
        measures = [("prefill", 1)] + [("decode", n) for n in args.streams]
        runs = {label: {**{_name(*m): [] for m in measures}, "counts": []}
                for label, _, _ in configs}
        for i in range(args.rounds):
            order = configs if i % 2 == 0 else configs[::-1]
            for kind, streams in measures:
                for label, key, p in order:
                    r = children[key].measure(kind, streams, p)
                    runs[label][_name(kind, streams)].append(r["tok_s"])
                    if r["counts"] is not None:
                        runs[label]["counts"].append(r["counts"])
            print(f"round {i + 1}/{args.rounds} (tok/s): " + "; ".join(
                f"{label} " + " ".join(f"{runs[label][_name(*m)][-1]:.1f}" for m in measures)
                for label, _, _ in configs), flush=True)
    finally:
        for child in children.values():
            child.close()
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    results = _summarize(runs, configs, [_name(*m) for m in measures], children)
    _print_tables(results, configs[0][0], [_name(*m) for m in measures], children, args.rounds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "results": results, "runs": runs}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
