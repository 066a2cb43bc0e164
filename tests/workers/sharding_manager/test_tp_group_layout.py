"""The tensor-parallel data layout the vLLM and SGLang hybrid engines share (``TPGroupShardingManager``), on 2 gloo
processes (one TP group of 2): ``preprocess_data`` gives both ranks the group's prompts in rank order, even with
unequal shard sizes, and ``postprocess_data`` returns each rank exactly the ``n`` output rows of the prompts it sent.
No engine runs: the vLLM manager gets a stand-in that only sleeps, the SGLang manager none (``mock``); the output is
the gathered prompts repeated as an engine with ``n=2`` returns them. The real engines in TP run in their e2e tests."""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from verl.protocol import DataProto

WORLD = 2
ROWS = {0: 3, 1: 1}  # unequal data-parallel shards
N = 2


class _StandInEngine:
    """Only what the vLLM manager calls outside ``__enter__``."""

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


def _manager(engine: str, mesh):
    if engine == "vllm":
        from verl.workers.sharding_manager.fsdp_vllm import FSDPVLLMShardingManager

        return FSDPVLLMShardingManager(torch.nn.Linear(2, 2), _StandInEngine(), device_mesh=mesh)
    from verl.workers.sharding_manager.fsdp_sglang import FSDPSGLangShardingManager

    return FSDPSGLangShardingManager(torch.nn.Linear(2, 2), None, device_mesh=mesh)


def _run(rank: int, port: int, engine: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from verl.workers.sharding_manager.base import build_infer_tp_mesh

        mesh, global_rank = build_infer_tp_mesh(WORLD)
        assert global_rank == rank and mesh.mesh_dim_names == ("dp", "infer_tp")
        manager = _manager(engine, mesh)
        gathered = manager.preprocess_data(_shard(rank))
        output = gathered.repeat(repeat_times=N, interleave=True)  # what an engine with n=2 returns
        mine = manager.postprocess_data(output)
        results[rank] = (list(gathered.non_tensor_batch["uid"]), list(mine.non_tensor_batch["uid"]),
                         mine.batch["input_ids"].tolist(), manager.tp_rank, manager.tp_size, manager.tp_src)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_tp_group_gathers_prompts_and_returns_each_rank_its_rows_mock_engine(engine):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_run, args=(port, engine, results), nprocs=WORLD, join=True)
        results = dict(results)
    group_uids = ["r0p0", "r0p1", "r0p2", "r1p0"]
    for rank in range(WORLD):
        gathered, mine, ids, tp_rank, tp_size, tp_src = results[rank]
        assert (tp_rank, tp_size, tp_src) == (rank, WORLD, 0)
        assert gathered == group_uids  # both ranks feed the engine the same prompts, in rank order
        expected = [u for u in _shard(rank).non_tensor_batch["uid"] for _ in range(N)]
        assert mine == expected  # n rows per prompt this rank sent, nothing else
        assert ids == _shard(rank).batch["input_ids"].repeat_interleave(N, 0).tolist()


def test_without_tp_data_passes_through_and_postprocess_needs_preprocess():
    from verl.utils.config import ConfigError
    from verl.workers.sharding_manager.base import TPGroupShardingManager, build_infer_tp_mesh

    assert build_infer_tp_mesh(1) == (None, 0)  # one process, no torch.distributed
    with pytest.raises(ConfigError, match=r"rollout\.tensor_model_parallel_size=3 must divide .* \(1\)"):
        build_infer_tp_mesh(3)
    manager = TPGroupShardingManager()
    manager._init_tp_group(None)
    data = _shard(0)
    assert (manager.tp_size, manager.tp_rank, manager.tp_group) == (1, 0, None)
    assert manager.preprocess_data(data) is data and manager.postprocess_data(data) is data
    manager.tp_size = 2  # a TP group whose prompt counts were never gathered
    with pytest.raises(RuntimeError, match="without preprocess_data"):
        manager.postprocess_data(data)
