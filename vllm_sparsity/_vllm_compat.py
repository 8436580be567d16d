"""Every place where the plugin reaches into vLLM internals (tested against vLLM 0.32): plain
adapters, wired by ``plugin.py``. Imports nothing of vllm_sparsity. A vLLM upgrade should only ever
need this file and ``_vllm_moe.py`` (the same for vLLM's fused-MoE layers).

vLLM's ``vllm.general_plugins`` hook runs ``register()`` in every process before the argument
parser is built, but it offers no hook to add CLI flags, to turn flags into config, or to touch the
model after its weights are loaded. The ``on_*`` functions below fill those gaps; each wraps a
single vLLM method, calls the original unchanged and then the plugin's callback:

- ``EngineArgs.add_cli_args`` (``on_add_cli_args``): flags on vLLM's parser;
- ``EngineArgs.from_cli_args`` (``on_from_cli_args``): the parsed flags, once engine args exist;
- ``EngineArgs.create_engine_config`` (``on_create_engine_config``, before the original): also
  offline ``LLM(...)``;
- ``BaseModelLoader.create_model`` (``on_create_model``): once the model is built (weights
  allocated, not yet loaded), so that vLLM's own ``process_weights_after_loading`` pass reaches
  what the callback installs;
- ``WorkerWrapperBase`` (``add_worker_methods``): worker-side RPC methods (vLLM resolves a
  ``collective_rpc`` method name with getattr on the worker wrapper; the endpoint-plugin contract
  asks general plugins to install such methods);
- ``AsyncLLM.__init__`` (``on_async_llm``): once the API server's engine client exists;
- ``Executor.compile_or_warm_up_model`` (``around_warm_up``): before and after every worker's
  warm-up and CUDA-graph capture;
- ``InputProcessor.process_inputs`` (``on_process_inputs``): each request as the API server (or
  offline ``LLM``) admits it, to check a per-request p and salt its prefix cache;
- the V1 model runner's ``_model_forward``, per instance (``before_runner_forward``): an eager
  point before every forward, outside vLLM's CUDA graphs, for the step's per-request p.

Read-only helpers below also reach into vLLM: what the forward context says about a forward
(``step_kind``), the model runner's ``query_start_loc`` buffer, the compile wrapper class, the
tensor-parallel rank, the worker's model.
For tensor parallelism, ``k_shards`` tells a layer whose input is split over K, and
``tp_all_reduce`` sums the rule's histograms over the TP group.
"""

from __future__ import annotations

import functools

# What a forward is (``step_kind``): a step with attention metadata (requests, or a dummy batch
# shaped like them); a dummy run without attention metadata (memory profiling); one micro-batch of
# a split step (dual-batch overlap).
STEP, NO_REQUESTS, MICRO_BATCH = "step", "no_requests", "micro_batch"


def first_install() -> bool:
    """True the first time it is called in a process (vLLM may call ``register()`` repeatedly):
    the mark lives on vLLM's ``EngineArgs`` class, like the wrappers."""
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs, "_vllm_sparsity_installed", False):
        return False
    EngineArgs._vllm_sparsity_installed = True
    return True


def on_add_cli_args(callback) -> None:
    """After ``EngineArgs.add_cli_args(parser)``: ``callback(parser)``."""
    from vllm.engine.arg_utils import EngineArgs

    add_cli_args = EngineArgs.add_cli_args  # staticmethod: a plain function here

    @functools.wraps(add_cli_args)
    def _add_cli_args(parser, *args, **kwargs):
        parser = add_cli_args(parser, *args, **kwargs)
        callback(parser)
        return parser

    EngineArgs.add_cli_args = staticmethod(_add_cli_args)


def on_from_cli_args(callback) -> None:
    """After ``EngineArgs.from_cli_args(args)``: ``callback(engine_args, args)``."""
    from vllm.engine.arg_utils import EngineArgs

    from_cli_args = EngineArgs.from_cli_args.__func__

    @functools.wraps(from_cli_args)
    def _from_cli_args(cls, args):
        engine_args = from_cli_args(cls, args)
        callback(engine_args, args)
        return engine_args

    EngineArgs.from_cli_args = classmethod(_from_cli_args)


def on_create_engine_config(callback) -> None:
    """Before ``EngineArgs.create_engine_config()``: ``callback(engine_args)``."""
    from vllm.engine.arg_utils import EngineArgs

    create_engine_config = EngineArgs.create_engine_config

    @functools.wraps(create_engine_config)
    def _create_engine_config(self, *args, **kwargs):
        callback(self)
        return create_engine_config(self, *args, **kwargs)

    EngineArgs.create_engine_config = _create_engine_config


def on_create_model(callback) -> None:
    """After ``BaseModelLoader.create_model``: ``callback(model, vllm_config)``."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    create_model = BaseModelLoader.create_model

    @functools.wraps(create_model)
    def _create_model(self, vllm_config, model_config, *args, **kwargs):
        model = create_model(self, vllm_config, model_config, *args, **kwargs)
        callback(model, vllm_config)
        return model

    BaseModelLoader.create_model = _create_model


def around_warm_up(before, after) -> None:
    """Around ``Executor.compile_or_warm_up_model`` (engine core process; every executor inherits
    it from ``vllm/v1/executor/abstract.py``): ``before(executor)``, the original, then
    ``after(executor)``. The original runs each worker's warm-up: V1's compile runs, CUDA-graph
    capture and dummy sampler run; V2's ``warmup_kernels`` (``vllm/v1/worker/gpu/warmup.py``),
    which pushes fake requests through ``Worker.execute_model``, then capture. After it the
    engine serves real requests only (the scheduler starts after ``_initialize_kv_caches``)."""
    from vllm.v1.executor.abstract import Executor

    warm_up = Executor.compile_or_warm_up_model

    @functools.wraps(warm_up)
    def _warm_up(self, *args, **kwargs):
        before(self)
        result = warm_up(self, *args, **kwargs)
        after(self)
        return result

    Executor.compile_or_warm_up_model = _warm_up


def on_process_inputs(check, after, parameter: str) -> None:
    """Around ``InputProcessor.process_inputs(request_id, prompt, params, ...)`` (``vllm/v1/engine/
    input_processor.py``; the API server's and offline ``LLM``'s admission of each request):
    ``check(self.vllm_config, params)`` before it (a ``ValueError`` it raises is re-raised as
    vLLM's ``VLLMValidationError`` naming ``parameter``, which the OpenAI server answers with
    HTTP 400 and that ``param``), then ``after(request)`` on the ``EngineCoreRequest`` it built.

    Why not a custom logits processor's ``validate_params`` (vLLM's own per-request validation
    hook, also turned into a 400): it sees only the sampling params, not the request's
    ``cache_salt``, and it makes every step of every worker run a logits processor."""
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    process_inputs = InputProcessor.process_inputs

    @functools.wraps(process_inputs)
    def _process_inputs(self, request_id, prompt, params, *args, **kwargs):
        try:
            check(self.vllm_config, params)
        except VLLMValidationError:
            raise
        except ValueError as e:
            raise VLLMValidationError(str(e), parameter=parameter) from e
        request = process_inputs(self, request_id, prompt, params, *args, **kwargs)
        after(request)
        return request

    InputProcessor.process_inputs = _process_inputs


def before_runner_forward(worker_wrapper, callback) -> bool:
    """Call ``callback(req_ids, sampling_params_of)`` before every forward of this worker's model
    runner: the step's request ids in batch order (the order of ``query_start_loc``) and a lookup
    req_id -> ``SamplingParams`` (None for a pooling request). Wraps the V1 runner's
    ``_model_forward`` (``gpu_model_runner.py``; the CPU runner inherits it), which
    ``execute_model`` calls eagerly for every real step, outside the CUDA graph it replays (dummy
    runs call the model directly: their tokens are no request's).

    Returns False (nothing installed) for a runner without it (Model Runner V2)."""
    runner = worker_wrapper.worker.model_runner
    model_forward = getattr(runner, "_model_forward", None)
    batch = getattr(runner, "input_batch", None)
    requests = getattr(runner, "requests", None)
    if model_forward is None or batch is None or not isinstance(requests, dict):
        return False

    def sampling_params_of(req_id):
        state = requests.get(req_id)
        return getattr(state, "sampling_params", None)

    @functools.wraps(model_forward)
    def _model_forward(*args, **kwargs):
        callback(runner.input_batch.req_ids[:runner.input_batch.num_reqs], sampling_params_of)
        return model_forward(*args, **kwargs)

    runner._model_forward = _model_forward
    return True


def executor_rpc(executor, method: str) -> list:
    """``method`` (a name installed by ``add_worker_methods``) on every worker of ``executor``."""
    return executor.collective_rpc(method)


def add_worker_methods(methods: dict) -> None:
    """Install ``methods`` (name -> function of the worker wrapper) on ``WorkerWrapperBase``."""
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    for name, method in methods.items():
        setattr(WorkerWrapperBase, name, method)


def on_async_llm(callback) -> None:
    """After ``AsyncLLM.__init__`` (the API server's engine client, inside the server's event
    loop): ``callback(engine_client, vllm_config)``."""
    from vllm.v1.engine.async_llm import AsyncLLM

    async_llm_init = AsyncLLM.__init__

    @functools.wraps(async_llm_init)
    def _async_llm_init(self, vllm_config, *args, **kwargs):
        async_llm_init(self, vllm_config, *args, **kwargs)
        callback(self, vllm_config)

    AsyncLLM.__init__ = _async_llm_init


async def collective_rpc(engine_client, method: str, args: tuple = ()) -> list:
    """``method`` on every worker of every engine (data-parallel replica), with **no deadline**.

    Returns one reply per worker, replicas concatenated in engine order. ``AsyncLLM.collective_rpc``
    returns only engine 0's reply under data parallelism (``DPLBAsyncMPClient.call_utility_async``),
    so this asks each engine through ``call_utility_all_async`` where the client has it.

    The executor's ``timeout`` is always None: ``MultiprocExecutor.collective_rpc`` reads replies
    from a first-in, first-out queue without call ids, so a reply that arrives after its deadline
    is taken as the reply of the next call (the next ``execute_model``: the engine dies). The
    caller bounds its own wait instead (``engine_rpc.call``); the engine core client matches
    utility replies by call id, so a late one reaches only its own, abandoned future."""
    core = getattr(engine_client, "engine_core", None)
    if hasattr(core, "call_utility_all_async"):
        replies = await core.call_utility_all_async("collective_rpc", method, None, args, None)
        return [worker for engine in replies for worker in engine]
    # in-process client, or a test double
    return list(await engine_client.collective_rpc(method, timeout=None, args=args))


def worker_model(worker_wrapper):
    """The model a worker runs (unwrapped from vLLM's CUDA graph wrapper)."""
    model = worker_wrapper.worker.model_runner.get_model()
    return model.unwrap() if hasattr(model, "unwrap") else model


def worker_vllm_config(worker_wrapper):
    return worker_wrapper.worker.vllm_config


def load_format(vllm_config) -> str:
    return str(vllm_config.load_config.load_format)


def served_model_name(vllm_config) -> str:
    return vllm_config.model_config.served_model_name


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


def is_unquantized(method) -> bool:
    """Whether a linear layer's ``quant_method`` is vLLM's plain one (a weight [N, K] in the
    model's dtype, read by ``F.linear`` or oneDNN), not a quantized one (fp8, int8, AWQ, ...)."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    return isinstance(method, UnquantizedLinearMethod)


def require_unquantized_input(layer) -> None:
    """Make vLLM hand ``layer`` a plain input tensor, never a pre-quantized ``QuantizedActivation``
    (``LinearBase.requires_unquantized_input``, read on the layer by
    ``vllm/model_executor/layers/fusion/quant_activation.py::get_input_quant_key``; LoRA layers
    set it for the same reason)."""
    layer.requires_unquantized_input = True


def language_model_name(model) -> str | None:
    """Qualified name in ``model`` of its language model: "" for a text model (the model itself);
    for a multimodal one (``SupportsMultiModal``), the module its ``get_language_model()``
    returns (``vllm/model_executor/models/interfaces.py``); None when vLLM cannot name it."""
    from vllm.model_executor.models.interfaces import supports_multimodal

    if not supports_multimodal(model):
        return ""
    try:
        lm = model.get_language_model()
    except NotImplementedError:
        return None
    return next((name for name, module in model.named_modules() if module is lm and name), None)


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


def step_kind() -> str | None:
    """What the forward about to run is, from vLLM's forward context: None outside a model-runner
    step (a model run by hand); ``MICRO_BATCH`` inside a micro-batch of a split step (dual-batch
    overlap: ``vllm.v1.worker.ubatching``, or a list of per-micro-batch metadata);
    ``NO_REQUESTS`` for a dummy run without attention metadata (memory profiling, V1's piecewise
    capture); ``STEP`` otherwise. Which attention backend built the metadata does
    not matter: phases come from the runner's buffer (``runner_query_start_loc``)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available
    from vllm.v1.worker.ubatching import dbo_enabled

    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if dbo_enabled() or isinstance(metadata, list):
        return MICRO_BATCH
    return STEP if metadata else NO_REQUESTS


def runner_query_start_loc(worker_wrapper):
    """The model runner's persistent ``query_start_loc`` device buffer, int32 [max_num_reqs + 1]
    (None if the runner has none the plugin knows). Both runners write each step's cumulative
    query lengths into it before the forward and pad its tail with the step's token count; every
    attention backend's metadata is built from it (FlashInfer's keeps no copy). Model Runner V2
    (``vllm/v1/worker/gpu/model_runner.py``): ``input_buffers.query_start_loc``; V1
    (``gpu_model_runner.py``, and the CPU runner built on it): ``query_start_loc.gpu``."""
    import torch

    runner = worker_wrapper.worker.model_runner
    qsl = getattr(getattr(runner, "input_buffers", None), "query_start_loc", None)  # V2
    if qsl is None:
        qsl = getattr(getattr(runner, "query_start_loc", None), "gpu", None)  # V1
    return qsl if isinstance(qsl, torch.Tensor) else None


def runner_name(worker_wrapper) -> str:
    return type(worker_wrapper.worker.model_runner).__name__


def eager_only_reason(vllm_config) -> str | None:
    """Why vLLM does not run the model eagerly (torch.compile, CUDA graphs), or None when it does
    (``--enforce-eager`` sets both modes to NONE, ``VllmConfig.__post_init__``)."""
    from vllm.config import CompilationMode, CUDAGraphMode

    cc = vllm_config.compilation_config
    if cc.mode != CompilationMode.NONE:
        return f"the model is compiled (compilation mode {cc.mode.name})"
    if cc.cudagraph_mode not in (None, CUDAGraphMode.NONE):
        return f"the model runs in CUDA graphs ({cc.cudagraph_mode.name})"
    return None


def tp_rank() -> int:
    """Tensor-parallel rank of this worker (0 outside a distributed run)."""
    from vllm.distributed import parallel_state

    if parallel_state._TP is None:
        return 0
    return parallel_state.get_tensor_model_parallel_rank()
