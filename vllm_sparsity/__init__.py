"""vllm-sparsity: training-free top-p activation sparsity for vLLM's gated MLPs."""

from vllm_sparsity.config import SparsityConfig, SparsityConfigError

__all__ = ["SparsityConfig", "SparsityConfigError"]
__version__ = "0.1.0"
