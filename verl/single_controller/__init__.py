"""The single controller: one driver process drives groups of workers through ``@register``-ed methods.

``base/`` holds the backend-independent pieces (``Worker``, ``WorkerGroup``, ``register``, ``Dispatch``, ``Execute``);
``ray/`` runs the workers as Ray actors. Importing this package does not import Ray.
"""
from verl.single_controller.base import ClassWithInitArgs, ResourcePool, Worker, WorkerError, WorkerGroup

__all__ = ["ClassWithInitArgs", "ResourcePool", "Worker", "WorkerError", "WorkerGroup"]
