"""``actor_rollout_ref.rollout.mode=async`` end to end on CPU: ``verl.trainer.main_ppo`` with a local Ray cluster, the
actor worker launching the HF rollout server (``verl.workers.fsdp_async_workers``), the agent-loop manager in the
trainer, and the actor's weights pushed to the server before each generation that follows an update.

* single-turn GRPO, 2 steps: metrics logged, rollouts dumped, and the server's ``weight_version`` (what the server
  answers to each weight push) advances between steps;
* multi-turn GRPO with the calculator tool (tool config yaml, ``data.return_raw_chat``), 2 steps. The random tiny
  policy practically never writes a well-formed ``<tool_call>``, so the agent loop used here
  (``mock_first_turn_tool_agent``) is the real ``tool_agent`` whose *first* assistant turn is a scripted calculator
  call instead of a server sample; everything after it (tool schema in the prompt, parsing, running the tool,
  feeding the answer back, later turns sampled by the server, masks, training) is the real path. The batch the
  trainer trains on is recorded through a curriculum sampler's ``update(batch)``: tool-answer tokens have
  ``response_mask`` 0 while the sampled tokens have 1.

One Ray cluster serves the module.
"""
from __future__ import annotations

import json
import os

import pytest
import ray
from hydra import compose, initialize_config_dir

import verl
from verl.models.tiny import get_tiny_model_path
from verl.single_controller.ray.utils import local_ray_init_kwargs
from verl.trainer.main_ppo import run_ppo
from verl.utils.dataset.tasks import write_arithmetic_task

CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")

SCRIPTED_LOOP = '''
from verl.experimental.agent_loop.tool_agent_loop import ToolAgentLoop
from verl.workers.rollout.async_server import TokenOutput

CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call><|im_end|>'


class _FirstTurnScripted:
    """The first request of a conversation returns the scripted tool call; later turns go to the real server."""

    def __init__(self, inner, call_ids):
        self.inner, self.call_ids, self.seen = inner, call_ids, set()

    async def generate(self, request_id, *, prompt_ids, sampling_params):
        if request_id not in self.seen:
            self.seen.add(request_id)
            return TokenOutput(token_ids=list(self.call_ids), log_probs=[0.0] * len(self.call_ids))
        return await self.inner.generate(request_id, prompt_ids=prompt_ids, sampling_params=sampling_params)


class MockFirstTurnToolAgentLoop(ToolAgentLoop):
    def __init__(self, trainer_config, server_manager, tokenizer, **kwargs):
        call_ids = tokenizer.encode(CALL, add_special_tokens=False)
        super().__init__(trainer_config, _FirstTurnScripted(server_manager, call_ids), tokenizer, **kwargs)
'''

RECORDING_SAMPLER = '''
import json
from verl.utils.dataset.sampler import AbstractCurriculumSampler


class RecordingSampler(AbstractCurriculumSampler):
    """Records, per trained row, the masks of its response and the text of its masked-out (fed-back) tokens."""
    LOG = {log!r}
    TOKENIZER = {tokenizer!r}

    def __init__(self, data_source, data_config):
        self.size = len(data_source)

    def __iter__(self):
        return iter(range(self.size))

    def __len__(self):
        return self.size

    def update(self, batch):
        from verl.workers.config_helpers import load_tokenizer

        tok = load_tokenizer(self.TOKENIZER)
        resp = batch.batch["responses"]
        width = resp.shape[1]
        attn = batch.batch["attention_mask"][:, -width:]
        mask = batch.batch["response_mask"]
        with open(self.LOG, "a") as f:
            for i in range(len(batch)):
                real = attn[i].bool()
                fed = real & (mask[i] == 0)
                f.write(json.dumps({{
                    "num_turns": int(batch.non_tensor_batch["__num_turns__"][i]),
                    "mask_outside_attention": int(((mask[i] == 1) & ~real).sum()),
                    "sampled": int(mask[i].sum()),
                    "fed_back": int(fed.sum()),
                    "fed_back_text": tok.decode(resp[i][fed].tolist()),
                    "prompt_text": tok.decode(batch.batch["prompts"][i].tolist(), skip_special_tokens=True),
                    "has_advantages": "advantages" in batch.batch.keys(),
                }}) + "\\n")
'''

TOOL_CONFIG = """tools:
  - class_name: verl.tools.calculator_tool.CalculatorTool
    config: {type: native}
"""

AGENT_LOOPS = """- name: mock_first_turn_tool_agent
  _target_: scripted_tool_loop.MockFirstTurnToolAgentLoop
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("async_rollout")
    paths = write_arithmetic_task(str(root / "data"), train_size=8, test_size=2)
    model = get_tiny_model_path()
    code = root / "code"
    code.mkdir()
    (code / "scripted_tool_loop.py").write_text(SCRIPTED_LOOP)
    mp = pytest.MonkeyPatch()
    mp.setenv("VERL_FILE_LOGGER_ROOT", str(root / "logs"))  # inherited by the Ray processes started below
    mp.setenv("PYTHONPATH", os.pathsep.join([str(code)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    ray.init(**local_ray_init_kwargs(num_cpus=4))
    try:
        yield {"root": root, "train": paths["train"], "test": paths["test"], "model": model}
    finally:
        ray.shutdown()
        mp.undo()


def _overrides(env, name: str, prompt_len: int, response_len: int) -> list[str]:
    out = env["root"] / name
    return [
        f"data.train_files={env['train']}",
        f"data.val_files={env['test']}",
        "data.train_batch_size=4",
        f"data.max_prompt_length={prompt_len}",
        f"data.max_response_length={response_len}",
        f"actor_rollout_ref.model.path={env['model']}",
        "actor_rollout_ref.model.enable_gradient_checkpointing=False",
        "actor_rollout_ref.actor.use_torch_compile=False",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.actor.optim.lr=1e-3",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.rollout.mode=async",
        "actor_rollout_ref.rollout.n=2",
        "algorithm.adv_estimator=grpo",
        "trainer.n_gpus_per_node=1",
        "trainer.total_training_steps=2",
        "trainer.save_freq=-1",
        "trainer.device=cpu",
        "trainer.logger=[file]",
        "trainer.project_name=verl_test",
        f"trainer.experiment_name={name}",
        f"trainer.default_local_dir={out / 'ckpt'}",
        f"trainer.rollout_data_dir={out / 'rollout'}",
    ]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


def _jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _train_metrics(env, name: str) -> list[dict]:
    logged = _jsonl(env["root"] / "logs" / "verl_test" / f"{name}.jsonl")
    return [r for r in logged if "training/global_step" in r["data"]]


@pytest.mark.slow
def test_async_single_turn_grpo_pushes_weights_every_step(env):
    name = "async_single"
    run_ppo(_compose(_overrides(env, name, 32, 8) + ["trainer.test_freq=-1", "trainer.val_before_train=True"]))

    train = _train_metrics(env, name)
    assert [r["step"] for r in train] == [1, 2]
    for record in train:
        metrics = record["data"]
        for key in ("actor/pg_loss", "critic/score/mean", "timing_s/gen", "timing_s/update_actor",
                    "agent_loop/num_turns/mean", "rollout/weight_version"):
            assert key in metrics, f"missing metric {key}; logged: {sorted(metrics)}"
    versions = [r["data"]["rollout/weight_version"] for r in train]
    # pushed once before the first generation (validation), and again after step 1's update
    assert versions[0] >= 1 and versions[1] > versions[0], versions
    assert "timing_s/update_rollout_weights" in train[1]["data"]
    for step in (1, 2):
        rows = _jsonl(env["root"] / name / "rollout" / f"{step}.jsonl")
        assert len(rows) == 4 * 2 and all(isinstance(r["score"], float) for r in rows)


@pytest.mark.slow
def test_async_multi_turn_grpo_with_calculator_mock_first_turn(env):
    name = "async_tool"
    out = env["root"] / name
    out.mkdir()
    tool_config = out / "tools.yaml"
    tool_config.write_text(TOOL_CONFIG)
    agent_loops = out / "agent_loops.yaml"
    agent_loops.write_text(AGENT_LOOPS)
    sampler = out / "recording.py"
    sampler.write_text(RECORDING_SAMPLER.format(log=str(out / "trained.jsonl"), tokenizer=env["model"]))
    run_ppo(
        _compose(
            _overrides(env, name, 384, 96) + [
                "data.return_raw_chat=True",
                f"data.sampler.class_path={sampler}",
                "data.sampler.class_name=RecordingSampler",
                "actor_rollout_ref.rollout.multi_turn.enable=True",
                f"actor_rollout_ref.rollout.multi_turn.tool_config_path={tool_config}",
                "actor_rollout_ref.rollout.multi_turn.max_assistant_turns=2",
                f"actor_rollout_ref.rollout.agent.agent_loop_config_path={agent_loops}",
                "actor_rollout_ref.rollout.agent.default_agent_loop=mock_first_turn_tool_agent",
                "trainer.val_before_train=False",
                "trainer.test_freq=-1",
            ]))

    train = _train_metrics(env, name)
    assert [r["step"] for r in train] == [1, 2]
    assert all(r["data"]["agent_loop/tool_calls/mean"] == 1.0 for r in train)
    rows = _jsonl(out / "trained.jsonl")
    assert len(rows) == 2 * 4 * 2
    for row in rows:
        assert row["has_advantages"]
        assert "calculator" in row["prompt_text"]  # the tool schema reached the prompt
        assert row["mask_outside_attention"] == 0
        # scripted call (sampled, mask 1) -> the tool's answer (fed back, mask 0) -> a second sampled turn
        assert row["num_turns"] == 4
        assert row["fed_back"] > 0 and "<tool_response>\n42\n</tool_response>" in row["fed_back_text"]
        assert row["sampled"] > 0
