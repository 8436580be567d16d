"""lm-eval's ``local-completions`` with the plugin's per-request p: the model ``sparsity-completions``.

Every request it sends carries ``"vllm_xargs": {"sparsity_p": p}`` (see ``vllm_sparsity.request_p``),
so that lm-eval processes at different p can score against one server at once
(``eval sweep --p-mode request``). Everything else is ``local-completions``' (payloads, parsing,
retries, concurrency); lm-eval offers no option to add a field to a log-likelihood request.

Run as lm-eval's own CLI with this model registered:
``python -m vllm_sparsity.eval.lm_eval_model run --model sparsity-completions
--model_args sparsity_p=0.7,model=...,base_url=... ...``.
"""

from __future__ import annotations

from lm_eval.api.registry import register_model
from lm_eval.models.openai_completions import LocalCompletionsAPI

from vllm_sparsity.config import parse_p
from vllm_sparsity.request_p import EXTRA_ARG

MODEL = "sparsity-completions"


@register_model(MODEL)
class SparsityCompletionsAPI(LocalCompletionsAPI):
    """``local-completions`` whose requests carry ``sparsity_p`` (a number in [1e-6, 1], or its
    text as lm-eval's ``--model_args`` gives it; SparsityConfigError naming ``sparsity_p``
    otherwise). Other arguments: ``local-completions``'."""

    def __init__(self, sparsity_p, **kwargs) -> None:
        self.sparsity_p = parse_p(sparsity_p, "sparsity_p")
        super().__init__(**kwargs)

    def _create_payload(self, *args, **kwargs) -> dict:
        payload = super()._create_payload(*args, **kwargs)
        return {**payload, "vllm_xargs": {EXTRA_ARG: self.sparsity_p}}


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
