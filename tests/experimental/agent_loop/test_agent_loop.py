"""Agent loops driving a real HF rollout server process on 127.0.0.1."""
import asyncio

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from verl.experimental.agent_loop import AgentLoopManager, AsyncLLMServerManager, ToolAgentLoop
from verl.experimental.agent_loop.tool_parser import HermesToolParser
from verl.models.tiny import get_tiny_model_path
from verl.protocol import DataProto
from verl.tools.calculator_tool import CalculatorTool
from verl.workers.config_helpers import load_tokenizer as hf_tokenizer
from verl.workers.rollout.async_server import AsyncRolloutClient, RolloutServerError, launch_hf_server
from verl.workers.rollout.schemas import ROLLOUT_OUTPUT_KEYS


@pytest.fixture(scope="module")
def model_path():
    return get_tiny_model_path()


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return hf_tokenizer(model_path)


@pytest.fixture(scope="module")
def server(model_path):
    process = launch_hf_server(model_path, num_threads=1)
    yield process
    process.stop()


def _config(model_path, **multi_turn):
    return OmegaConf.create({
        "actor_rollout_ref": {
            "model": {
                "path": model_path
            },
            "rollout": {
                "prompt_length":
                    160,
                "response_length":
                    24,
                "temperature":
                    1.0,
                "top_p":
                    1.0,
                "top_k":
                    -1,
                "do_sample":
                    True,
                "calculate_log_probs":
                    True,
                "val_kwargs": {
                    "temperature": 0,
                    "top_p": 1.0,
                    "top_k": -1,
                    "do_sample": False
                },
                "multi_turn":
                    dict(
                        {
                            "enable": False,
                            "format": "hermes",
                            "max_parallel_calls": 1,
                            "max_tool_response_length": 64,
                            "tool_response_truncate_side": "middle"
                        }, **multi_turn),
                "agent": {
                    "default_agent_loop": "single_turn_agent"
                },
            }
        }
    })


def _prompt_batch(tokenizer, questions, width=16):
    rows = [tokenizer.encode(q, add_special_tokens=False)[-width:] for q in questions]
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    raw = np.empty(len(rows), dtype=object)
    raw[:] = [list(r) for r in rows]
    messages = np.empty(len(rows), dtype=object)
    messages[:] = [[{"role": "user", "content": q}] for q in questions]
    return DataProto.from_dict(tensors={
        "input_ids": ids,
        "attention_mask": mask
    },
                               non_tensors={
                                   "raw_prompt_ids": raw,
                                   "raw_prompt": messages,
                                   "uid": np.array([f"u{i}" for i in range(len(rows))], dtype=object)
                               })


def test_single_turn_manager_returns_the_rollout_schema(server, model_path, tokenizer):
    config = _config(model_path)
    manager = AgentLoopManager(config, [server.address], tokenizer=tokenizer, server_processes=[server])
    prompts = _prompt_batch(tokenizer, ["What is 3 plus 4?", "Hello!", "A train travels 60 miles.", "Let x = 7."])
    prompts.meta_info["validate"] = True  # greedy
    out = manager.generate_sequences(prompts)
    for key in ROLLOUT_OUTPUT_KEYS + ("rollout_log_probs",):
        assert key in out.batch.keys(), key
    assert out.batch["prompts"].shape == (4, 160) and out.batch["responses"].shape == (4, 24)
    assert torch.equal(out.batch["attention_mask"][:, 160:], out.batch["response_mask"])
    assert list(out.non_tensor_batch["uid"]) == ["u0", "u1", "u2", "u3"]
    lengths = out.batch["response_mask"].sum(-1)
    assert bool((lengths > 0).all())
    # token-in/token-out: the response is exactly what the server samples for these prompt ids
    raw0 = list(prompts.non_tensor_batch["raw_prompt_ids"][0])

    async def direct():
        async with AsyncRolloutClient(server.address) as client:
            return await client.generate(raw0, {"max_new_tokens": 24, "temperature": 0})

    expected = asyncio.run(direct())
    assert out.batch["responses"][0, :int(lengths[0])].tolist() == expected.token_ids
    assert torch.allclose(out.batch["rollout_log_probs"][0, :int(lengths[0])], torch.tensor(expected.log_probs))
    # prompt positions continue into the response
    pos = out.batch["position_ids"][0]
    n_prompt = int(prompts.batch["attention_mask"][0].sum())
    assert pos[159].item() == n_prompt - 1 and pos[160].item() == n_prompt
    assert out.meta_info["metrics"]["agent_loop/num_turns/mean"] == 2


class _ScriptedFirstTurn(AsyncLLMServerManager):
    """Mock of a policy that knows how to call tools: the first turn of each conversation returns a fixed tool call
    (the random tiny model cannot write one); later turns go to the real server."""

    def __init__(self, clients, first_turn_ids):
        super().__init__(clients)
        self.first_turn_ids = first_turn_ids
        self.seen = {}

    async def generate(self, request_id, *, prompt_ids, sampling_params):
        self.seen.setdefault(request_id, []).append((list(prompt_ids), dict(sampling_params)))
        if len(self.seen[request_id]) == 1:
            from verl.workers.rollout.async_server import TokenOutput

            ids = self.first_turn_ids[:sampling_params["max_new_tokens"]]
            return TokenOutput(token_ids=list(ids), log_probs=[-0.5] * len(ids))
        return await super().generate(request_id, prompt_ids=prompt_ids, sampling_params=sampling_params)


def test_hermes_parser():
    _, calls = HermesToolParser().extract_tool_calls(
        'hi <tool_call>{"name": "calculator", "arguments": {"expression": "1+2"}}</tool_call>'
        '<tool_call>not json</tool_call><tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>')
    assert [(c.name, c.arguments) for c in calls] == [("calculator", {"expression": "1+2"}), ("f", {"a": 1})]


def test_mock_policy_tool_call_is_parsed_executed_and_masked(server, model_path, tokenizer):
    config = _config(model_path, enable=True, max_assistant_turns=3)
    config.actor_rollout_ref.rollout.response_length = 96
    ToolAgentLoop.init_class(config, tokenizer, tools=[CalculatorTool()])
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call><|im_end|>'
    call_ids = tokenizer.encode(call, add_special_tokens=False)

    async def go():
        async with AsyncRolloutClient(server.address, timeout_s=120, process=server) as client:
            manager = _ScriptedFirstTurn([client], call_ids)
            loop = ToolAgentLoop(config, manager, tokenizer)
            out = await loop.run({
                "temperature": 0.0,
                "top_p": 1.0,
                "top_k": -1
            },
                                 raw_prompt=[{
                                     "role": "user",
                                     "content": "What is 6 times 7?"
                                 }])
            return out, manager

    out, manager = asyncio.run(go())
    assert "calculator" in tokenizer.decode(out.prompt_ids)  # the tool schema is in the prompt
    k = len(call_ids)
    assert out.response_ids[:k] == call_ids and out.response_mask[:k] == [1] * k
    turns = list(manager.seen.values())[0]
    assert len(turns) >= 2
    # the second turn continues from exactly the tokens of the first turn plus the observation
    second_prompt = turns[1][0]
    obs = second_prompt[len(out.prompt_ids) + k:]
    assert second_prompt[:len(out.prompt_ids) + k] == out.prompt_ids + call_ids
    assert "<tool_response>\n42\n</tool_response>" in tokenizer.decode(obs)
    assert tokenizer.decode(obs).endswith("<|im_start|>assistant\n")
    assert out.response_ids[k:k + len(obs)] == obs and out.response_mask[k:k + len(obs)] == [0] * len(obs)
    # the budget: the second turn may only use what is left
    assert turns[1][1]["max_new_tokens"] == 96 - k - len(obs)
    assert sum(out.response_mask) == len(out.response_ids) - len(obs) * (out.metrics["user_turns"] > 0)
    assert out.metrics["tool_calls"] == 1 or out.metrics["tool_calls"] >= 1
    assert len(out.response_ids) <= 96 and out.response_logprobs[k] == 0.0


def test_mock_policy_max_user_turns_zero_feeds_no_tool_answer(server, model_path, tokenizer):
    config = _config(model_path, enable=True, max_user_turns=0)
    ToolAgentLoop.init_class(config, tokenizer, tools=[CalculatorTool()])
    call_ids = tokenizer.encode('<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}</tool_call>',
                                add_special_tokens=False)

    async def go():
        async with AsyncRolloutClient(server.address, timeout_s=60) as client:
            loop = ToolAgentLoop(config, _ScriptedFirstTurn([client], call_ids), tokenizer)
            return await loop.run({"temperature": 0.0}, raw_prompt=[{"role": "user", "content": "1+1?"}])

    out = asyncio.run(go())
    assert out.response_ids == call_ids[:24] and out.extra_fields["stop_reason"] in ("max_user_turns", "length")


def test_manager_with_dead_server_fails_fast(model_path, tokenizer):
    from verl.workers.rollout.async_server import _free_port

    config = _config(model_path)
    manager = AgentLoopManager(config, [f"http://127.0.0.1:{_free_port()}"], tokenizer=tokenizer, request_timeout_s=20)
    with pytest.raises(RolloutServerError, match="failed during /generate"):
        manager.generate_sequences(_prompt_batch(tokenizer, ["hi", "there"]))


def test_prompt_longer_than_prompt_length_is_a_config_error(server, model_path, tokenizer):
    config = _config(model_path)
    config.actor_rollout_ref.rollout.prompt_length = 4
    manager = AgentLoopManager(config, [server.address], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="data.max_prompt_length"):
        manager.generate_sequences(_prompt_batch(tokenizer, ["What is the weather today in the park?"]))
