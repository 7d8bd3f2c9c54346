"""Under torch.distributed (gloo, two CPU processes) every rank keeps the same codebook."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vqdiff.quantize import VectorQuantizer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # different data and different local RNG on every rank
        q = VectorQuantizer(32, 4, ema=True, kmeans_init=True, restart_dead=True, dead_threshold=2.0).train()
        for _ in range(5):
            q(torch.randn(4, 4, 4, 4) + rank)
        torch.save({k: v.clone() for k, v in q.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_codebook_identical_across_ranks(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt")
    b = torch.load(tmp_path / "rank1.pt")
    for key in ("codebook", "cluster_size", "code_sum", "usage"):
        assert torch.allclose(a[key], b[key]), key
    # and the codebook really was trained on both ranks' data (rank 1's inputs are shifted by +1)
    single = VectorQuantizer(32, 4, ema=True)
    assert not torch.allclose(a["codebook"], single.codebook)
