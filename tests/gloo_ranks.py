"""Run a function on N CPU processes joined by a torch.distributed gloo group, for the
tensor-parallel tests: a real all-reduce between real processes, without GPUs or vLLM.

``run_ranks(fn, N, out_dir, *args)`` spawns N processes; rank r calls ``fn(r, N, *args)`` inside
the process group and its return value (tensors, lists, dicts with str keys) comes back through
``out_dir``. ``fn`` must be a module-level function of a module on sys.path (spawn imports it by
name, so keep that module's imports light). A failure in any rank fails the call with its
traceback.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, world_size: int, out_dir: Path, *args) -> list:
    """``[fn(0, world_size, *args), ..., fn(world_size - 1, world_size, *args)]``, each computed
    in its own process of one gloo group on 127.0.0.1."""
    port = free_port()
    torch.multiprocessing.spawn(_rank_main, args=(world_size, port, fn, str(out_dir), args),
                                nprocs=world_size, join=True)
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False)
            for r in range(world_size)]


def _rank_main(rank, world_size, port, fn, out_dir, args):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback, whatever the host name is
    torch.set_num_threads(1)  # N processes share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        torch.save(fn(rank, world_size, *args), Path(out_dir) / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
