"""The APR recipe (``recipe/apr``): the spawn/join protocol, its limits and context handling against a real HF rollout
server process on 127.0.0.1 driving the tiny model, and ``python -m recipe.apr.main --config-name hsp`` for two GRPO
steps.

The random tiny model never writes a spawn block, so the tests that need one use a *mock spawning policy* at the
server boundary: requests whose prompt matches a scripted prefix get scripted tokens (a spawn block), every other
request (the children, the parent after a join) is sampled by the real server. Those tests say ``mock`` in their
names.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from recipe.apr.apr_agent_loop import AprAgentLoop, resolve_max_model_len
from recipe.apr.data import SPAWN_INSTRUCTION, apr_countdown_rows
from recipe.apr.spawn import (NO_RESULT, AprSettings, child_result, format_join, parse_spawn, sanitize, spawn_cut)
from verl.experimental.agent_loop import AgentLoopManager, AsyncLLMServerManager
from verl.models.tiny import get_tiny_model_path
from verl.protocol import DataProto
from verl.workers.config_helpers import load_tokenizer
from verl.workers.rollout.async_server import AsyncRolloutClient, TokenOutput, launch_hf_server

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GREEDY = {"temperature": 0.0, "top_p": 1.0, "top_k": -1}


@pytest.fixture(scope="module")
def model_path():
    return get_tiny_model_path()


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return load_tokenizer(model_path)


@pytest.fixture(scope="module")
def server(model_path):
    process = launch_hf_server(model_path, num_threads=1)
    yield process
    process.stop()


def _config(model_path, response_length=160, **apr):
    base = {"enable_spawn": True, "max_children_per_spawn": 4, "max_spawn_calls": 2, "child_token_budget": 12}
    base.update(apr)
    return OmegaConf.create({
        "actor_rollout_ref": {
            "model": {
                "path": model_path
            },
            "rollout": {
                "prompt_length": 320,
                "response_length": response_length,
                "calculate_log_probs": True,
                "agent": {
                    "default_agent_loop": "apr"
                }
            }
        },
        "apr": base
    })


# ------------------------------------------------------------------------------------------ protocol (pure) ---
def test_parse_spawn_takes_the_first_closed_block_and_its_nonempty_lines():
    text = "think\n<spawn>\n  a + b  \n\nsecond line\n</spawn> after <spawn>\nlater\n</spawn>"
    call = parse_spawn(text)
    assert call.prompts == ["a + b", "second line"]
    assert text[call.start:call.end] == "<spawn>\n  a + b  \n\nsecond line\n</spawn>"
    assert parse_spawn("<spawn>\nnot closed yet") is None
    assert parse_spawn("no block </spawn> <spawn>") is None
    assert parse_spawn("<spawn></spawn>").prompts == []


def test_spawn_cut_finds_the_shortest_token_prefix_with_the_block(tokenizer):
    text = "Let me split.\n<spawn>\nx + 1\ny * 2\n</spawn>JUNK that the server kept generating"
    ids = tokenizer.encode(text, add_special_tokens=False)
    decode = lambda t: tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
    k, call = spawn_cut(ids, decode)
    assert decode(ids[:k]).endswith("</spawn>") and not decode(ids[:k - 1]).endswith("</spawn>")
    assert call.prompts == ["x + 1", "y * 2"]
    assert spawn_cut(tokenizer.encode("<spawn>\nx\n", add_special_tokens=False), decode) is None


def test_child_result_and_join_block():
    assert child_result("search ... <answer>1 + 2</answer> then <answer> 3 * 4 </answer> tail", 200) == "3 * 4"
    assert child_result("no answer here, just a long tail of text", 9) == "l of text"
    assert child_result("   ", 50) == NO_RESULT
    # a child's text cannot smuggle protocol tags (or an <answer>) into its parent's context
    assert sanitize("<spawn>x</spawn><join><result>y</result></join>") == "xy"
    assert child_result("<answer><spawn>evil</spawn></answer>", 50) == "evil"
    assert format_join(["3 + 5",
                        NO_RESULT]) == "\n<join>\n<result>3 + 5</result>\n<result>(no result)</result>\n</join>\n"
    assert format_join([]) == "\n<join>\n</join>\n"


def test_settings_reject_bad_values_naming_the_key():
    ok = AprSettings.from_config({"apr": {"enable_spawn": True, "max_child_calls": 10}})
    assert ok.enable_spawn and ok.max_child_calls == 10 and ok.max_children_per_spawn == 4
    with pytest.raises(ValueError, match="apr.max_children_per_spawn must be >= 1"):
        AprSettings.from_config({"apr": {"max_children_per_spawn": 0}})
    with pytest.raises(ValueError, match="apr.max_child_calls must be an integer"):
        AprSettings.from_config({"apr": {"max_child_calls": "ten"}})
    with pytest.raises(ValueError, match="apr.child_prompt_template must contain"):
        AprSettings.from_config({"apr": {"child_prompt_template": "no placeholder"}})
    with pytest.raises(ValueError, match="apr.announce_child_budget=true needs apr.max_child_calls"):
        AprSettings.from_config({"apr": {"announce_child_budget": True}})


def test_prepare_apr_config_generates_variant_data_and_checks_keys(tmp_path, monkeypatch):
    import pandas as pd
    from hydra import compose, initialize_config_dir

    from recipe.apr.main import prepare_apr_config
    from verl.utils.config import ConfigError

    monkeypatch.setenv("VERL_DATA_CACHE", str(tmp_path))
    sizes = ["apr.data.train_size=4", "apr.data.test_size=2"]
    with initialize_config_dir(config_dir=os.path.join(REPO, "recipe", "apr", "config"), version_base=None):
        configs = {name: compose(config_name=name, overrides=sizes) for name in ("hs", "hsp", "hsp_cond10")}
        bad = compose(config_name="hsp", overrides=sizes + ["apr.max_model_len=100"])
        bad_key = compose(config_name="hsp", overrides=["apr.max_depth=0"])
    questions = {}
    for name, config in configs.items():
        config = prepare_apr_config(config)
        assert config.actor_rollout_ref.model.path == get_tiny_model_path()
        frame = pd.read_parquet(config.data.train_files)
        assert len(frame) == 4 and set(frame["data_source"]) == {"countdown"}
        assert len(pd.read_parquet(config.data.val_files)) == 2
        questions[name] = frame["prompt"][0][-1]["content"]
    assert SPAWN_INSTRUCTION not in questions["hs"]
    assert questions["hsp"].endswith(SPAWN_INSTRUCTION)
    assert questions["hsp_cond10"].endswith("Start at most 10 child threads in total.")
    with pytest.raises(ConfigError, match="apr.max_model_len"):
        prepare_apr_config(bad)  # data.max_prompt_length=320 leaves no room
    with pytest.raises(ConfigError, match="apr.max_depth must be >= 1"):
        prepare_apr_config(bad_key)


def test_max_model_len_resolution(model_path, tokenizer):
    assert resolve_max_model_len(_config(model_path, max_model_len=64), tokenizer) == 64
    assert resolve_max_model_len(_config(model_path), tokenizer) == 2048  # the tiny model's max_position_embeddings


# ------------------------------------------------------------------------------------ against a real server ---
class _MockSpawningPolicy(AsyncLLMServerManager):
    """Mock of a policy that writes spawn blocks: a request whose prompt is one of ``scripts``' prefixes (exactly,
    or any continuation of it with ``repeat``) gets the scripted tokens (cut to ``max_new_tokens``); every other
    request goes to the real server. Records every request and the order requests start and end."""

    def __init__(self, clients, scripts, repeat=False):
        super().__init__(clients)
        self.scripts = [(list(prefix), list(tokens)) for prefix, tokens in scripts]
        self.repeat = repeat
        self.requests = []  # (prompt_ids, sampling_params, output, scripted)
        self.events = []  # ("start" | "end", index into requests)

    def _script(self, prompt_ids):
        for prefix, tokens in self.scripts:
            if prompt_ids == prefix or (self.repeat and prompt_ids[:len(prefix)] == prefix):
                return tokens
        return None

    async def generate(self, request_id, *, prompt_ids, sampling_params):
        index = len(self.requests)
        self.requests.append(None)
        self.events.append(("start", index))
        scripted = self._script(list(prompt_ids))
        if scripted is not None:
            ids = scripted[:sampling_params["max_new_tokens"]]
            out = TokenOutput(token_ids=list(ids), log_probs=[-0.25] * len(ids), stop_reason="stop")
        else:
            out = await super().generate(request_id, prompt_ids=prompt_ids, sampling_params=sampling_params)
        self.requests[index] = (list(prompt_ids), dict(sampling_params), out, scripted is not None)
        self.events.append(("end", index))
        return out

    def server_requests(self):
        return [r for r in self.requests if not r[3]]


def _parent_prompt(tokenizer):
    row = apr_countdown_rows(1, "test", SPAWN_INSTRUCTION)[0]
    text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def _run(server, config, tokenizer, scripts, prompt_ids, repeat=False):

    async def go():
        async with AsyncRolloutClient(server.address, timeout_s=120, process=server) as client:
            manager = _MockSpawningPolicy([client], scripts, repeat=repeat)
            loop = AprAgentLoop(config, manager, tokenizer)
            out = await loop.run(dict(GREEDY), raw_prompt_ids=prompt_ids)
            return out, manager, loop

    return asyncio.run(go())


def _ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


SPAWN_TEXT = ("Split the search.\n<spawn>\nUsing the numbers [3, 5], reach 8.\nUsing the numbers [2, 2], reach 4.\n"
              "Using the numbers [1, 1], reach 2.\n</spawn>JUNK AFTER THE BLOCK")


def test_mock_spawn_runs_children_concurrently_and_joins_masked_results(server, model_path, tokenizer):
    config = _config(model_path, response_length=256, max_children_per_spawn=2, child_token_budget=12)
    prompt = _parent_prompt(tokenizer)
    scripted = _ids(tokenizer, SPAWN_TEXT)
    out, manager, loop = _run(server, config, tokenizer, [(prompt, scripted)], prompt)

    decode = lambda t: tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
    k, call = spawn_cut(scripted, decode)
    assert out.prompt_ids == prompt
    assert out.response_ids[:k] == scripted[:k] and out.response_mask[:k] == [1] * k
    assert out.response_logprobs[:k] == [-0.25] * k
    assert "JUNK" not in decode(out.response_ids)  # what followed </spawn> is dropped
    # two children (max_children_per_spawn=2), each in its own chat-templated context, sampled by the server
    children = manager.server_requests()[:2]
    assert [c[0] for c in children] == [loop.child_prompt_ids(line) for line in call.prompts[:2]]
    assert all(c[1]["max_new_tokens"] == 12 for c in children)  # the child token budget
    # ... concurrently: both were requested before either finished
    child_indices = [i for i, r in enumerate(manager.requests) if not r[3]][:2]
    starts = [manager.events.index(("start", i)) for i in child_indices]
    ends = [manager.events.index(("end", i)) for i in child_indices]
    assert max(starts) < min(ends)
    # the join block: the children's results (from what the server sampled), and "not run" for the third line
    expected = format_join([child_result(decode(c[2].token_ids), 200) for c in children] +
                           ["not run: at most 2 children per spawn"])
    obs = _ids(tokenizer, expected)
    assert out.response_ids[k:k + len(obs)] == obs
    assert out.response_mask[k:k + len(obs)] == [0] * len(obs)
    assert out.response_logprobs[k:k + len(obs)] == [0.0] * len(obs)
    # the parent continues (real server) from exactly its tokens plus the join, within what is left of its budget
    parent_after = manager.server_requests()[2]
    assert parent_after[0] == prompt + scripted[:k] + obs
    assert parent_after[1]["max_new_tokens"] == 256 - k - len(obs)
    rest = out.response_ids[k + len(obs):]
    assert rest == parent_after[2].token_ids[:len(rest)] and len(rest) > 0
    assert out.response_mask[k + len(obs):] == [1] * len(rest)
    assert len(out.response_ids) <= 256
    assert out.metrics["spawn_calls"] == 1 and out.metrics["child_calls"] == 2
    assert out.metrics["children_not_run"] == 1
    assert out.metrics["child_tokens"] == sum(len(c[2].token_ids) for c in children)
    assert out.metrics["joined_tokens"] == len(obs) and out.num_turns == 1 + 2 + 1


def test_mock_spawn_limits_spawn_calls_and_child_budget(server, model_path, tokenizer):
    # hsp_cond10-style: a parent that spawns two children on every turn, 3 child threads in all, 2 spawns per thread
    config = _config(model_path,
                     response_length=400,
                     max_spawn_calls=2,
                     max_child_calls=3,
                     child_token_budget=4,
                     max_result_chars=20)
    prompt = _parent_prompt(tokenizer)
    scripted = _ids(tokenizer, "<spawn>\nfirst task\nsecond task\n</spawn>")
    out, manager, _ = _run(server, config, tokenizer, [(prompt, scripted)], prompt, repeat=True)

    text = tokenizer.decode(out.response_ids, skip_special_tokens=True)
    assert len(manager.server_requests()) == 3  # only the three children reach the server
    assert text.count("<result>not run: the budget of 3 child threads is spent</result>") == 1
    assert text.count("<result>not run: at most 2 spawn calls per thread</result>") >= 2
    assert out.metrics["child_calls"] == 3 and out.metrics["spawn_calls"] >= 3
    assert len(out.response_ids) <= 400 and out.extra_fields["stop_reason"] == "length"
    assert sum(out.response_mask) + out.metrics["joined_tokens"] == len(out.response_ids)


def test_mock_context_limit_cuts_the_join_and_ends_the_thread_cleanly(server, model_path, tokenizer):
    prompt = _parent_prompt(tokenizer)
    scripted = _ids(tokenizer, "<spawn>\nUsing the numbers [3, 5], reach 8 by adding them up.\n</spawn>")
    max_len = len(prompt) + len(scripted) + 10
    config = _config(model_path,
                     response_length=200,
                     max_model_len=max_len,
                     child_token_budget=200,
                     max_child_prompt_tokens=6)
    out, manager, loop = _run(server, config, tokenizer, [(prompt, scripted)], prompt)

    first = manager.requests[0]
    assert first[3] and first[1]["max_new_tokens"] == len(scripted) + 10  # the context binds, not the budget
    child_prompt, child_params, child_out, _ = manager.server_requests()[0]
    # the spawned line is cut to max_child_prompt_tokens=6 before the child's chat template
    line_ids = _ids(tokenizer, "Using the numbers [3, 5], reach 8 by adding them up.")
    assert child_prompt == loop.child_prompt_ids(tokenizer.decode(line_ids[:6]))
    assert "adding them up" not in tokenizer.decode(child_prompt)
    assert child_params["max_new_tokens"] == min(200, max_len - len(child_prompt))
    # the join did not fit: it is cut to the 10 tokens left, the thread ends, prompt + response == max_model_len
    assert len(manager.requests) == 2
    assert out.response_mask == [1] * len(scripted) + [0] * 10
    assert len(prompt) + len(out.response_ids) == max_len
    assert out.extra_fields["stop_reason"] == "context" and out.metrics["context_stops"] >= 1

    # a prompt that leaves no room at all: an empty response, no request to the engine
    config = _config(model_path, max_model_len=len(prompt))
    out, manager, _ = _run(server, config, tokenizer, [], prompt)
    assert out.response_ids == [] and manager.requests == [] and out.extra_fields["stop_reason"] == "context"


def test_mock_nested_spawn_up_to_max_depth(server, model_path, tokenizer):
    config = _config(model_path, response_length=300, max_depth=2, child_token_budget=60, max_result_chars=400)
    prompt = _parent_prompt(tokenizer)
    parent_script = _ids(tokenizer, "<spawn>\nsub problem A\n</spawn>")
    child_script = _ids(tokenizer, "<spawn>\nsub sub problem\n</spawn>")
    probe = AprAgentLoop(config, None, tokenizer)
    child_prompt = probe.child_prompt_ids("sub problem A")
    grandchild_prompt = probe.child_prompt_ids("sub sub problem")
    # the grandchild (depth 2 = max_depth) is scripted too: it may not spawn, so its block is plain text
    scripts = [(prompt, parent_script), (child_prompt, child_script), (grandchild_prompt, child_script)]
    out, manager, _ = _run(server, config, tokenizer, scripts, prompt)

    prompts = [r[0] for r in manager.requests]
    assert prompts.count(grandchild_prompt) == 1  # run once, by the child; it did not spawn again
    assert out.metrics["max_depth"] == 2 and out.metrics["child_calls"] == 2 and out.metrics["spawn_calls"] == 2
    # the grandchild's unparsed block came back, tags removed, inside the child's join and then the parent's
    text = tokenizer.decode(out.response_ids, skip_special_tokens=True)
    assert "<result>sub sub problem</result>" not in text and "sub sub problem" in text


def test_mock_hs_without_spawning_keeps_the_block_as_text(server, model_path, tokenizer):
    config = _config(model_path, enable_spawn=False)
    prompt = _parent_prompt(tokenizer)
    scripted = _ids(tokenizer, SPAWN_TEXT)
    out, manager, _ = _run(server, config, tokenizer, [(prompt, scripted)], prompt)
    assert out.response_ids == scripted and out.response_mask == [1] * len(scripted)
    assert len(manager.requests) == 1 and out.metrics["child_calls"] == 0 and out.num_turns == 2


def test_manager_runs_the_registered_apr_loop_on_the_tiny_model(server, model_path, tokenizer):
    config = _config(model_path, response_length=24)
    rows = apr_countdown_rows(2, "test", SPAWN_INSTRUCTION)
    ids = [
        _ids(tokenizer, tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True))
        for r in rows
    ]
    width = max(len(i) for i in ids)
    input_ids = torch.full((2, width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, row in enumerate(ids):
        input_ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    raw = np.empty(2, dtype=object)
    raw[:] = ids
    batch = DataProto.from_dict(tensors={
        "input_ids": input_ids,
        "attention_mask": mask
    },
                                non_tensors={
                                    "raw_prompt_ids": raw,
                                    "uid": np.array(["a", "b"], dtype=object)
                                })
    manager = AgentLoopManager(config, [server.address], tokenizer=tokenizer, server_processes=[server])
    out = manager.generate_sequences(batch)
    assert out.batch["responses"].shape == (2, 24) and out.batch["prompts"].shape == (2, 320)
    assert bool((out.batch["response_mask"].sum(-1) > 0).all())
    assert "agent_loop/spawn_calls/mean" in out.meta_info["metrics"]
    assert "agent_loop/child_calls/max" in out.meta_info["metrics"]


# ------------------------------------------------------------------------------------------------ end to end ---
MOCK_LOOP = '''
from recipe.apr.apr_agent_loop import AprAgentLoop
from verl.experimental.agent_loop import register
from verl.workers.rollout.async_server import TokenOutput

SPAWN = "<spawn>\\nUsing the numbers [3, 5], reach 8.\\nUsing the numbers [2, 2], reach 4.\\n</spawn>"


class _FirstParentTurnScripted:
    """The parent's first request returns a spawn block; children and later turns go to the real server."""

    def __init__(self, inner, prompt_ids, spawn_ids):
        self.inner, self.prompt_ids, self.spawn_ids = inner, list(prompt_ids), spawn_ids

    async def generate(self, request_id, *, prompt_ids, sampling_params):
        if list(prompt_ids) == self.prompt_ids:
            ids = self.spawn_ids[:sampling_params["max_new_tokens"]]
            return TokenOutput(token_ids=list(ids), log_probs=[-0.5] * len(ids))
        return await self.inner.generate(request_id, prompt_ids=prompt_ids, sampling_params=sampling_params)


@register("mock_spawning_apr")
class MockSpawningAprAgentLoop(AprAgentLoop):
    async def run(self, sampling_params, **kwargs):
        spawn_ids = self.tokenizer.encode(SPAWN, add_special_tokens=False)
        self.server_manager = _FirstParentTurnScripted(self.server_manager, self._prompt_ids(kwargs), spawn_ids)
        return await super().run(sampling_params, **kwargs)
'''


@pytest.mark.slow
def test_main_hsp_two_steps_with_mock_spawning_first_turn(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "mock_apr_loop.py").write_text(MOCK_LOOP)
    (tmp_path /
     "loops.yaml").write_text("- name: mock_spawning_apr\n  _target_: mock_apr_loop.MockSpawningAprAgentLoop\n")
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update({
        "HOME": str(tmp_path / "home"),
        "VERL_FILE_LOGGER_ROOT": str(tmp_path / "logs"),
        "VERL_DATA_CACHE": str(tmp_path / "data"),
        "PYTHONPATH": os.pathsep.join([str(code), REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
    })
    command = [
        sys.executable, "-m", "recipe.apr.main", "--config-name", "hsp", "trainer.total_training_steps=2",
        "apr.data.train_size=8", "apr.data.test_size=2", "apr.child_token_budget=8", "data.train_batch_size=2",
        "data.max_response_length=64", "actor_rollout_ref.rollout.n=2", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.agent.default_agent_loop=mock_spawning_apr",
        f"actor_rollout_ref.rollout.agent.agent_loop_config_path={tmp_path / 'loops.yaml'}", "trainer.device=cpu",
        "trainer.val_before_train=False", "trainer.test_freq=-1", "trainer.logger=[console,file]",
        "trainer.experiment_name=tiny", f"trainer.default_local_dir={tmp_path / 'ckpt'}",
        f"trainer.rollout_data_dir={tmp_path / 'rollout'}"
    ]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    with open(tmp_path / "logs" / "verl_apr" / "tiny.jsonl", encoding="utf-8") as f:
        logged = [json.loads(line) for line in f if line.strip()]
    train = [r for r in logged if "training/global_step" in r["data"]]
    assert [r["step"] for r in train] == [1, 2]
    for record in train:
        metrics = record["data"]
        assert "actor/pg_loss" in metrics and "critic/score/mean" in metrics
        assert metrics["agent_loop/child_calls/mean"] == 2.0 and metrics["agent_loop/spawn_calls/mean"] == 1.0
        assert metrics["agent_loop/joined_tokens/mean"] > 0
    with open(tmp_path / "rollout" / "1.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert len(rows) == 2 * 2
    assert all("<join>" in r["output"] and "<result>" in r["output"] for r in rows)
    assert all("Start at most" not in r["input"] and "<spawn>" in r["input"] for r in rows)
