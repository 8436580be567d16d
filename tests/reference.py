"""Independent references for the top-p rule; tests and benchmarks import them from here.

``paper_top_p_mask`` is the paper's own recipe (Szatkowski et al., reference implementation
``get_topp_mask``): sort |x| descending, float64 cumulative sum, first index where it reaches
``p * sum|x|``, keep ``|x| >=`` the value there. ``loop_top_p_mask`` restates the rule one row at a
time in plain Python, so that neither shares code with ``vllm_sparsity.rule``.

Both follow the plugin's documented edge cases (see ``vllm_sparsity.rule``): zero entries are never
kept, a row holding a NaN is kept whole, ``p >= 1`` keeps every nonzero entry.
"""

from __future__ import annotations

import itertools
import math

import torch


def paper_top_p_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Paper's sort rule on x [..., K] (any float dtype) -> bool mask [..., K]."""
    a = x.abs()
    s, _ = a.sort(dim=-1, descending=True)
    c = s.cumsum(dim=-1, dtype=torch.float64)
    reached = c >= c[..., -1:] * p
    idx = reached.int().argmax(dim=-1, keepdim=True)
    mask = a >= s.gather(-1, idx)
    if p >= 1.0:
        mask = torch.ones_like(mask)
    mask &= a != 0
    return mask | x.isnan().any(dim=-1, keepdim=True)


def loop_top_p_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """The same rule, one row and one element at a time in Python floats (float64)."""
    rows = x.reshape(-1, x.shape[-1]).tolist()
    out = []
    for row in rows:
        if any(math.isnan(v) for v in row):
            out.append([True] * len(row))
            continue
        mags = sorted((abs(v) for v in row), reverse=True)
        total = math.fsum(mags) if not any(math.isinf(m) for m in mags) else math.inf
        threshold, running = 0.0, 0.0
        if p < 1.0 and total > 0:
            for m in mags:
                running += m
                if running >= p * total:
                    threshold = m
                    break
        out.append([v != 0 and abs(v) >= threshold for v in row])
    return torch.tensor(out, dtype=torch.bool).reshape(x.shape)


class HFTopP:
    """HF transformers running the paper's rule through forward hooks (the paper's method).

    The rule sits on each decoder layer's MLP input ("input", a pre-hook on the MLP), on
    act(gate_proj x) ("gate", a hook on the MLP's ``act_fn`` output), on up_proj x ("up", a hook on
    ``up_proj``'s output) and on ``down_proj``'s input ("intermediate", a pre-hook), for the sites
    of ``target`` (a named target or a comma list of sites, as the plugin takes it);
    ``counts[(layer, site)]`` accumulates ``[zeroed, total]`` activations.
    """

    def __init__(self, path, dtype=torch.bfloat16):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.p, self.target = None, "all_inputs"
        self.counts: dict[tuple[int, str], list[int]] = {}
        for i, layer in enumerate(self.model.model.layers):
            mlp = layer.mlp
            mlp.register_forward_pre_hook(lambda m, args, i=i: self._pre(i, "input", args))
            mlp.act_fn.register_forward_hook(lambda m, args, out, i=i: self._rule(i, "gate", out))
            mlp.up_proj.register_forward_hook(lambda m, args, out, i=i: self._rule(i, "up", out))
            mlp.down_proj.register_forward_pre_hook(
                lambda m, args, i=i: self._pre(i, "intermediate", args))

    def sites(self) -> tuple[str, ...]:
        named = {"all_inputs": ("input", "intermediate")}
        return named.get(self.target, tuple(self.target.split(",")))

    def _pre(self, layer, site, args):
        x = self._rule(layer, site, args[0])
        return None if x is None else (x, *args[1:])

    def _rule(self, layer, site, x):
        if self.p is None or site not in self.sites():
            return None
        flat = x.reshape(-1, x.shape[-1])
        mask = paper_top_p_mask(flat, self.p)
        c = self.counts.setdefault((layer, site), [0, 0])
        c[0] += int((~mask).sum())
        c[1] += mask.numel()
        return torch.where(mask, flat, 0).view_as(x)

    @torch.inference_mode()
    def greedy(self, prompt: str, max_tokens: int = 16) -> list[int]:
        """Greedy continuation token ids: one prefill, then one forward per new token but the
        last, exactly the forwards vLLM runs for ``max_tokens`` tokens."""
        ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        out = self.model(ids, use_cache=True)
        tokens = []
        while True:
            tokens.append(int(out.logits[0, -1].argmax()))
            if len(tokens) == max_tokens:
                return tokens
            out = self.model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values,
                             use_cache=True)


# --- The paper's other rules (Sec. 3 and App. A), one row at a time after a sort. ---------------
# Same edge cases as the rule module: zeros never kept, a row holding a NaN kept whole.


def _rows(x: torch.Tensor) -> list[list[float]]:
    return x.reshape(-1, x.shape[-1]).double().tolist()


def _as_mask(rows: list[list[bool]], x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool).reshape(x.shape)


def sort_top_k_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Top-k on x [..., K]: k = p * K rounded to the nearest integer (halves up), at least 1; keep
    every nonzero with |x| >= the k-th largest |x| (ties kept together)."""
    out = []
    for row in _rows(x):
        if any(math.isnan(v) for v in row):
            out.append([True] * len(row))
            continue
        mags = sorted((abs(v) for v in row), reverse=True)
        k = max(1, math.floor(p * len(row) + 0.5))
        threshold = 0.0 if p >= 1.0 else mags[min(k, len(mags)) - 1]
        out.append([v != 0 and abs(v) >= threshold for v in row])
    return _as_mask(out, x)


def sort_max_p_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Max-p on x [..., K]: keep every nonzero with |x| >= min(p, 1) * max|x| (float64 product)."""
    out = []
    for row in _rows(x):
        if any(math.isnan(v) for v in row):
            out.append([True] * len(row))
            continue
        top = max(abs(v) for v in row)
        out.append([v != 0 and abs(v) >= min(p, 1.0) * top for v in row])
    return _as_mask(out, x)


def sort_lq_mask(x: torch.Tensor, p: float, q: float) -> torch.Tensor:
    """L_q top-p on x [..., K]: sort |x| descending, float64 cumulative sum of |x|^q, first index
    where it reaches p * sum |x|^q, keep every nonzero with |x| >= the value there. A row whose
    every |x|^q underflows to 0 (no mass to rank by) keeps every nonzero, as the rule module says.

    |x|^q comes from ``torch.pow`` on the whole float64 tensor, as in the rule, so that both sum
    the same float64 weights (a vectorised pow may differ from Python's ``**`` in the last bit)."""
    weights = x.abs().double().pow(q).reshape(-1, x.shape[-1]).tolist()
    out = []
    for row, w in zip(_rows(x), weights):
        if any(math.isnan(v) for v in row):
            out.append([True] * len(row))
            continue
        order = sorted(range(len(row)), key=lambda j: abs(row[j]), reverse=True)
        cumsum = list(itertools.accumulate(w[j] for j in order))  # float64, as the paper's
        threshold = 0.0  # p >= 1: every nonzero
        if p < 1.0:
            reached = [c >= p * cumsum[-1] for c in cumsum]
            threshold = abs(row[order[reached.index(True)]]) if cumsum[-1] > 0 else 0.0
        out.append([v != 0 and abs(v) >= threshold for v in row])
    return _as_mask(out, x)


# --- Routed experts (fused MoE), one token and one routed expert at a time. ---------------------


def loop_moe_reference(w13: torch.Tensor, w2: torch.Tensor, x: torch.Tensor,
                       weights: torch.Tensor, ids: torch.Tensor, p_input: float | None = None,
                       p_inter: float | None = None, counted: list[bool] | None = None,
                       w13_bias: torch.Tensor | None = None, w2_bias: torch.Tensor | None = None):
    """SiLU-gated routed experts y[t] = sum_j weights[t, j] * w2[e] (silu(g) * u), [g; u] =
    w13[e] x[t], e = ids[t, j], computed in float64 one (token, expert) pair at a time, with the
    paper's sort rule (``paper_top_p_mask``) on each token's input (``p_input``) and on each
    pair's silu(g) * u (``p_inter``); None leaves a site dense.

    h, the activation and each expert's output are rounded to w13's dtype where a bf16/fp16 model
    rounds them (no-op in fp32). ``counted[t]``: whether token t enters the counts (default all).

    Returns:
        (y float64 [M, H], {site: int64 [E, 2]}): per expert, activations zeroed and in all at
        the ``input`` site (a token's input counted at each of its experts) and at
        ``intermediate``.
    """
    dtype = w13.dtype
    num_experts, inter = w2.shape[0], w2.shape[2]

    def rnd(v):
        return v.to(dtype).double()

    w13d, w2d = w13.double(), w2.double()
    y = torch.zeros(x.shape, dtype=torch.float64)
    counts = {s: torch.zeros(num_experts, 2, dtype=torch.int64)
              for s in ("input", "intermediate")}
    for t in range(x.shape[0]):
        real = counted is None or counted[t]
        xt = x[t].double()
        if p_input is not None:
            keep = paper_top_p_mask(x[t:t + 1].float(), p_input)[0]
            xt = torch.where(keep, xt, 0)
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = rnd(w13d[e] @ xt)
            h = rnd(h + w13_bias[e].double()) if w13_bias is not None else h
            a = rnd(torch.nn.functional.silu(h[:inter]) * h[inter:])
            if p_input is not None and real:
                counts["input"][e] += torch.tensor([int((~keep).sum()), x.shape[1]])
            if p_inter is not None:
                keep_a = paper_top_p_mask(a[None].float(), p_inter)[0]
                a = torch.where(keep_a, a, 0)
                if real:
                    counts["intermediate"][e] += torch.tensor([int((~keep_a).sum()), inter])
            o = rnd(w2d[e] @ a)
            o = rnd(o + w2_bias[e].double()) if w2_bias is not None else o
            y[t] += float(weights[t, j]) * o
    return y, counts
