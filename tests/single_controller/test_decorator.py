"""Tests of the backend-independent single controller (no Ray): dispatch modes, ``register``, ``Worker``,
``ResourcePool`` and ``WorkerGroup`` driven through a small in-process backend (every rank is an object in this
process), so the dispatch -> execute -> collect path is checked end to end without starting processes."""
import asyncio
import contextlib
import os
import pickle

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from verl.protocol import DataProto
from verl.single_controller.base import ClassWithInitArgs, ResourcePool, Worker, WorkerGroup
from verl.single_controller.base.decorator import (
    MAGIC_ATTR,
    PADDING_SIZE_KEY,
    Dispatch,
    Execute,
    _PadAndSelectShard,
    collect_dp_compute_data_proto,
    dispatch_dp_compute,
    dispatch_dp_compute_data_proto,
    dispatch_one_to_all,
    get_predefined_dispatch_fn,
    get_predefined_execute_fn,
    make_nd_compute_dataproto_dispatch_fn,
    register,
    register_dispatch_mode,
    remove_padding_from_output,
    update_dispatch_mode,
)
from verl.single_controller.ray.utils import local_ray_init_kwargs

# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------

_RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def rank_env(rank: int, world_size: int):
    """The environment a worker group gives rank ``rank`` (restored afterwards)."""
    saved = {k: os.environ.get(k) for k in _RANK_ENV}
    os.environ.update({
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29999",
    })
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class InProcessWorkerGroup(WorkerGroup):
    """A real (not mocked) backend of the base WorkerGroup: every rank is an instance in this process."""

    def __init__(self, cls_with_args: ClassWithInitArgs, world_size: int):
        super().__init__(ResourcePool([world_size]))
        for rank in range(world_size):
            with rank_env(rank, world_size):
                self._workers.append(cls_with_args())
            self._worker_names.append(f"inproc_{rank}")
        self.calls = []
        self._bind_worker_method(cls_with_args.cls)

    def _call_workers(self, method_name, ranks, args_per_rank, kwargs_per_rank):
        self.calls.append((method_name, list(ranks)))
        return [
            getattr(self._workers[r], method_name)(*a, **k) for r, a, k in zip(ranks, args_per_rank, kwargs_per_rank)
        ]

    def _fetch(self, handles, method_name, ranks):
        return list(handles)


class FakeGroup:
    """Just what dispatch functions read from a worker group."""

    def __init__(self, world_size, dp_ranks=None, collect=None):
        self.world_size = world_size
        self._dp_ranks, self._collect = dp_ranks, collect

    def _get_dispatch_info(self, mesh_name):
        return self._dp_ranks

    def _get_collect_info(self, mesh_name):
        return self._collect


def make_data(n: int) -> DataProto:
    return DataProto.from_dict(tensors={"x": torch.arange(n)},
                               non_tensors={"name": [f"r{i}" for i in range(n)]},
                               meta_info={"temperature": 1.0})


def tag(data: DataProto, rank: int) -> DataProto:
    return DataProto.from_dict(tensors={
        "x": data.batch["x"].clone(),
        "rank": torch.full((len(data),), rank)
    },
                               non_tensors={"name": data.non_tensor_batch["name"]})


class TagWorker(Worker):

    def __init__(self, tp_size: int = 1):
        super().__init__()
        self.counter = 0
        self.seen = None
        self._register_dispatch_collect_info("mesh", dp_rank=self.rank // tp_size, is_collect=self.rank % tp_size == 0)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def whoami(self, salt=None):
        return self.rank, self.world_size, salt

    @register()
    def passthrough(self, value):
        return self.rank, value

    @register(dispatch_mode=Dispatch.DP_COMPUTE)
    def take(self, item):
        return self.rank, item

    @register(dispatch_mode=Dispatch.DP_COMPUTE_PROTO)
    def tag(self, data):
        self.seen = data.batch["x"].tolist()
        return tag(data, self.rank)

    @register(dispatch_mode=Dispatch.DP_COMPUTE_PROTO)
    def tag_twice(self, data):
        return tag(data, self.rank).repeat(2, interleave=True)

    @register(dispatch_mode=Dispatch.DP_COMPUTE_METRIC)
    def metric(self, data):
        return {"rank": self.rank, "rows": len(data)}

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn("mesh"))
    def nd_tag(self, data):
        self.seen = data.batch["x"].tolist()
        return tag(data, self.rank)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL, execute_mode=Execute.RANK_ZERO)
    def bump(self):
        self.counter += 1
        return self.rank

    @register(dispatch_mode=Dispatch.RANK_ZERO)
    def everyone_but_keep_zero(self):
        self.counter += 10
        return self.rank

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    async def async_rank(self):
        await asyncio.sleep(0)
        return self.rank


# ----------------------------------------------------------------------------------------------------------------------
# enums and the decorator
# ----------------------------------------------------------------------------------------------------------------------


def test_dispatch_and_execute_members_are_stable_and_picklable():
    for name in ("RANK_ZERO", "ONE_TO_ALL", "ALL_TO_ALL", "DP_COMPUTE", "DP_COMPUTE_PROTO",
                 "DP_COMPUTE_PROTO_WITH_FUNC", "DP_COMPUTE_METRIC", "DIRECT_ROLLOUT_METHOD"):
        member = getattr(Dispatch, name)
        assert Dispatch.from_name(name) is member
        assert pickle.loads(pickle.dumps(member)) is member
    assert Execute.ALL != Execute.RANK_ZERO
    assert Dispatch.RANK_ZERO != Execute.RANK_ZERO  # same name, different enums
    assert get_predefined_execute_fn(Execute.RANK_ZERO) == {"execute_fn_name": "execute_rank_zero"}
    with pytest.raises(KeyError, match="NOPE"):
        Dispatch.from_name("NOPE")


def test_custom_dispatch_mode_registers_and_survives_pickling_into_a_fresh_registry():
    mode = register_dispatch_mode("TEST_UNIT_MODE", dispatch_one_to_all, lambda wg, out: sum(out))
    try:
        assert Dispatch.TEST_UNIT_MODE is mode
        assert get_predefined_dispatch_fn(mode)["collect_fn"](None, [1, 2]) == 3
        with pytest.raises(ValueError, match="already registered"):
            register_dispatch_mode("TEST_UNIT_MODE", dispatch_one_to_all, lambda wg, out: out)
        update_dispatch_mode(mode, dispatch_one_to_all, lambda wg, out: max(out))
        assert get_predefined_dispatch_fn(mode)["collect_fn"](None, [1, 5, 2]) == 5
        blob = pickle.dumps(mode)
        # A worker process that never registered the mode recreates it when unpickling.
        Dispatch.remove("TEST_UNIT_MODE")
        restored = pickle.loads(blob)
        assert restored.name == "TEST_UNIT_MODE" and Dispatch.TEST_UNIT_MODE is restored
    finally:
        Dispatch._registry.pop("TEST_UNIT_MODE", None)
        from verl.single_controller.base.decorator import DISPATCH_MODE_FN_REGISTRY

        DISPATCH_MODE_FN_REGISTRY.pop(mode, None)
        if hasattr(Dispatch, "TEST_UNIT_MODE"):
            delattr(Dispatch, "TEST_UNIT_MODE")


def test_register_stores_attributes_and_rejects_bad_modes():

    @register(dispatch_mode=Dispatch.DP_COMPUTE_PROTO, execute_mode=Execute.RANK_ZERO, blocking=False)
    def method(self, data):
        """doc kept"""
        return data

    assert getattr(method, MAGIC_ATTR) == {
        "dispatch_mode": Dispatch.DP_COMPUTE_PROTO,
        "execute_mode": Execute.RANK_ZERO,
        "blocking": False
    }
    assert method.__doc__ == "doc kept" and method.__name__ == "method"
    with pytest.raises(TypeError, match="dispatch_mode"):
        register(dispatch_mode="DP_COMPUTE_PROTO")
    with pytest.raises(TypeError, match="execute_mode"):
        register(execute_mode=Dispatch.ONE_TO_ALL)
    with pytest.raises(ValueError, match="dispatch_fn"):
        register(dispatch_mode={"dispatch_fn": dispatch_one_to_all})
    with pytest.raises(TypeError, match="blocking"):
        register(blocking="yes")


def test_register_keeps_async_methods_async():
    worker_cls = TagWorker
    assert asyncio.iscoroutinefunction(worker_cls.async_rank)
    with rank_env(2, 4):
        worker = worker_cls()
    assert asyncio.run(worker.async_rank()) == 2


# ----------------------------------------------------------------------------------------------------------------------
# dispatch and collect functions
# ----------------------------------------------------------------------------------------------------------------------


def test_one_to_all_and_dp_compute_dispatch():
    group = FakeGroup(3)
    args, kwargs = dispatch_one_to_all(group, 7, key="v")
    assert args == ([7, 7, 7],) and kwargs == {"key": ["v", "v", "v"]}
    args, kwargs = dispatch_dp_compute(group, [1, 2, 3], other=("a", "b", "c"))
    assert args == ([1, 2, 3],) and kwargs == {"other": ["a", "b", "c"]}
    with pytest.raises(ValueError, match=r"one item per rank \(3 ranks\).*positional argument 0"):
        dispatch_dp_compute(group, [1, 2])


def test_dp_compute_proto_dispatch_splits_rows_and_reports_padding():
    group = FakeGroup(3)
    args, kwargs = dispatch_dp_compute_data_proto(group, make_data(10))
    shards = args[0]
    assert [s.batch["x"].tolist() for s in shards] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]
    assert kwargs == {PADDING_SIZE_KEY: (2, 12)}
    args, kwargs = dispatch_dp_compute_data_proto(group, data=make_data(6))
    assert [s.non_tensor_batch["name"].tolist() for s in kwargs["data"]] == [["r0", "r1"], ["r2", "r3"], ["r4", "r5"]]
    assert PADDING_SIZE_KEY not in kwargs


def test_dp_compute_proto_dispatch_handles_tensordict_and_rejects_bad_arguments():
    group = FakeGroup(2)
    td = TensorDict({"x": torch.arange(3)}, batch_size=[3])
    args, kwargs = dispatch_dp_compute_data_proto(group, td)
    assert [s["x"].tolist() for s in args[0]] == [[0, 1], [2, 0]] and kwargs[PADDING_SIZE_KEY] == (1, 4)
    with pytest.raises(TypeError, match="positional argument 1 is a int.*meta_info"):
        dispatch_dp_compute_data_proto(group, make_data(4), 3)
    with pytest.raises(ValueError, match="different numbers of rows"):
        dispatch_dp_compute_data_proto(group, make_data(4), make_data(6))


def test_collect_dp_compute_data_proto_joins_in_order_and_explains_bad_outputs():
    group = FakeGroup(2)
    out = collect_dp_compute_data_proto(group, [tag(make_data(2), 0), tag(make_data(3), 1)])
    assert out.batch["rank"].tolist() == [0, 0, 1, 1, 1]
    assert collect_dp_compute_data_proto(group, [None, None]) is None
    with pytest.raises(TypeError, match="DP_COMPUTE_METRIC"):
        collect_dp_compute_data_proto(group, [{"loss": 1.0}, {"loss": 2.0}])


def test_remove_padding_scales_with_rows_per_input_row():
    data = make_data(12)
    assert remove_padding_from_output(data, 2, 12).batch["x"].tolist() == list(range(10))
    doubled = data.repeat(2, interleave=True)  # 2 output rows per input row: drop 4
    assert len(remove_padding_from_output(doubled, 2, 12)) == 20
    assert remove_padding_from_output([1, 2], 2, 12) == [1, 2]  # metric lists are left alone
    with pytest.raises(ValueError, match="not a whole number of rows per input row"):
        remove_padding_from_output(make_data(13), 2, 12)


def test_future_shard_selector_pads_on_the_worker_and_marks_padding_rows():
    data = make_data(10)
    shards = [_PadAndSelectShard(3, i)(data) for i in range(3)]
    assert [s.batch["x"].tolist() for s in shards] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]
    assert [s.meta_info.get("_verl_pad_rows") for s in shards] == [None, None, 2]
    assert "_verl_pad_rows" not in data.meta_info  # the caller's data is untouched


def test_nd_mesh_dispatch_sends_dp_shards_and_collects_one_rank_per_dp_group():
    fns = make_nd_compute_dataproto_dispatch_fn("mesh")
    # 4 ranks as dp=2 x tp=2, declared out of rank order: ranks 0 and 3 are dp 1.
    group = FakeGroup(4, dp_ranks=[1, 0, 0, 1], collect=[False, True, False, True])
    args, kwargs = fns["dispatch_fn"](group, make_data(5))
    assert [s.batch["x"].tolist() for s in args[0]] == [[3, 4, 0], [0, 1, 2], [0, 1, 2], [3, 4, 0]]
    assert kwargs[PADDING_SIZE_KEY] == (1, 6)
    outputs = [tag(s, r) for r, s in enumerate(args[0])]
    joined = fns["collect_fn"](group, outputs)
    assert joined.batch["rank"].tolist() == [1, 1, 1, 3, 3, 3]  # ordered by dp rank, not by worker rank
    bad = FakeGroup(4, dp_ranks=[0, 0, 1, 1], collect=[True, True, True, False])
    with pytest.raises(RuntimeError, match="several ranks with dp rank 0"):
        fns["collect_fn"](bad, outputs)
    missing = FakeGroup(4, dp_ranks=[0, 0, 1, 1], collect=[True, False, False, False])
    with pytest.raises(RuntimeError, match=r"dp rank\(s\) \[1\]"):
        fns["collect_fn"](missing, outputs)
    undeclared = FakeGroup(2, dp_ranks=[0, None], collect=[True, True])
    with pytest.raises(RuntimeError, match="_register_dispatch_collect_info"):
        fns["dispatch_fn"](undeclared, make_data(2))


# ----------------------------------------------------------------------------------------------------------------------
# Worker, ResourcePool, WorkerGroup (in-process backend)
# ----------------------------------------------------------------------------------------------------------------------


def test_worker_reads_its_place_from_the_environment():
    with rank_env(1, 3):
        worker = TagWorker()
    assert (worker.rank, worker.world_size, worker.local_rank, worker.local_world_size) == (1, 3, 1, 3)
    assert worker.get_master_addr_port() == ("127.0.0.1", "29999")

    class Forgetful(Worker):

        def __init__(self):  # no super().__init__(): the env is read in __new__ anyway
            self.x = 1

    with rank_env(2, 3):
        assert Forgetful().rank == 2
    with rank_env(0, 2):
        os.environ["RANK"] = "two"
        with pytest.raises(ValueError, match="RANK='two' must be an integer"):
            TagWorker()
        os.environ["RANK"] = "5"
        with pytest.raises(ValueError, match="outside 0..WORLD_SIZE-1"):
            TagWorker()


def test_resource_pool_layout_and_validation():
    pool = ResourcePool([2, 3])
    assert pool.world_size == 5 and pool() == [2, 3]
    assert pool.local_world_size_list() == [2, 2, 3, 3, 3]
    assert pool.local_rank_list() == [0, 1, 0, 1, 2]
    pool.add_node(1)
    assert pool.world_size == 6
    with pytest.raises(ValueError, match=r"process_on_nodes\[1\]"):
        ResourcePool([2, 0])
    cia = ClassWithInitArgs(dict, a=1)
    assert cia() == {"a": 1}


def test_inprocess_group_binds_methods_and_runs_every_mode():
    wg = InProcessWorkerGroup(ClassWithInitArgs(TagWorker, tp_size=2), world_size=4)
    assert wg.world_size == 4
    assert wg.whoami(salt="s") == [(r, 4, "s") for r in range(4)]
    assert wg.passthrough(5) == [(r, 5) for r in range(4)]
    assert wg.take(["a", "b", "c", "d"]) == [(0, "a"), (1, "b"), (2, "c"), (3, "d")]
    out = wg.tag(make_data(10))
    assert out.batch["x"].tolist() == list(range(10))
    assert out.batch["rank"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert out.non_tensor_batch["name"].tolist() == [f"r{i}" for i in range(10)]
    assert len(wg.tag_twice(make_data(10))) == 20
    assert wg.metric(make_data(10)) == [{"rank": r, "rows": 3} for r in range(4)]
    nd = wg.nd_tag(make_data(6))
    assert nd.batch["rank"].tolist() == [0, 0, 0, 2, 2, 2]
    assert [w.seen for w in wg.workers] == [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]]


def test_inprocess_group_rank_zero_execution_and_rank_zero_dispatch():
    wg = InProcessWorkerGroup(ClassWithInitArgs(TagWorker), world_size=3)
    assert wg.bump() == 0
    assert [w.counter for w in wg.workers] == [1, 0, 0]
    assert wg.calls[-1] == ("bump", [0])
    assert wg.everyone_but_keep_zero() == 0
    assert [w.counter for w in wg.workers] == [11, 10, 10]
    assert wg.execute_all_sync("whoami", salt=[1, 2, 3]) == [(0, 3, 1), (1, 3, 2), (2, 3, 3)]  # per-rank lists split
    assert wg.execute_rank_zero_sync("whoami", salt="z") == (0, 3, "z")


def test_group_refuses_a_worker_method_that_hides_its_own_attribute():

    class Clashing(Worker):

        @register(dispatch_mode=Dispatch.ONE_TO_ALL)
        def execute_all(self):
            return 1

    with pytest.raises(ValueError, match="'execute_all' would hide"):
        InProcessWorkerGroup(ClassWithInitArgs(Clashing), world_size=1)


def test_local_ray_init_kwargs_turn_the_dashboard_off_and_stay_on_loopback():
    kwargs = local_ray_init_kwargs()
    assert kwargs["address"] == "local" and kwargs["include_dashboard"] is False
    assert kwargs["_node_ip_address"] == "127.0.0.1"
    assert kwargs["num_cpus"] >= 4
    assert local_ray_init_kwargs(num_cpus=2, namespace="x")["namespace"] == "x"


def test_non_tensor_rows_survive_padding_roundtrip():
    wg = InProcessWorkerGroup(ClassWithInitArgs(TagWorker), world_size=3)
    data = make_data(4)
    data.non_tensor_batch["obj"] = np.array([{"i": i} for i in range(4)], dtype=object)
    out = wg.tag(data)
    assert out.non_tensor_batch["name"].tolist() == ["r0", "r1", "r2", "r3"]
    assert out.batch["rank"].tolist() == [0, 0, 1, 1]  # 4 rows padded to 6: rank 2 got only padding rows
    assert wg.workers[2].seen == [0, 1]
