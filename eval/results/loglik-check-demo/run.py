"""`eval check`'s paired log-likelihood signal on served output (README.md here).

    python run.py OUT [URL API_KEY]

On the demo model, the CI sample (PIQA + LAMBADA, 40 documents each, target intermediate, deployed
p = 0.8): a baseline from a sweep [1.0, 0.8]; a rerun of p = 0.8 (scored again, the dense point
copied); a broken deployment whose server runs p = 0.75 when asked for 0.8. Prints the check's
failures and warnings for both. Without URL it starts a server as `eval sweep` does.
"""
import json
import shutil
import sys
import time
from pathlib import Path

from vllm_sparsity.tools.demo_model import demo_model_path
from vllm_sparsity.eval.check import check, make_baseline
from vllm_sparsity.eval.grid import SweepConfig, point_dir
from vllm_sparsity.eval.server import Server, serve_dtype, serve_flags, served
from vllm_sparsity.eval.sweep import sweep

OUT = Path(sys.argv[1]); OUT.mkdir(parents=True, exist_ok=True)
model = str(demo_model_path())
cfg = SweepConfig(model, ["piqa", "lambada"], [1.0, 0.8], "intermediate", 40)
URL, KEY = (sys.argv[2], sys.argv[3]) if len(sys.argv) > 3 else (None, None)
with served(model, OUT / "server.log", URL, KEY, serve_flags("intermediate"),
            serve_dtype("auto")) as server:
    t = time.monotonic()
    base_res = sweep(cfg, OUT / "base", server.url, server.api_key, mode="global")
    base = make_baseline(base_res, 0.8, "loglik-check-demo baseline")
    for name, real in (("rerun", 0.8), ("broken", 0.75)):
        shutil.copytree(point_dir(OUT / "base", 1.0), point_dir(OUT / name, 1.0), dirs_exist_ok=True)
        def set_p(srv, p, target, real=real):
            return Server.set(srv, real if p == 0.8 else p, target)
        res = sweep(cfg, OUT / name, server.url, server.api_key, set_p=set_p, mode="global")
        fails, warns = check(res, base)
        print(f"== {name} (server ran p={real} when asked 0.8)")
        print("FAILURES:", json.dumps(fails, indent=1))
        print("WARNINGS:", json.dumps(warns, indent=1))
    print(f"wall {time.monotonic() - t:.0f} s")
