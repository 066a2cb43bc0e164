"""Backend-independent single controller: workers, worker groups, resource pools and the ``register`` decorator."""
from verl.single_controller.base.worker import Worker
from verl.single_controller.base.worker_group import ClassWithInitArgs, ResourcePool, WorkerError, WorkerGroup

__all__ = ["ClassWithInitArgs", "ResourcePool", "Worker", "WorkerError", "WorkerGroup"]
