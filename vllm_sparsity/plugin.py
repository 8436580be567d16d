"""vLLM general plugin entry point (entry-point group ``vllm.general_plugins``, name ``sparsity``):
the one place where the plugin is wired to vLLM, through the adapters of ``_vllm_compat``.

vLLM calls ``register()`` in every process it starts (API server, engine core, each worker), before
it builds its argument parser, and possibly more than once per process; it must be idempotent and
cheap. See ``vllm/plugins/__init__.py::load_general_plugins``. What it installs:

- the ``--sparsity-*`` flags on ``vllm serve`` (so ``vllm serve --help`` lists them);
- flags > additional_config > environment resolved into the canonical
  ``additional_config["sparsity"]`` (``config.with_resolved_sparsity``), from the CLI and for
  offline ``LLM(...)``; vLLM ships it to every worker and hashes it into its compile cache. A bad
  flag value ends the CLI with one line naming the flag (exit status 2, like argparse);
- the swap of the gated MLPs' linear methods once the model is built (``replace.replace_mlp``);
- the worker-side RPC methods of ``control.py`` (read by the ``/v1/sparsity`` route, an endpoint
  plugin, and by the metrics publisher);
- around vLLM's warm-up (``Executor.compile_or_warm_up_model``), two worker RPCs: before it,
  ``vllm_sparsity_bind_step`` points the token phases at the model runner's ``query_start_loc``
  buffer (so that CUDA graphs captured during warm-up read it on replay) and refuses a model that
  a loader built without ``create_model``; after it, ``vllm_sparsity_start_counting`` zeroes the
  counters, so that warm-up traffic (V2 pushes fake requests through ``execute_model``) is never
  counted;
- p per request (``request_p``): at admission, a request's ``vllm_xargs.sparsity_p`` is checked
  (HTTP 400 naming it when bad, or when the server runs without sparsity) and salts the request's
  prefix cache (``InputProcessor.process_inputs``); in each worker, before every forward, the
  step's requests' p go to the device (the model runner's ``_model_forward``, bound with the
  token phases);
- the metrics publisher in the API server (``metrics.start_publisher``), so that the
  ``vllm_sparsity_*`` series reach ``/metrics`` whenever sparsity is on.
"""

from __future__ import annotations

import logging
import sys

from vllm_sparsity import _vllm_compat, request_p
from vllm_sparsity import config as cfg

logger = logging.getLogger("vllm.vllm_sparsity")  # under vLLM's handler and format

_FLAG_HELP = {
    "p": "Activation sparsity: the rule's parameter (top-p: share of each token's L1 activation "
    f"mass kept) at the target's sites of every gated MLP, a number in {cfg.P_RANGE} (max-p also "
    "takes 0, which keeps every nonzero), or one per site, e.g. input=0.95,intermediate=0.85. "
    "Unset: sparsity off.",
    "target": "Which sites the rule sparsifies: input (gate_up_proj input), intermediate "
    "(down_proj input), all_inputs (both), or a comma list of the sites input, gate, up, "
    "intermediate (gate and up: analysis only, no weight read skipped). Default: all_inputs.",
    "rule": "Sparsification rule (paper Sec. 3, App. A): top-p, top-k (p: kept fraction of K), "
    "max-p (p: fraction of the row's max) or lq (L_q top-p, needs --sparsity-q). Default: top-p.",
    "q": "Exponent of the lq rule, a finite number > 0 (lq only).",
    "backend": "Sparse compute backend: auto (triton on CUDA, cpu on x86-64 CPUs with AVX2 or "
    "AVX-512, torch elsewhere), triton, cpu or torch. Default: auto.",
    "mode": "exact: the rule at every step; speed: steps whose batch is past a layer's crossover "
    "(where the dense GEMM is faster than the sparse one) skip the rule on that layer, which is "
    "then dense for the step (cpu and triton backends). Default: exact.",
}
_FLAG_METAVAR = {"p": "P", "target": "{" + ",".join(cfg.TARGETS) + "}|SITE,...",
                 "backend": "{" + ",".join(cfg.BACKENDS) + "}",
                 "rule": "{" + ",".join(cfg.RULES) + "}", "q": "Q",
                 "mode": "{" + ",".join(cfg.MODES) + "}"}


def register() -> None:
    """Install the plugin's hooks into vLLM (idempotent)."""
    if not _vllm_compat.first_install():
        return
    from vllm_sparsity import versions, worker_rpc

    versions.warn_if_unchecked_vllm()

    _vllm_compat.on_add_cli_args(_add_flags)
    _vllm_compat.on_from_cli_args(_resolve_flags)
    _vllm_compat.on_create_engine_config(_resolve_offline)
    _vllm_compat.on_create_model(_sparsify_model)
    _vllm_compat.add_worker_methods(worker_rpc.WORKER_METHODS)
    _vllm_compat.around_warm_up(
        lambda executor: _vllm_compat.executor_rpc(executor, "vllm_sparsity_bind_step"),
        lambda executor: _vllm_compat.executor_rpc(executor, "vllm_sparsity_start_counting"))
    _vllm_compat.on_async_llm(_start_metrics)
    _vllm_compat.on_process_inputs(_check_request_p, _salt_request_p, request_p.FIELD)


def _add_flags(parser) -> None:
    group = parser.add_argument_group("Sparsity", "Top-p activation sparsity (vllm-sparsity)")
    for field in cfg.FIELDS:
        group.add_argument(f"--sparsity-{field}", dest=f"sparsity_{field}", default=None,
                           type=str, metavar=_FLAG_METAVAR[field], help=_FLAG_HELP[field])


def _resolve_flags(engine_args, args) -> None:
    flags = {f: getattr(args, f"sparsity_{f}", None) for f in cfg.FIELDS}
    try:
        engine_args.additional_config = cfg.with_resolved_sparsity(
            engine_args.additional_config, flags)
    except cfg.SparsityConfigError as e:
        print(f"vllm serve: error: {e}", file=sys.stderr)
        sys.exit(2)


def _resolve_offline(engine_args) -> None:
    engine_args.additional_config = cfg.with_resolved_sparsity(engine_args.additional_config)


def _sparsify_model(model, vllm_config) -> None:
    sparsity = cfg.SparsityConfig.from_additional_config(vllm_config.additional_config)
    if sparsity is not None:
        from vllm_sparsity.replace import replace_mlp

        replace_mlp(model, sparsity, _vllm_compat.max_num_tokens(vllm_config),
                    cfg.metrics_enabled(vllm_config.additional_config))


def _check_request_p(vllm_config, params) -> None:
    """A request's own p, at admission: a number in [1e-6, 1] (or the server rule's keep-everything
    p, ``config.parse_p``), on a server that runs sparsity. Raises ValueError naming
    ``vllm_xargs.sparsity_p``."""
    sparsity = cfg.SparsityConfig.from_additional_config(vllm_config.additional_config)
    p = request_p.requested_p(getattr(params, "extra_args", None),
                              sparsity.rule if sparsity is not None else "top-p")
    if p is not None and sparsity is None:
        raise ValueError(f"{request_p.FIELD} was given, but this server runs without sparsity "
                         "(start it with --sparsity-p to serve per-request p)")


def _salt_request_p(request) -> None:
    # Checked against the server's rule at admission (``_check_request_p``).
    p = request_p.requested_p(getattr(request.sampling_params, "extra_args", None), None)
    if p is not None:
        request.cache_salt = request_p.salted(request.cache_salt, p)


def _start_metrics(engine_client, vllm_config) -> None:
    # Failing to start the publisher must never stop the server.
    try:
        from vllm_sparsity import metrics

        metrics.start_publisher(engine_client, vllm_config.additional_config,
                                _vllm_compat.served_model_name(vllm_config))
    except Exception:
        logger.exception("vllm-sparsity: metrics publisher not started")
