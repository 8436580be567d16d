"""Triton kernels of vllm-sparsity, installed as ``vllm_sparsity.kernels``.

- ``top_p_threshold``: per-row top-p threshold on device (``top_p_threshold``, ``top_p_sparsify``,
  and ``top_p_partial_mass`` / ``top_p_threshold_sharded`` for K sharded across TP ranks);
- ``sparse_gemv``: y = mask(x) @ Wt reading only the kept rows of a K-major weight;
- ``common``: what the kernels share (the magnitude code in Triton, argument checks, the
  interpreter's launch configuration);
- ``triton_backend``: the ``triton`` entry of ``vllm_sparsity.backends`` (``prepare``,
  ``apply_counted``);
- ``compile_check``: sm_80/sm_90 builds without a GPU, registers and spills;
- ``bench/bench_sparse_mlp.py``: timings against cuBLAS on a CUDA GPU.

Launchers are torch custom ops under ``torch.ops.vllm_sparsity``; importing a module registers its
ops. Nothing here is imported by the package itself: triton loads only when the backend is used.
"""
