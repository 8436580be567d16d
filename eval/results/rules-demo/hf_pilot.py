"""The max-p and lq (q = 2) rows of README.md: mean sparsity per site on the demo checkpoint in
HF transformers (float32), the plugin's rule functions (``vllm_sparsity.rule``) in forward hooks,
one site at a time, on the first 4 prompts of piqa and arc_easy (``analyze``'s prompts).

    python eval/results/rules-demo/hf_pilot.py
"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from vllm_sparsity.tools.demo_model import demo_model_path
from vllm_sparsity.eval.analyze import prompts
from vllm_sparsity.rule import kept_mask, threshold_of
torch.set_num_threads(1)
path = demo_model_path()
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(path)
texts = prompts(["piqa", "arc_easy"], 4)
state = {"site": None, "p": None, "th": None, "z": 0, "t": 0}
def rule(site, x):
    if state["site"] != site:
        return None
    flat = x.reshape(-1, x.shape[-1])
    m = kept_mask(flat, state["p"], state["th"])
    state["z"] += int((~m).sum()); state["t"] += m.numel()
    return torch.where(m, flat, 0).view_as(x)
for layer in model.model.layers:
    mlp = layer.mlp
    mlp.register_forward_pre_hook(lambda m, a: (lambda y: None if y is None else (y, *a[1:]))(rule("input", a[0])))
    mlp.act_fn.register_forward_hook(lambda m, a, o: rule("gate", o))
    mlp.up_proj.register_forward_hook(lambda m, a, o: rule("up", o))
    mlp.down_proj.register_forward_pre_hook(lambda m, a: (lambda y: None if y is None else (y, *a[1:]))(rule("intermediate", a[0])))
ids = [tok(t, return_tensors="pt").input_ids for t in texts]
for name, q, grid in (("max-p", None, [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5]), ("lq", 2.0, [0.7, 0.9, 0.95, 0.98, 0.99, 0.995])):
    state["th"] = threshold_of(name, q)
    for p in grid:
        row = []
        for site in ("input", "gate", "up", "intermediate"):
            state.update(site=site, p=p, z=0, t=0)
            with torch.inference_mode():
                for i in ids:
                    model(i)
            row.append(state["z"] / state["t"])
        print(name, p, " ".join(f"{v:.3f}" for v in row), f"mean {sum(row)/4:.3f}", flush=True)
