"""Critical-sparsity eval harness, installed as ``vllm_sparsity.eval``."""
