"""``--tasks``/``--include-path`` resolution: the user's own YAMLs are accepted with the metric
their definition names, groups pool their subtasks, and a name that cannot be scored offline
fails at once with the name and the reason, before any server (no server is used here)."""

import json
import socket

import numpy as np
import pytest
from lm_eval.tasks import TaskManager

from vllm_sparsity.eval import registry, report
from vllm_sparsity.eval.cli import main
from vllm_sparsity.eval.errors import ExitCode, UsageError

DOCS = [{"q": "2 + 2 =", "choices": ["4", "5"], "gold": 0},
        {"q": "The sky is", "choices": ["green", "blue"], "gold": 1},
        {"q": "Water is", "choices": ["wet", "dry", "loud"], "gold": 0}]


def yaml_task(folder, name, metric="acc", extra=""):
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: q\ndoc_to_choice: choices\n"
        f"doc_to_target: gold\nmetric_list:\n  - metric: {metric}\n  - metric: acc\n{extra}")


@pytest.fixture
def own(tmp_path):
    yaml_task(tmp_path, "my_task", metric="acc_norm")
    yaml_task(tmp_path, "my_other")
    (tmp_path / "my_group.yaml").write_text("group: my_group\ntask: [my_task, my_other]\n")
    yaml_task(tmp_path, "my_f1", metric="f1")
    (tmp_path / "my_hub.yaml").write_text(
        "task: my_hub\ndataset_path: someone/some_dataset_not_cached\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: q\ndoc_to_choice: c\n"
        "doc_to_target: 0\nmetric_list:\n  - metric: acc\n")
    return tmp_path, TaskManager(include_path=str(tmp_path), include_defaults=False)


def test_own_yaml_is_accepted_with_its_first_metric(own):
    folder, manager = own
    [spec] = registry.resolve(["my_task"], folder, manager)
    assert spec == registry.TaskSpec("my_task", "my_task",
                                     (registry.Leaf("my_task", "acc_norm", "none", False),))
    # lm-eval itself loads it and builds one request per choice of each document.
    task = manager.load(["my_task"])["tasks"]["my_task"]
    task.build_all_requests(rank=0, world_size=1)
    assert [inst.arguments for inst in task.instances[:2]] == [("2 + 2 =", " 4"),
                                                               ("2 + 2 =", " 5")]
    assert len(task.instances) == sum(len(d["choices"]) for d in DOCS)


def test_a_group_pools_its_subtasks(own, tmp_path):
    folder, manager = own
    [spec] = registry.resolve(["my_group"], folder, manager)
    assert spec.lm_eval == "my_group"
    assert [(leaf.task, leaf.metric) for leaf in spec.leaves] == [("my_task", "acc_norm"),
                                                                  ("my_other", "acc")]
    # A point of lm-eval output, written by hand: the group's documents are pooled.
    pdir = tmp_path / "point"
    run = pdir / "lm_eval" / "model"
    run.mkdir(parents=True)
    (pdir / "point.json").write_text(json.dumps({"p": 1.0}))
    (run / "results_2026-12-01T00-00-00.json").write_text(json.dumps({"results": {}}))
    per_doc = {"my_task": [1, 0, 1], "my_other": [0, 0, 1]}
    for task, values in per_doc.items():
        metric = {"my_task": "acc_norm", "my_other": "acc"}[task]
        (run / f"samples_{task}_2026-12-01T00-00-00.jsonl").write_text("".join(
            json.dumps({"doc_id": i, "filter": "none", metric: v, "resps": [[" x"]]}) + "\n"
            for i, v in reversed(list(enumerate(values)))))
    point, correct = report.load_point(pdir, [spec])
    assert correct["my_group"].tolist() == [1, 0, 1, 0, 0, 1]
    pooled = np.array([1, 0, 1, 0, 0, 1])
    assert point["tasks"]["my_group"]["acc_norm"] == pytest.approx(pooled.mean())
    assert point["tasks"]["my_group"]["acc_norm_stderr"] == pytest.approx(
        pooled.std(ddof=1) / np.sqrt(6))


@pytest.mark.parametrize("name, message", [
    ("my_tsak", "--tasks my_tsak: no such task or group in the built-in tasks, lm-eval's "
                "registry or --include-path {folder}; close matches: my_task"),
    ("my_f1", "--tasks my_f1: its primary metric f1 aggregates by 'f1_score', not by the "
              "per-document mean"),
    ("my_hub", "--tasks my_hub: its dataset 'someone/some_dataset_not_cached' comes from the "
               "Hugging Face Hub and is not in the local cache"),
])
def test_a_task_that_cannot_be_scored_fails_naming_it(own, name, message):
    folder, manager = own
    with pytest.raises(UsageError) as e:
        registry.resolve(["piqa", name], folder, manager)
    assert str(e.value).startswith(message.format(folder=folder))


def test_missing_data_file_and_include_path(own, tmp_path):
    folder, manager = own
    (folder / "my_task.jsonl").unlink()
    with pytest.raises(UsageError, match=f"--tasks my_task: its data file {folder}/my_task.jsonl "
                                         "does not exist"):
        registry.resolve(["my_task"], folder, manager)
    with pytest.raises(UsageError, match="--include-path /nonexistent: not a folder"):
        registry.resolve(["my_task"], "/nonexistent", manager)


def test_registry_task_needing_the_hub_fails_before_any_server(tmp_path, capsys):
    """Through the CLI with lm-eval's whole registry: a group whose data live on the Hub is
    refused before the sweep reaches --url (a dead port: reaching it would give another error)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert main(["sweep", "--model", "/models/m", "--url", dead, "--tasks", "piqa,mmlu",
                 "--p-grid", "1.0,0.9", "--out", str(tmp_path / "out")]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert err.startswith("vllm-sparsity eval: error: --tasks mmlu (its subtask mmlu_")
    assert "its dataset 'cais/mmlu' comes from the Hugging Face Hub" in err


def test_a_misspelled_registry_name_lists_each_close_match_once(tmp_path, capsys):
    """``hellaswag`` is both a built-in and lm-eval's task: suggested once, before any server."""
    assert main(["sweep", "--model", "/models/m", "--url", "http://127.0.0.1:9", "--tasks",
                 "hellaswg", "--out", str(tmp_path / "out")]) == ExitCode.USAGE
    msg = capsys.readouterr().err.removeprefix("vllm-sparsity eval: error: ").strip()
    assert msg.startswith("--tasks hellaswg: no such task or group in the built-in tasks, "
                          "lm-eval's registry; close matches: hellaswag, ")
    close = msg.split("close matches: ")[1].split(", ")
    assert len(close) == len(set(close)) == 5
