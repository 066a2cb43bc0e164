"""Tests of the Ray worker groups on a real local Ray cluster (one per module): every dispatch mode moves the right
rows to the right rank, padding, the n-d mesh mode, rank-zero execution, gloo from the given environment, worker
errors with rank and traceback, chained non-blocking calls, and several roles fused in one process.

Actor start-up dominates the time on small machines, so the module keeps two groups alive: 4 plain workers, and 3
processes hosting three fused roles (one of which serves as the 3-worker group)."""
import datetime
import os
import subprocess
import sys

import pytest
import ray
import torch

from verl.protocol import DataProto, DataProtoFuture
from verl.single_controller.base import Worker, WorkerError
from verl.single_controller.base.decorator import (
    Dispatch,
    Execute,
    make_nd_compute_dataproto_dispatch_fn,
    register,
    register_dispatch_mode,
)
from verl.single_controller.ray import (
    RayClassWithInitArgs,
    RayResourcePool,
    RayWorkerGroup,
    create_colocated_worker_cls,
    init_ray,
)
from verl.utils.device import get_nccl_backend

# Worker classes defined here travel to the workers by value (this test module is not importable there).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _spread(worker_group, *args, **kwargs):
    """Rank ``i`` gets ``base + i``."""
    base = kwargs.pop("base", args[0] if args else 0)
    return ([base + i for i in range(worker_group.world_size)],), {}


def _sum(worker_group, outputs):
    return sum(outputs)


SPREAD_SUM = (Dispatch.TEST_RAY_SPREAD_SUM if "TEST_RAY_SPREAD_SUM" in Dispatch.names() else register_dispatch_mode(
    "TEST_RAY_SPREAD_SUM", _spread, _sum))


def tag_rows(data: DataProto, rank: int) -> DataProto:
    """The rows with the rank that computed them."""
    return DataProto.from_dict(tensors={
        "x": data.batch["x"].clone(),
        "rank": torch.full((len(data),), rank)
    },
                               non_tensors={"name": data.non_tensor_batch["name"]})


def make_data(n: int, **meta) -> DataProto:
    return DataProto.from_dict(tensors={"x": torch.arange(n)},
                               non_tensors={"name": [f"r{i}" for i in range(n)]},
                               meta_info=meta)


class RowWorker(Worker):
    """Test worker: every method reports which rank did what."""

    def __init__(self, tp_size: int = 1):
        super().__init__()
        self.counter = 0
        self.seen = None
        self._register_dispatch_collect_info("mesh", dp_rank=self.rank // tp_size, is_collect=self.rank % tp_size == 0)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def env_info(self):
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "env": {
                k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
            },
            "master": self.get_master_addr_port(),
            "pid": os.getpid(),
        }

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def echo(self, value, scale=1):
        return self.rank, value * scale

    @register()
    def echo_default(self, value):
        return self.rank, value

    @register(dispatch_mode=Dispatch.DP_COMPUTE)
    def take(self, item):
        return self.rank, item

    @register(dispatch_mode=Dispatch.DP_COMPUTE_PROTO)
    def tag(self, data):
        self.seen = data.batch["x"].tolist()
        return tag_rows(data, self.rank)

    @register(dispatch_mode=Dispatch.DP_COMPUTE_PROTO)
    def tag_twice(self, data):
        return tag_rows(data, self.rank).repeat(2, interleave=True)

    @register(dispatch_mode=Dispatch.DP_COMPUTE_METRIC)
    def metric(self, data):
        return {"rank": self.rank, "rows": len(data)}

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn("mesh"))
    def nd_tag(self, data):
        self.seen = data.batch["x"].tolist()
        return tag_rows(data, self.rank)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def get_seen(self):
        return self.seen

    @register(dispatch_mode=Dispatch.ONE_TO_ALL, execute_mode=Execute.RANK_ZERO)
    def bump(self):
        self.counter += 1
        return self.rank

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def get_counter(self):
        return self.counter

    @register(dispatch_mode=SPREAD_SUM)
    def custom(self, value):
        return value * 10

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def all_reduce_rank(self):
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend=get_nccl_backend(), timeout=datetime.timedelta(seconds=60))
        value = torch.tensor([float(self.rank + 1)])
        dist.all_reduce(value)
        return value.item(), dist.get_rank(), dist.get_world_size()

    @register(dispatch_mode=Dispatch.DP_COMPUTE_PROTO)
    def fail_on_rank(self, data):
        if self.rank == data.meta_info["bad_rank"]:
            raise ValueError(f"row check failed on purpose for rows {data.batch['x'].tolist()}")
        return tag_rows(data, self.rank)

    @register(dispatch_mode=Dispatch.DP_COMPUTE_PROTO, blocking=False)
    def produce(self, data):
        out = tag_rows(data, self.rank)
        out.batch["x"] = out.batch["x"] * 100
        return out

    @register(dispatch_mode=Dispatch.DP_COMPUTE_PROTO)
    def consume(self, data):
        out = tag_rows(data, self.rank)
        out.batch["x"] = out.batch["x"] + 1
        return out


class RoleA(Worker):

    def __init__(self, offset: int):
        super().__init__()
        self.offset = offset
        self.value = None

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def set_value(self, value):
        self.value = value + self.offset + self.rank
        return os.getpid()


class RoleB(Worker):

    def __init__(self):
        super().__init__()
        self._register_dispatch_collect_info("b_mesh", dp_rank=self.rank, is_collect=True)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def read_peer(self):
        return os.getpid(), self.fused_worker_dict["a"].value

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn("b_mesh"))
    def tag(self, data):
        return tag_rows(data, self.rank)


# ----------------------------------------------------------------------------------------------------------------------
# fixtures: one Ray cluster and a few small groups for the whole module
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    init_ray(num_cpus=12)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def group4(ray_cluster):
    """4 workers seen as a dp=2 x tp=2 mesh by ``nd_tag``."""
    pool = RayResourcePool([4], use_gpu=False)
    return RayWorkerGroup(pool, RayClassWithInitArgs(RowWorker, tp_size=2))


@pytest.fixture(scope="module")
def fused3(ray_cluster):
    """3 processes, each hosting roles a, b and rows (RowWorker)."""
    fused_cls = create_colocated_worker_cls({
        "a": RayClassWithInitArgs(RoleA, offset=100),
        "b": RayClassWithInitArgs(RoleB),
        "rows": RayClassWithInitArgs(RowWorker),
    })
    return RayWorkerGroup(RayResourcePool([3], use_gpu=False), fused_cls)


@pytest.fixture(scope="module")
def group3(fused3):
    """A 3-worker RowWorker group: the `rows` role of the fused group (spawned groups share its actors)."""
    return fused3.spawn(prefix_set={"rows"})["rows"]


# ----------------------------------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------------------------------


def test_workers_get_their_rank_environment(group4):
    infos = group4.env_info()
    assert [i["rank"] for i in infos] == [0, 1, 2, 3]
    assert [i["env"] for i in infos] == [{
        "RANK": str(r),
        "WORLD_SIZE": "4",
        "LOCAL_RANK": str(r),
        "LOCAL_WORLD_SIZE": "4"
    } for r in range(4)]
    masters = {i["master"] for i in infos}
    assert len(masters) == 1 and next(iter(masters))[0] == "127.0.0.1"
    assert (group4.master_address, group4.master_port) == next(iter(masters))
    assert len({i["pid"] for i in infos}) == 4 and group4.world_size == 4


def test_one_to_all_all_to_all_dp_compute_and_custom_modes(group4):
    assert group4.echo(3, scale=2) == [(r, 6) for r in range(4)]
    assert group4.echo_default("same") == [(r, "same") for r in range(4)]
    assert group4.take(["a", "b", "c", "d"]) == [(0, "a"), (1, "b"), (2, "c"), (3, "d")]
    assert group4.custom(base=1) == 10 * (1 + 2 + 3 + 4)  # a mode registered at import, unknown to workers before


def test_dp_compute_proto_sends_consecutive_rows_and_joins_them_in_order(group4):
    out = group4.tag(make_data(8, temperature=0.5))
    assert out.batch["x"].tolist() == list(range(8))
    assert out.batch["rank"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert out.non_tensor_batch["name"].tolist() == [f"r{i}" for i in range(8)]
    assert group4.get_seen() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert group4.metric(make_data(8)) == [{"rank": r, "rows": 2} for r in range(4)]


def test_dp_compute_proto_with_func_runs_a_driver_function_on_each_shard(group4):

    def double(worker, data):
        out = tag_rows(data, worker.rank)
        out.batch["x"] = out.batch["x"] * 2
        return out

    out = group4.execute_with_func_generator(double, make_data(4))
    assert out.batch["x"].tolist() == [0, 2, 4, 6] and out.batch["rank"].tolist() == [0, 1, 2, 3]


def test_three_workers_pad_a_batch_of_ten_and_unpad_the_result(group3):
    out = group3.tag(make_data(10))
    assert out.batch["x"].tolist() == list(range(10))
    assert out.batch["rank"].tolist() == [0] * 4 + [1] * 4 + [2] * 2
    assert group3.get_seen() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]  # rank 2 computed 2 padding rows
    doubled = group3.tag_twice(make_data(10))  # 2 output rows per input row: the padding's 4 rows are dropped
    assert doubled.batch["x"].tolist() == [i for i in range(10) for _ in range(2)]


def test_nd_mesh_sends_dp_shards_to_tp_peers_and_collects_tp_rank_zero(group4):
    out = group4.nd_tag(make_data(6))
    assert out.batch["x"].tolist() == list(range(6))
    assert out.batch["rank"].tolist() == [0, 0, 0, 2, 2, 2]  # only tp rank 0 of each dp group is collected
    assert group4.get_seen() == [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]]
    odd = group4.nd_tag(make_data(5))  # padded to 6 for 2 dp groups, unpadded to 5
    assert odd.batch["x"].tolist() == list(range(5))


def test_execute_rank_zero_runs_on_rank_zero_only(group3):
    before = group3.get_counter()
    assert group3.bump() == 0
    assert [c - b for c, b in zip(group3.get_counter(), before)] == [1, 0, 0]
    assert group3.execute_rank_zero_sync("get_counter") == before[0] + 1
    refs = group3.execute_all("get_counter")
    assert ray.get(refs) == group3.execute_all_sync("get_counter")


def test_workers_init_gloo_from_the_given_environment_and_all_reduce(group4):
    assert group4.all_reduce_rank() == [(10.0, r, 4) for r in range(4)]


def test_worker_exception_reaches_the_driver_with_rank_and_traceback(group4):
    with pytest.raises(WorkerError) as info:
        group4.fail_on_rank(make_data(8, bad_rank=2))
    err = info.value
    assert err.rank == 2 and err.method == "fail_on_rank"
    assert isinstance(err, ValueError)  # `except ValueError` still works on the driver
    text = str(err)
    assert "rank 2" in text and "fail_on_rank" in text
    assert "row check failed on purpose for rows [4, 5]" in text
    assert "test_ray_worker_group.py" in text and "raise ValueError" in text  # the worker's traceback
    assert group4.fail_on_rank(make_data(4, bad_rank=-1)).batch["rank"].tolist() == [0, 1, 2, 3]  # still usable


def test_non_blocking_future_chains_into_another_call_without_fetching(group3, group4):
    future = group4.produce(make_data(8))
    assert isinstance(future, DataProtoFuture)
    out = group4.consume(future)
    assert out.batch["x"].tolist() == [i * 100 + 1 for i in range(8)]
    # 10 rows over 3 workers are padded on the driver; the future drops that padding when it is resolved, and the
    # 4-worker consumer pads the 10 rows again on its workers, dropping the padding before returning.
    future = group3.produce(make_data(10))
    out = group4.consume(future)
    assert out.batch["x"].tolist() == [i * 100 + 1 for i in range(10)]
    assert out.batch["rank"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]


def test_fused_roles_share_one_process_and_spawn_per_role_groups(fused3):
    assert hasattr(fused3, "a_set_value") and hasattr(fused3, "b_read_peer") and hasattr(fused3, "rows_tag")
    groups = fused3.spawn(prefix_set={"a", "b"})
    pids = groups["a"].set_value(5)
    assert len(set(pids)) == 3
    # role B reads what role A set in the same process
    assert groups["b"].read_peer() == [(pids[0], 105), (pids[1], 106), (pids[2], 107)]
    assert fused3.a_set_value(7) == pids  # the fused group's prefixed methods reach the same actors
    assert fused3.b_read_peer() == [(pids[0], 107), (pids[1], 108), (pids[2], 109)]
    assert groups["b"].tag(make_data(4)).batch["rank"].tolist() == [0, 0, 1, 1]  # role B's n-d mesh via spawn
    assert fused3.b_tag(make_data(3)).batch["x"].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="role 'c' is not part"):
        fused3.spawn({"c"})


class BrokenInit(Worker):

    def __init__(self):
        super().__init__()
        raise RuntimeError("cannot load the model on purpose")


def test_constructor_errors_and_oversized_pools_are_reported(ray_cluster):
    with pytest.raises(RuntimeError, match="needs 64 CPU"):
        RayResourcePool([64], use_gpu=False).get_placement_groups()
    pool = RayResourcePool([1], use_gpu=True)  # no GPU in this cluster: falls back to CPU slots
    expected = r"(?s)rank 0 .*could not start: BrokenInit.__init__ raised.*cannot load the model on purpose"
    with pytest.raises(WorkerError, match=expected):
        RayWorkerGroup(pool, RayClassWithInitArgs(BrokenInit))
    assert pool.use_gpu is False
    pool.shutdown()


def test_init_ray_joins_the_running_cluster_named_by_ray_address(ray_cluster):
    code = ("import ray\nfrom verl.single_controller.ray import init_ray\ninit_ray(num_cpus=3)\n"
            "print('GCS', ray.get_runtime_context().gcs_address)\nray.shutdown()\n")
    address = ray.get_runtime_context().gcs_address
    env = dict(os.environ, RAY_ADDRESS=address)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"GCS {address}" in proc.stdout  # joined this module's cluster instead of starting a new one
