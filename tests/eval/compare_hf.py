"""The paper's method on the same tasks: lm-eval's ``hf`` model with the rule in forward hooks.

Not a test (pytest does not collect it): a script for two checks against a sweep folder.

    PYTHONPATH=tests python tests/eval/compare_hf.py --sweep DIR --p 1.0 [--p 0.9] --out HF_DIR \
        [--dtype bfloat16|float32]

(``PYTHONPATH=tests``: it imports ``reference.py`` from there, as the tests do.)

For each p it scores the sweep's tasks and limit with HF transformers (``--dtype``, default bf16)
through lm-eval, the rule applied by ``tests/reference.py::HFTopP``'s hooks (the paper's sort
recipe; none at p = 1.0), and prints accuracy, the per-document agreement with the sweep's point at that p, and the
wall time of the evaluation (model load excluded) beside the sweep's wall time for that point.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", type=Path, required=True)
    ap.add_argument("--p", type=float, action="append", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = ap.parse_args()

    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from reference import HFTopP

    from vllm_sparsity.eval import convert
    from vllm_sparsity.eval import registry
    from vllm_sparsity.eval.report import load_point
    from vllm_sparsity.eval.grid import point_dir

    torch.set_num_threads(2)
    cfg = json.loads((args.sweep / "sweep.json").read_text())
    hf = HFTopP(cfg["model"], dtype=getattr(torch, args.dtype))
    hf.target = cfg["target"]
    lm = HFLM(pretrained=hf.model, tokenizer=hf.tokenizer, batch_size=args.batch_size,
              add_bos_token=True)
    manager = TaskManager(include_path=str(convert.build_tasks(cfg["tasks"])))
    names = [convert.lm_eval_name(t) for t in cfg["tasks"]]
    report = []
    for p in args.p:
        hf.p = None if p >= 1.0 else p
        hf.counts.clear()
        t0 = time.monotonic()
        out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager,
                                      limit=cfg["limit"], log_samples=True)
        wall = time.monotonic() - t0
        ours, ours_correct = load_point(point_dir(args.sweep, p),
                                        [registry.builtin(t) for t in cfg["tasks"]])
        row = {"p": p, "hf_wall_s": round(wall, 1), "sweep_wall_s": ours["wall_s"],
               "hf_sparsity": (sum(z for z, _ in hf.counts.values())
                               / max(1, sum(t for _, t in hf.counts.values()))),
               "sweep_sparsity": ours["sparsity"]["overall"], "tasks": {}}
        for task, name in zip(cfg["tasks"], names):
            primary = convert.TASKS[task].primary
            samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
            hf_correct = [s[primary] for s in samples]
            agree = sum(a == b for a, b in zip(hf_correct, ours_correct[task])) / len(hf_correct)
            row["tasks"][task] = {
                "metric": primary, "hf": out["results"][name][f"{primary},none"],
                "hf_stderr": out["results"][name][f"{primary}_stderr,none"],
                "sweep": ours["tasks"][task][primary],
                "sweep_stderr": ours["tasks"][task][f"{primary}_stderr"],
                "per_doc_agreement": agree}
        report.append(row)
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare_hf.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
