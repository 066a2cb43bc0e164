"""FSDPVLLMShardingManager's tensor-parallel data layout on 2 gloo processes (one TP group of 2): ``preprocess_data``
gives both ranks the group's prompts in rank order, even with unequal shard sizes, and ``postprocess_data`` returns
each rank exactly the ``n`` output rows of the prompts it sent. The engine is replaced by a stand-in that only
repeats rows (``mock``): the layout logic is what is tested; the real engine in TP runs in test_vllm_grpo_e2e."""
from __future__ import annotations

import os
import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from verl.protocol import DataProto

WORLD = 2
ROWS = {0: 3, 1: 1}  # unequal data-parallel shards
N = 2


class _StandInEngine:
    """Only what the manager calls outside ``__enter__``."""

    def sleep(self, level: int = 1) -> None:
        pass


def _shard(rank: int) -> DataProto:
    rows = ROWS[rank]
    ids = torch.arange(rows * 4).view(rows, 4) + 100 * rank
    return DataProto.from_dict({
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids)
    },
                               non_tensors={"uid": np.array([f"r{rank}p{i}" for i in range(rows)], dtype=object)})


def _run(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        from verl.workers.sharding_manager.fsdp_vllm import FSDPVLLMShardingManager

        mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("dp", "infer_tp"))
        manager = FSDPVLLMShardingManager(torch.nn.Linear(2, 2), _StandInEngine(), device_mesh=mesh)
        gathered = manager.preprocess_data(_shard(rank))
        output = gathered.repeat(repeat_times=N, interleave=True)  # what an engine with n=2 returns
        mine = manager.postprocess_data(output)
        results[rank] = (list(gathered.non_tensor_batch["uid"]), list(mine.non_tensor_batch["uid"]),
                         mine.batch["input_ids"].tolist(), manager.tp_rank, manager.tp_size)
    finally:
        dist.destroy_process_group()


def test_tp_group_gathers_prompts_and_returns_each_rank_its_rows_mock_engine():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_run, args=(port, results), nprocs=WORLD, join=True)
        results = dict(results)
    group_uids = ["r0p0", "r0p1", "r0p2", "r1p0"]
    for rank in range(WORLD):
        gathered, mine, ids, tp_rank, tp_size = results[rank]
        assert (tp_rank, tp_size) == (rank, WORLD)
        assert gathered == group_uids  # both ranks feed the engine the same prompts, in rank order
        expected = [u for u in _shard(rank).non_tensor_batch["uid"] for _ in range(N)]
        assert mine == expected  # n rows per prompt this rank sent, nothing else
        assert ids == _shard(rank).batch["input_ids"].repeat_interleave(N, 0).tolist()
