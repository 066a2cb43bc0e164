"""Checks shared by the engine-specific server-mode tests (``sglang/test_sglang_server_agent_loop.py``,
``vllm/test_vllm_server_agent_loop.py``): a real server launched by
:func:`verl.workers.rollout.server_adapters.launch_rollout_server`, driven by the agent loop.

Not a test module itself (pytest collects only ``test_*.py``); the engine tests put this directory on ``sys.path``.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from omegaconf import OmegaConf

from verl.experimental.agent_loop import AgentLoopManager, ToolAgentLoop, register
from verl.protocol import DataProto
from verl.workers.rollout.async_server import TokenOutput
from verl.workers.rollout.server_adapters import push_weight_buckets

PROMPT_LENGTH = 160
RESPONSE_LENGTH = 12
TEXTS = ["What is 12 + 7?", "Natalia sold clips to 48 of her friends.", "hello", "Compute 7 * 8, then add 1."]
CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call><|im_end|>'
TOOL_CONFIG = """tools:
  - class_name: verl.tools.calculator_tool.CalculatorTool
    config: {type: native}
"""


def rollout_node(name: str, **overrides) -> dict:
    """An ``actor_rollout_ref.rollout`` node for the tiny model on CPU (real weights, greedy-friendly)."""
    node = {
        "name": name,
        "mode": "async",
        "placement": "colocated",
        "prompt_length": PROMPT_LENGTH,
        "response_length": RESPONSE_LENGTH,
        "max_model_len": 512,
        "max_num_seqs": 16,
        "load_format": "auto",
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": -1,
        "do_sample": True,
        "seed": 0,
        "ignore_eos": True,  # fixed-length responses: comparable token for token with the HF reference
        "calculate_log_probs": True,
        "enable_prefix_caching": True,
        "engine_kwargs": {
            "vllm": {},
            "sglang": {
                "attention_backend": None
            }
        },
        "val_kwargs": {
            "temperature": 0,
            "top_p": 1.0,
            "top_k": -1,
            "n": 1,
            "do_sample": False
        },
        "multi_turn": {
            "enable": False,
            "format": "hermes",
            "max_parallel_calls": 1,
            "max_assistant_turns": 3,
            "max_tool_response_length": 64,
            "tool_response_truncate_side": "middle",
            "tool_config_path": None
        },
        "agent": {
            "default_agent_loop": "single_turn_agent",
            "request_timeout_s": 300
        },
    }
    node.update(overrides)
    return node


def trainer_config(model_path: str, node: dict):
    return OmegaConf.create({"actor_rollout_ref": {"model": {"path": model_path}, "rollout": node}})


def prompt_batch(tokenizer, texts=TEXTS, agent_name: str | None = None, validate: bool = True) -> DataProto:
    """Rows as RLHFDataset gives them (chat-templated ``raw_prompt_ids`` and ``raw_prompt`` messages)."""
    messages = [[{"role": "user", "content": t}] for t in texts]
    rows = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True) for m in messages]
    rows = [list(r["input_ids"]) if isinstance(r, dict) or hasattr(r, "keys") else list(r) for r in rows]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    raw, msgs = np.empty(len(rows), dtype=object), np.empty(len(rows), dtype=object)
    raw[:], msgs[:] = rows, messages
    non_tensors = {"raw_prompt_ids": raw, "raw_prompt": msgs, "uid": np.array([f"u{i}" for i in range(len(rows))])}
    if agent_name:
        non_tensors["agent_name"] = np.array([agent_name] * len(rows), dtype=object)
    return DataProto.from_dict(tensors={
        "input_ids": ids,
        "attention_mask": mask
    },
                               non_tensors=non_tensors,
                               meta_info={"validate": validate})


@torch.no_grad()
def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int = RESPONSE_LENGTH) -> list[list[int]]:
    """The HF model's greedy continuation of each prompt (no EOS stop), one prompt at a time (no padding)."""
    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        for _ in range(max_new_tokens):
            nxt = model(input_ids=x).logits[0, -1].argmax()
            x = torch.cat([x, nxt.view(1, 1)], dim=1)
        out.append(x[0, len(ids):].tolist())
    return out


def perturb_(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def buckets_of(model: torch.nn.Module, per_bucket: int = 6) -> list[list[tuple[str, torch.Tensor]]]:
    items = [(n, t.detach().clone()) for n, t in model.state_dict().items()]
    return [items[i:i + per_bucket] for i in range(0, len(items), per_bucket)]


def responses(out: DataProto) -> list[list[int]]:
    lengths = out.batch["response_mask"].sum(-1).tolist()
    return [row[:n] for row, n in zip(out.batch["responses"].tolist(), lengths)]


def check_single_turn(server, tokenizer, model_path, hf_model) -> DataProto:
    """Greedy single-turn rollouts through the manager equal the HF model's, with log-probs, in the rollout schema."""
    manager = AgentLoopManager(trainer_config(model_path, rollout_node(server.name)), [server.address],
                               tokenizer=tokenizer,
                               server_processes=[server.process])
    assert manager.server_apis == [server.api]
    prompts = prompt_batch(tokenizer)
    out = manager.generate_sequences(prompts)
    assert out.batch["responses"].shape == (len(TEXTS), RESPONSE_LENGTH)
    assert out.batch["prompts"].shape == (len(TEXTS), PROMPT_LENGTH)
    raw = list(prompts.non_tensor_batch["raw_prompt_ids"])
    assert responses(out) == hf_greedy(hf_model, raw)
    lp = out.batch["rollout_log_probs"]
    assert bool((lp <= 0).all()) and bool((lp[:, 0] < 0).all())  # real log-probs of the sampled tokens
    assert out.meta_info["metrics"]["agent_loop/num_turns/mean"] == 2
    return out


def check_weight_updates(server, tokenizer, model_path, hf_model, tmp_dir: str) -> None:
    """A pushed update changes the outputs, to exactly what the updated HF model generates: over HTTP (colocated)
    and through a directory (disaggregated); the original weights bring the original outputs back."""
    manager = AgentLoopManager(trainer_config(model_path, rollout_node(server.name)), [server.address],
                               tokenizer=tokenizer,
                               server_processes=[server.process])
    prompts = prompt_batch(tokenizer)
    raw = list(prompts.non_tensor_batch["raw_prompt_ids"])
    original = {k: v.clone() for k, v in hf_model.state_dict().items()}
    before = responses(manager.generate_sequences(prompts))
    try:
        perturb_(hf_model, seed=11)
        stats = push_weight_buckets([server], buckets_of(hf_model), mode="tensor")
        assert stats["buckets"] > 1 and stats["bytes"] > 0
        after = responses(manager.generate_sequences(prompts))
        assert after != before, "the weight update did not change the outputs"
        assert after == hf_greedy(hf_model, raw)

        perturb_(hf_model, seed=12)
        push_weight_buckets([server],
                            buckets_of(hf_model),
                            mode="disk",
                            sync_dir=os.path.join(tmp_dir, "weights"),
                            model_path=model_path)
        by_disk = responses(manager.generate_sequences(prompts))
        assert by_disk != after and by_disk == hf_greedy(hf_model, raw)
    finally:
        hf_model.load_state_dict(original)
        push_weight_buckets([server], buckets_of(hf_model), mode="tensor")
    assert responses(manager.generate_sequences(prompts)) == before


class _FirstTurnScripted:
    """The first request of a conversation returns a scripted calculator call (the random tiny model cannot write
    one); every later turn goes to the real server."""

    def __init__(self, inner, call_ids):
        self.inner, self.call_ids, self.turns = inner, call_ids, {}

    async def generate(self, request_id, *, prompt_ids, sampling_params):
        self.turns.setdefault(request_id, []).append(list(prompt_ids))
        if len(self.turns[request_id]) == 1:
            return TokenOutput(token_ids=list(self.call_ids), log_probs=[0.0] * len(self.call_ids))
        return await self.inner.generate(request_id, prompt_ids=prompt_ids, sampling_params=sampling_params)


@register("mock_first_turn_tool_agent")
class MockFirstTurnToolAgentLoop(ToolAgentLoop):
    """``tool_agent`` with a scripted first assistant turn (a mock policy); tools, parsing, masks and later turns
    are the real path."""

    def __init__(self, trainer_config, server_manager, tokenizer, **kwargs):
        call_ids = tokenizer.encode(CALL, add_special_tokens=False)
        super().__init__(trainer_config, _FirstTurnScripted(server_manager, call_ids), tokenizer, **kwargs)


def check_tool_agent(server, tokenizer, model_path, tmp_dir: str) -> DataProto:
    """The tool agent loop with the calculator tool through the manager: the call is executed, its answer fed back
    (mask 0) and the next turn sampled by the server (mask 1)."""
    tool_config = os.path.join(tmp_dir, "tools.yaml")
    with open(tool_config, "w", encoding="utf-8") as f:
        f.write(TOOL_CONFIG)
    node = rollout_node(server.name, prompt_length=384, response_length=96, ignore_eos=False)  # tool schemas
    node["multi_turn"].update(enable=True, tool_config_path=tool_config)
    manager = AgentLoopManager(trainer_config(model_path, node), [server.address],
                               tokenizer=tokenizer,
                               server_processes=[server.process])
    out = manager.generate_sequences(prompt_batch(tokenizer, TEXTS[:2], agent_name="mock_first_turn_tool_agent"))
    call_ids = tokenizer.encode(CALL, add_special_tokens=False)
    k = len(call_ids)
    for i in range(len(out)):
        mask = out.batch["response_mask"][i].tolist()
        ids = out.batch["responses"][i].tolist()
        attn = out.batch["attention_mask"][i, 384:].tolist()
        assert ids[:k] == call_ids and mask[:k] == [1] * k
        n_obs = next(j for j in range(k, len(mask)) if mask[j] == 1) - k  # fed-back tokens, then the server's
        observation = tokenizer.decode(ids[k:k + n_obs])
        assert "<tool_response>\n42\n</tool_response>" in observation
        sampled = sum(m for m, a in zip(mask[k + n_obs:], attn[k + n_obs:]) if a)
        assert sampled >= 1, "the server generated nothing after the tool answer"
        assert int(out.non_tensor_batch["__num_turns__"][i]) >= 4
    assert out.meta_info["metrics"]["agent_loop/tool_calls/mean"] >= 1
    return out
