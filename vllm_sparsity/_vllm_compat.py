"""Every place where the plugin reaches into vLLM internals (tested against vLLM 0.32).

vLLM's ``vllm.general_plugins`` hook runs ``register()`` in every process before the argument
parser is built, but it offers no hook to add CLI flags, to turn flags into config, or to touch the
model after its weights are loaded. The wrappers below fill those gaps; each wraps a single vLLM
method and calls the original unchanged. A vLLM upgrade should only ever need this file.

- ``EngineArgs.add_cli_args``: adds the ``--sparsity-*`` flags (so ``vllm serve --help`` lists them).
- ``EngineArgs.from_cli_args``: folds the flags into ``additional_config["sparsity"]``; a bad value
  ends the CLI with one line naming the flag (exit status 2, like argparse).
- ``EngineArgs.create_engine_config``: resolves flags > additional_config > environment into the
  canonical ``additional_config["sparsity"]`` (also for offline ``LLM(...)``), which vLLM ships to
  every worker and hashes into its compile cache.
- ``BaseModelLoader.create_model``: once the model is built (weights allocated, not yet loaded),
  swaps the gated MLPs' linear methods, so that vLLM's own ``process_weights_after_loading`` pass
  reaches the sparse methods too (a kernel backend prepares its weight layout there).
- ``WorkerWrapperBase``: gains the worker-side RPC methods of ``control.py`` (the endpoint-plugin
  contract asks general plugins to install such methods).
- ``AsyncLLM.__init__``: once the API server's engine client exists, starts the metrics publisher
  (``metrics.start_publisher``), so that the ``vllm_sparsity_*`` series reach ``/metrics`` whenever
  sparsity is on, without opting in to the control route.

Read-only helpers below also reach into vLLM for the metrics: the forward context's attention
metadata (``query_start_loc``), the compile wrapper class, the tensor-parallel rank. For tensor
parallelism, ``k_shards`` tells a layer whose input is split over K, and ``tp_all_reduce`` sums the
rule's histograms over the TP group.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys

from vllm_sparsity import config as cfg

logger = logging.getLogger("vllm.vllm_sparsity")  # under vLLM's handler and format

_FLAG_HELP = {
    "p": "Top-p activation sparsity: share of each token's L1 activation mass kept at the inputs "
    "of every gated MLP's linear layers, a number in (0, 1]. Unset: sparsity off.",
    "target": "Which inputs the top-p rule sparsifies: input (gate_up_proj input), intermediate "
    "(down_proj input) or all_inputs (both). Default: all_inputs.",
    "backend": "Sparse compute backend: auto (triton on CUDA, torch elsewhere), triton or torch. "
    "Default: auto.",
}
_FLAG_METAVAR = {"p": "P", "target": "{" + ",".join(cfg.TARGETS) + "}",
                 "backend": "{" + ",".join(cfg.BACKENDS) + "}"}


def install() -> None:
    """Wrap the vLLM methods once per process (vLLM may call ``register()`` repeatedly)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    if getattr(EngineArgs, "_vllm_sparsity_installed", False):
        return
    EngineArgs._vllm_sparsity_installed = True

    add_cli_args = EngineArgs.add_cli_args  # staticmethod: a plain function here

    @functools.wraps(add_cli_args)
    def _add_cli_args(parser, *args, **kwargs):
        parser = add_cli_args(parser, *args, **kwargs)
        group = parser.add_argument_group("Sparsity", "Top-p activation sparsity (vllm-sparsity)")
        for field in cfg.FIELDS:
            group.add_argument(f"--sparsity-{field}", dest=f"sparsity_{field}", default=None,
                               type=str, metavar=_FLAG_METAVAR[field], help=_FLAG_HELP[field])
        return parser

    EngineArgs.add_cli_args = staticmethod(_add_cli_args)

    from_cli_args = EngineArgs.from_cli_args.__func__

    @functools.wraps(from_cli_args)
    def _from_cli_args(cls, args: argparse.Namespace):
        engine_args = from_cli_args(cls, args)
        flags = {f: getattr(args, f"sparsity_{f}", None) for f in cfg.FIELDS}
        try:
            engine_args.additional_config = with_resolved_sparsity(
                engine_args.additional_config, flags
            )
        except cfg.SparsityConfigError as e:
            print(f"vllm serve: error: {e}", file=sys.stderr)
            sys.exit(2)
        return engine_args

    EngineArgs.from_cli_args = classmethod(_from_cli_args)

    create_engine_config = EngineArgs.create_engine_config

    @functools.wraps(create_engine_config)
    def _create_engine_config(self, *args, **kwargs):
        self.additional_config = with_resolved_sparsity(self.additional_config)
        return create_engine_config(self, *args, **kwargs)

    EngineArgs.create_engine_config = _create_engine_config

    create_model = BaseModelLoader.create_model

    @functools.wraps(create_model)
    def _create_model(self, vllm_config, model_config, *args, **kwargs):
        model = create_model(self, vllm_config, model_config, *args, **kwargs)
        sparsity = cfg.SparsityConfig.from_additional_config(vllm_config.additional_config)
        if sparsity is not None:
            from vllm_sparsity import metrics
            from vllm_sparsity.replace import replace_mlp

            replace_mlp(model, sparsity, max_num_tokens(vllm_config),
                        metrics.enabled(vllm_config.additional_config))
        return model

    BaseModelLoader.create_model = _create_model

    # Worker-side RPC methods for the endpoint plugin (see control.py). vLLM resolves a
    # collective_rpc method name with getattr on the worker wrapper.
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    from vllm_sparsity.control import WORKER_METHODS

    for name, method in WORKER_METHODS.items():
        setattr(WorkerWrapperBase, name, method)

    # The API server's engine client: start the metrics publisher once it exists (inside the
    # server's event loop). Failing to start it must never stop the server.
    from vllm.v1.engine.async_llm import AsyncLLM

    async_llm_init = AsyncLLM.__init__

    @functools.wraps(async_llm_init)
    def _async_llm_init(self, vllm_config, *args, **kwargs):
        async_llm_init(self, vllm_config, *args, **kwargs)
        try:
            from vllm_sparsity import metrics

            metrics.start_publisher(self, vllm_config)
        except Exception:
            logger.exception("vllm-sparsity: metrics publisher not started")

    AsyncLLM.__init__ = _async_llm_init


def with_resolved_sparsity(additional_config, flags=None) -> dict:
    """``additional_config`` with its ``"sparsity"`` section replaced by the resolved config
    (absent when sparsity is off). Raises ``SparsityConfigError``."""
    from vllm_sparsity import metrics

    additional_config = dict(additional_config or {})
    resolved = cfg.resolve(flags, additional_config, os.environ)
    additional_config.pop(cfg.ADDITIONAL_CONFIG_KEY, None)
    if resolved is not None:
        additional_config[cfg.ADDITIONAL_CONFIG_KEY] = resolved.to_dict()
        # Whether workers instrument the graph: given, or from VLLM_SPARSITY_METRICS_INTERVAL_S
        # (0 = off). Stored here so that it reaches every worker and vLLM's compile-cache hash.
        on = additional_config.get(metrics.ADDITIONAL_CONFIG_KEY)
        if not isinstance(on, bool):
            if on is not None:
                raise cfg.SparsityConfigError(
                    f"--additional-config: {metrics.ADDITIONAL_CONFIG_KEY} must be true or false, "
                    f"got {on!r}")
            on = metrics.interval_s(os.environ) > 0
        additional_config[metrics.ADDITIONAL_CONFIG_KEY] = on
    else:
        additional_config.pop(metrics.ADDITIONAL_CONFIG_KEY, None)
    return additional_config


def tp_all_reduce(t) -> None:
    """Sum ``t`` over the tensor-parallel group, in place: the ``all_reduce`` of the top-p rule for
    a ``down_proj`` input split over K (float64 histograms; called inside vLLM's traced forward).

    On CUDA through vLLM's ``GroupCoordinator.all_reduce`` (the path of RowParallelLinear's own
    reduce: a ``torch.ops.vllm.all_reduce`` custom op, compiled and CUDA-graph captured); its
    custom, quick, FlashInfer and torch symmetric-memory all-reduces refuse float64 by dtype,
    which leaves NCCL through PyNccl (ncclFloat64). On CPU vLLM's shared-memory all-reduce has no
    float64 kernel ("shm_allreduce_sum" not implemented for 'Double'), so torch.distributed sums
    t on the group's gloo device group instead.
    """
    import torch
    from vllm.distributed import parallel_state

    group = parallel_state.get_tp_group()
    if t.device.type == "cpu":
        torch.distributed.all_reduce(t, group=group.device_group)
    else:
        t.copy_(group.all_reduce(t))


def k_shards(layer) -> int:
    """Over how many tensor-parallel ranks the input rows of ``layer`` are split along K: a
    RowParallelLinear's ``tp_size`` (1 with ``disable_tp``), 1 for any other layer."""
    from vllm.model_executor.layers.linear import RowParallelLinear

    return layer.tp_size if isinstance(layer, RowParallelLinear) else 1


def gated_mlp_types():
    """(MergedColumnParallelLinear, RowParallelLinear, act-and-mul classes) of this vLLM."""
    from vllm.model_executor.layers import activation
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear

    # Every "<act>AndMul" op (SiluAndMul, GeluAndMul, FatreluAndMul, ...) plus MulAndSilu: each
    # computes act(gate) * up from the merged gate_up_proj output.
    act_and_mul = tuple(
        obj for name, obj in vars(activation).items()
        if isinstance(obj, type) and (name.endswith("AndMul") or name == "MulAndSilu")
    )
    return MergedColumnParallelLinear, RowParallelLinear, act_and_mul


def max_num_tokens(vllm_config) -> int:
    """Most tokens one forward can hold: vLLM sizes its input buffers by max_num_batched_tokens
    (``GPUModelRunner.max_num_tokens``); CUDA graph capture sizes never exceed it."""
    return vllm_config.scheduler_config.max_num_batched_tokens


def is_compiled(model) -> bool:
    """Whether ``model`` itself carries vLLM's ``@support_torch_compile`` (forward is traced)."""
    from vllm.compilation.wrapper import TorchCompileWithNoGuardsWrapper

    return isinstance(model, TorchCompileWithNoGuardsWrapper)


def forward_num_tokens(args: tuple, kwargs: dict) -> int | None:
    """Tokens in a call of a vLLM model's top-level ``forward(input_ids, positions, ...)``
    (positions is [T], or [3, T] with M-RoPE), None if it cannot tell."""
    positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
    return positions.shape[-1] if positions is not None else None


def in_forward_context() -> bool:
    """Whether a vLLM model runner step (or dummy run) is under way."""
    from vllm.forward_context import is_forward_context_available

    return is_forward_context_available()


def query_start_loc(num_tokens: int, device):
    """The step's ``query_start_loc`` [R + 1] from the forward context's attention metadata (the
    same tensor for every layer; on CUDA a slice of the runner's persistent buffer), or None in a
    dummy run without attention metadata. With micro-batching (a list of metadata, one per
    micro-batch) the step counts as one pseudo-request: no per-token split."""
    import torch
    from vllm.forward_context import get_forward_context

    metadata = get_forward_context().attn_metadata
    if isinstance(metadata, list):
        return torch.tensor([0, num_tokens], dtype=torch.int32, device=device)
    for layer_metadata in (metadata or {}).values():
        qsl = getattr(layer_metadata, "query_start_loc", None)
        if qsl is not None:
            return qsl
    return None


def tp_rank() -> int:
    """Tensor-parallel rank of this worker (0 outside a distributed run)."""
    from vllm.distributed import parallel_state

    if parallel_state._TP is None:
        return 0
    return parallel_state.get_tensor_model_parallel_rank()
