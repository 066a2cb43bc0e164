"""What verl adds to vLLM's OpenAI-compatible server for server-mode rollouts (``rollout.mode=async``,
``rollout.name=vllm``): a worker extension, loaded into vLLM's worker processes with
``--worker-extension-cls verl.workers.rollout.vllm_rollout.vllm_server.WeightSyncExtension``, whose methods the
trainer calls through the server's ``POST /collective_rpc`` (``VLLM_SERVER_DEV_MODE=1``)::

    {"method": "verl_begin_weight_update"}                         forget staged tensors
    {"method": "verl_stage_weights_b64", "args": [base64 safetensors blob]}   one bucket, kept in the worker
    {"method": "verl_commit_weights"}                               load everything staged, in one reload
    {"method": "verl_update_weights_from_b64", "args": [blob]}      stage + commit at once
    {"method": "verl_update_weights_from_path", "args": ["/dir/with/*.safetensors" or a file]}

Buckets are staged and loaded together because vLLM's in-place reload works per layer: a fused layer
(``qkv_proj``, ``gate_up_proj``) must receive all of its checkpoint tensors in the same ``reload_weights`` call, and a
bucket boundary may fall between them (a layer given only ``q_proj`` comes back with garbage in ``k``/``v``).

Only strings cross the wire (the dev endpoint passes JSON arguments, no pickle). Weights are loaded in place with
the worker's ``reload_weights(..., is_checkpoint_format=True)``: it re-runs vLLM's post-load processing (the CPU
backend's prepacked linear and fused-MoE weights), which a bare ``model.load_weights`` would leave stale. Partial updates keep the
other weights.

Launch by hand (disaggregated placement, ``rollout.server_address``)::

    VLLM_SERVER_DEV_MODE=1 python -m vllm.entrypoints.openai.api_server --model DIR \\
        --worker-extension-cls verl.workers.rollout.vllm_rollout.vllm_server.WeightSyncExtension
"""
from __future__ import annotations

import base64
import glob
import os
from typing import Any, Iterator

__all__ = ["WeightSyncExtension", "iter_safetensors"]


def iter_safetensors(path: str) -> Iterator[tuple[str, Any]]:
    """``(name, tensor)`` of every ``*.safetensors`` file in a directory (or of one file), one tensor at a time."""
    from safetensors import safe_open

    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"{path} has no *.safetensors files")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(f"weights path {path!r} is neither a directory nor a file")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


class WeightSyncExtension:
    """Mixed into vLLM's worker class (``self`` is the worker: it has ``reload_weights``)."""

    def _verl_reload(self, weights: Iterator[tuple[str, Any]]) -> int:
        from verl.workers.rollout.vllm_rollout.vllm_rollout_spmd import in_place_reload

        count = [0]

        def counted() -> Iterator[tuple[str, Any]]:
            for item in weights:
                count[0] += 1
                yield item

        with in_place_reload(getattr(self, "model_runner", None)):
            self.reload_weights(weights_iterator=counted(), is_checkpoint_format=True)
        return count[0]

    def verl_begin_weight_update(self) -> dict:
        self._verl_staged = []
        return {"staged": 0}

    def verl_stage_weights_b64(self, blob: str) -> dict:
        """Keep a base64 safetensors blob's HF-named tensors until :meth:`verl_commit_weights`."""
        from safetensors.torch import load

        staged = getattr(self, "_verl_staged", None)
        if staged is None:
            staged = self._verl_staged = []
        staged.extend(load(base64.b64decode(blob)).items())
        return {"staged": len(staged)}

    def verl_commit_weights(self) -> dict:
        """Load every staged tensor in one in-place reload, then forget them."""
        staged, self._verl_staged = getattr(self, "_verl_staged", None) or [], []
        return {"tensors": self._verl_reload(iter(staged))}

    def verl_update_weights_from_b64(self, blob: str) -> dict:
        """Load a base64 safetensors blob of HF-named tensors (whole layers) right away."""
        self.verl_begin_weight_update()
        self.verl_stage_weights_b64(blob)
        return self.verl_commit_weights()

    def verl_update_weights_from_path(self, path: str) -> dict:
        """Load the safetensors shards of a directory (or one file) written by the trainer."""
        return {"tensors": self._verl_reload(iter_safetensors(str(path)))}
