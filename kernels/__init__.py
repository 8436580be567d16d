"""Kernels of vllm-sparsity, installed as ``vllm_sparsity.kernels``.

- ``_registry``: the one way ops are registered under ``torch.ops.vllm_sparsity`` (custom ops with
  fake impls, plain dispatcher kernels, fakes of the C++ ops);
- ``top_p_threshold``: per-row top-p threshold on device in Triton (``top_p_threshold``,
  ``top_p_sparsify``, and ``top_p_partial_mass`` / ``top_p_threshold_sharded`` for K sharded
  across TP ranks);
- ``sparse_gemv``: y = mask(x) @ Wt in Triton, reading only the kept rows of a K-major weight;
- ``common``: what the Triton kernels share (the magnitude code, argument checks, the
  interpreter's launch configuration);
- ``triton_backend``: the ``triton`` entry of ``vllm_sparsity.backends`` (CUDA);
- ``cpu_backend``: the ``cpu`` entry, the C++ kernels of ``cpu/`` built at first use (x86-64);
- ``compile_check`` and ``version_matrix``: sm_80/sm_90 builds without a GPU (registers, spills)
  across the Triton versions checked;
- ``bench/``: benchmarks and profiles (scripts, not installed), ``bench/results/`` their outputs.

Launchers are torch ops under ``torch.ops.vllm_sparsity``; importing a module registers its ops.
The runtime imports ``_registry`` at start-up (``vllm_sparsity.clock``, ``sparse_moe``) and a
backend module only when ``backends.load`` picks it, so triton loads only where the triton
backend serves, and the C++ build runs only where the cpu backend is tried.
"""
