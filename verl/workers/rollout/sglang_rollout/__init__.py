"""The SGLang rollout backend (``actor_rollout_ref.rollout.name=sglang``): offline engine or HTTP server, one
sampling-parameter mapping, the shared output schema. Nothing here imports SGLang until an engine is built."""
from verl.workers.rollout.sglang_rollout.engine import (HttpServerEngine, OfflineEngine, SGLangEngineError,
                                                        SGLangServerError, launch_server)
from verl.workers.rollout.sglang_rollout.sampling import (engine_kwargs_from_config, resolve_sampling,
                                                          validate_sglang_rollout_config)
from verl.workers.rollout.sglang_rollout.sglang_rollout import SGLangRollout

__all__ = [
    "HttpServerEngine",
    "OfflineEngine",
    "SGLangEngineError",
    "SGLangRollout",
    "SGLangServerError",
    "engine_kwargs_from_config",
    "launch_server",
    "resolve_sampling",
    "validate_sglang_rollout_config",
]
