"""Triton kernels of vllm-sparsity, installed as ``vllm_sparsity.kernels``."""
