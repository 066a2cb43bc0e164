"""Reward managers on real rollout-shaped DataProtos, decoded by a small tokenizer trained here (no network)."""
import logging
import math
import signal
import time

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from verl.protocol import DataProto
from verl.utils.reward_score import default_compute_score
from verl.workers.reward_manager import (REWARD_MANAGER_REGISTRY, AbstractRewardManager, BatchRewardManager,
                                         DAPORewardManager, NaiveRewardManager, PrimeRewardManager,
                                         get_reward_manager_cls, register)
from verl.workers.reward_manager.dapo import overlong_penalty

PROMPT_LEN, RESP_LEN = 24, 16


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300,
                                  special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["What is 12 + 7? #### 19", "<answer>(1 + 2) * 3</answer> \\boxed{5}"] * 20,
                            trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def make_batch(tokenizer, rows, eos=True, **extra_non_tensors):
    """A rollout-shaped DataProto. rows: (prompt, response, data_source, ground_truth) tuples.

    Prompts are left-padded to PROMPT_LEN, responses (plus EOS) right-padded to RESP_LEN; attention_mask covers both.
    Returns the DataProto and the index of each row's last valid response token.
    """
    pad = tokenizer.pad_token_id
    prompts, responses, masks, last = [], [], [], []
    for prompt, response, _, _ in rows:
        p = tokenizer.encode(prompt, add_special_tokens=False)
        r = tokenizer.encode(response, add_special_tokens=False) + ([tokenizer.eos_token_id] if eos else [])
        assert len(p) <= PROMPT_LEN and len(r) <= RESP_LEN, (prompt, response)
        prompts.append([pad] * (PROMPT_LEN - len(p)) + p)
        responses.append(r + [pad] * (RESP_LEN - len(r)))
        masks.append([0] * (PROMPT_LEN - len(p)) + [1] * len(p) + [1] * len(r) + [0] * (RESP_LEN - len(r)))
        last.append(len(r) - 1)
    prompts_t, responses_t = torch.tensor(prompts), torch.tensor(responses)
    tensors = {
        "prompts": prompts_t,
        "responses": responses_t,
        "input_ids": torch.cat([prompts_t, responses_t], dim=1),
        "attention_mask": torch.tensor(masks),
    }
    non_tensors = {
        "data_source": [r[2] for r in rows],
        "reward_model": [{
            "style": "rule",
            "ground_truth": r[3]
        } for r in rows],
        "extra_info": [{
            "split": "test",
            "index": i
        } for i in range(len(rows))],
        **extra_non_tensors,
    }
    return DataProto.from_dict(tensors=tensors, non_tensors=non_tensors), last


ROWS = [
    ("What is 12 + 7?", "12 + 7 = 19\n#### 19", "arithmetic", "19"),  # right
    ("What is 3 + 4?", "#### 8", "arithmetic", "7"),  # wrong
    ("What is 1 + 1?", "2", "arithmetic", "2"),  # right, bare number, short
    ("Eggs?", "so #### 18", "openai/gsm8k", "18"),  # right
    ("Reach 9", "<answer>(1 + 2) * 3</answer>", "countdown", {
        "target": 9,
        "numbers": [1, 2, 3]
    }),  # right
]
EXPECTED = [1.0, 0.0, 1.0, 1.0, 1.0]


def check_placement(reward, last, expected):
    assert reward.shape == (len(expected), RESP_LEN) and reward.dtype == torch.float32
    for i, (pos, value) in enumerate(zip(last, expected)):
        assert reward[i, pos].item() == pytest.approx(value), i
        rest = torch.cat([reward[i, :pos], reward[i, pos + 1:]])
        assert torch.all(rest == 0), i


# ----------------------------------------------------------------------------------------------------------------------
# registry


def test_registry_names_and_errors():
    assert {"naive", "batch", "dapo", "prime"} <= set(REWARD_MANAGER_REGISTRY)
    assert get_reward_manager_cls("naive") is NaiveRewardManager
    assert get_reward_manager_cls("prime") is PrimeRewardManager
    with pytest.raises(ValueError) as info:
        get_reward_manager_cls("naiv")
    assert "naiv" in str(info.value) and "'naive'" in str(info.value) and "register" in str(info.value)
    with pytest.raises(ValueError, match="already registered"):

        @register("naive")
        class Other(AbstractRewardManager):

            def __call__(self, data, return_dict=False):
                return None

    @register("test_custom_manager")
    class Custom(NaiveRewardManager):
        pass

    try:
        assert get_reward_manager_cls("test_custom_manager") is Custom
    finally:
        REWARD_MANAGER_REGISTRY.pop("test_custom_manager")


# ----------------------------------------------------------------------------------------------------------------------
# naive


def test_naive_scores_at_last_valid_token(tokenizer):
    data, last = make_batch(tokenizer, ROWS)
    assert len(set(last)) > 2  # rows really differ in length
    reward = NaiveRewardManager(tokenizer, num_examine=0)(data)
    check_placement(reward, last, EXPECTED)


def test_naive_passes_decoded_strings_and_copies_extra_info(tokenizer):
    seen = []

    def fn(data_source, solution_str, ground_truth, extra_info=None):
        seen.append((data_source, solution_str, ground_truth, dict(extra_info)))
        extra_info["mutated"] = True  # must not leak into other rows or the batch
        return 0.5

    shared = {"split": "train"}
    data, last = make_batch(tokenizer, ROWS[:2], __num_turns__=[2, 3])
    data.non_tensor_batch["extra_info"] = np.array([shared, shared], dtype=object)  # rows share one dict (repeat)
    out = NaiveRewardManager(tokenizer, 0, compute_score=fn)(data, return_dict=True)
    assert seen[0] == ("arithmetic", "12 + 7 = 19\n#### 19", "19", {"split": "train", "num_turns": 2})
    assert seen[1] == ("arithmetic", "#### 8", "7", {"split": "train", "num_turns": 3})
    assert shared == {"split": "train"}
    check_placement(out["reward_tensor"], last, [0.5, 0.5])
    assert out["reward_extra_info"] == {}


def test_naive_return_dict_extra_info_aligned(tokenizer):
    rows = [
        ("Q", "\\boxed{5}", "math_dapo", "5"),
        ("Q", "#### 3", "openai/gsm8k", "3"),
        ("Q", "\\boxed{4}", "math_dapo", "5"),
    ]
    data, last = make_batch(tokenizer, rows)
    out = NaiveRewardManager(tokenizer, 0)(data, return_dict=True)
    check_placement(out["reward_tensor"], last, [1.0, 1.0, -1.0])
    info = out["reward_extra_info"]
    assert info["score"] == [1.0, 1.0, -1.0]
    assert info["acc"][0] is True and info["acc"][2] is False and math.isnan(info["acc"][1])
    assert info["pred"] == ["5", None, "4"]


def test_rm_scores_are_returned_as_is(tokenizer):
    data, _ = make_batch(tokenizer, ROWS[:2])
    rm = torch.rand(2, RESP_LEN)
    data.batch["rm_scores"] = rm
    data.non_tensor_batch["acc"] = np.array([1, 0], dtype=object)
    data.meta_info["reward_extra_keys"] = ["acc"]
    for cls in (NaiveRewardManager, BatchRewardManager, DAPORewardManager, PrimeRewardManager):
        manager = cls(tokenizer, 0)
        assert torch.equal(manager(data), rm)
        out = manager(data, return_dict=True)
        assert torch.equal(out["reward_tensor"], rm) and list(out["reward_extra_info"]["acc"]) == [1, 0]


def test_raising_reward_fn_gives_error_score_and_warning(tokenizer, caplog):

    def fn(data_source, solution_str, ground_truth, extra_info=None):
        if extra_info["index"] == 1:
            raise KeyError("boom")
        if extra_info["index"] == 3:
            return float("nan")
        if extra_info["index"] == 4:
            return "1.0"
        return 1.0

    data, last = make_batch(tokenizer, ROWS)
    with caplog.at_level(logging.WARNING):
        reward = NaiveRewardManager(tokenizer, 0, compute_score=fn, error_score=-0.5)(data)
    check_placement(reward, last, [1.0, -0.5, 1.0, -0.5, -0.5])
    messages = [r.getMessage() for r in caplog.records]
    assert any("sample 1" in m and "KeyError" in m and "boom" in m and "-0.5" in m for m in messages)
    assert any("sample 3" in m and "non-finite" in m for m in messages)
    assert any("sample 4" in m and "TypeError" in m for m in messages)


def test_many_errors_are_summarised(tokenizer, caplog):

    def fn(**kwargs):
        raise RuntimeError("always")

    rows = [("Q", f"#### {i}", "arithmetic", "1") for i in range(8)]
    data, _ = make_batch(tokenizer, rows)
    with caplog.at_level(logging.WARNING):
        NaiveRewardManager(tokenizer, 0, compute_score=fn)(data)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("always" in m for m in messages) == 5
    assert any("8 samples" in m and "RuntimeError" in m for m in messages)


def test_naive_timeout(tokenizer, caplog):

    def fn(data_source, solution_str, ground_truth, extra_info=None):
        if extra_info["index"] == 0:
            time.sleep(10)
        return 1.0

    data, last = make_batch(tokenizer, ROWS[:2])
    # pytest-timeout may hold SIGALRM itself: the manager must hand it back (handler and remaining time)
    handler_before = signal.getsignal(signal.SIGALRM)
    signal.setitimer(signal.ITIMER_REAL, 60.0)
    try:
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING):
            reward = NaiveRewardManager(tokenizer, 0, compute_score=fn, timeout_s=0.2, error_score=-1.0)(data)
        assert time.monotonic() - t0 < 3
        assert signal.getsignal(signal.SIGALRM) is handler_before
        assert 50 < signal.getitimer(signal.ITIMER_REAL)[0] <= 60
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, handler_before)
    check_placement(reward, last, [-1.0, 1.0])
    assert any("sample 0" in r.getMessage() and "RewardTimeoutError" in r.getMessage() for r in caplog.records)


def test_num_examine_prints_per_data_source(tokenizer, capsys):
    data, _ = make_batch(tokenizer, ROWS)
    NaiveRewardManager(tokenizer, num_examine=1)(data)
    out = capsys.readouterr().out
    assert out.count("[prompt]") == 3  # arithmetic, openai/gsm8k, countdown: one each
    assert "What is 12 + 7?" in out and "What is 3 + 4?" not in out
    NaiveRewardManager(tokenizer, num_examine=0)(data)
    assert capsys.readouterr().out == ""


def test_empty_response_scores_at_column_zero(tokenizer):
    data, _ = make_batch(tokenizer, [("Q", "", "arithmetic", "1"), ("Q", "#### 1", "arithmetic", "1")], eos=False)
    reward = NaiveRewardManager(tokenizer, 0, compute_score=lambda **kw: 0.7)(data)
    assert reward[0, 0].item() == pytest.approx(0.7) and reward[0, 1:].abs().sum() == 0


def test_bad_batches_raise_clear_errors(tokenizer):
    manager = NaiveRewardManager(tokenizer, 0)
    data, _ = make_batch(tokenizer, ROWS[:2])
    no_rm = DataProto.from_dict(tensors=dict(data.batch.items()), non_tensors={"data_source": ["a", "b"]})
    with pytest.raises(KeyError, match="reward_model"):
        manager(no_rm)
    with pytest.raises(KeyError, match="'task'.*reward_fn_key"):
        NaiveRewardManager(tokenizer, 0, reward_fn_key="task")(data)
    no_gt = DataProto.from_dict(tensors=dict(data.batch.items()),
                                non_tensors={
                                    "data_source": ["a", "b"],
                                    "reward_model": [{
                                        "style": "rule"
                                    }, {
                                        "style": "rule"
                                    }]
                                })
    with pytest.raises(KeyError, match="row 0.*ground_truth"):
        manager(no_gt)
    no_responses = DataProto.from_dict(tensors={"prompts": data.batch["prompts"]},
                                       non_tensors=dict(data.non_tensor_batch))
    with pytest.raises(KeyError, match="responses.*generate_sequences"):
        manager(no_responses)
    bad_mask = DataProto.from_dict(tensors={
        **dict(data.batch.items()), "attention_mask": data.batch["attention_mask"][:, :-1]
    },
                                   non_tensors=dict(data.non_tensor_batch))
    with pytest.raises(ValueError, match="attention_mask has"):
        manager(bad_mask)
    bad_info = make_batch(tokenizer, ROWS[:2])[0]
    bad_info.non_tensor_batch["extra_info"] = np.array(["x", "y"], dtype=object)
    with pytest.raises(TypeError, match="extra_info of row 0"):
        manager(bad_info)


# ----------------------------------------------------------------------------------------------------------------------
# batch


def test_batch_manager_calls_once_with_lists(tokenizer):
    calls = []

    def batch_fn(data_sources, solution_strs, ground_truths, extra_infos, scale=1.0):
        calls.append(len(solution_strs))
        return [scale * len(s) if i % 2 else {"score": scale, "n": i} for i, s in enumerate(solution_strs)]

    data, last = make_batch(tokenizer, ROWS)
    out = BatchRewardManager(tokenizer, 0, compute_score=batch_fn, scale=2.0)(data, return_dict=True)
    assert calls == [len(ROWS)]
    lengths = [len(r[1]) for r in ROWS]
    check_placement(out["reward_tensor"], last, [2.0, 2.0 * lengths[1], 2.0, 2.0 * lengths[3], 2.0])
    assert out["reward_extra_info"]["n"][0] == 0 and math.isnan(out["reward_extra_info"]["n"][1])


def test_batch_manager_default_scoring(tokenizer):
    data, last = make_batch(tokenizer, ROWS)
    check_placement(BatchRewardManager(tokenizer, 0)(data), last, EXPECTED)
    manager = BatchRewardManager(tokenizer, 0, compute_score=default_compute_score)
    check_placement(manager(data), last, EXPECTED)


def test_batch_manager_failures(tokenizer, caplog):
    data, last = make_batch(tokenizer, ROWS[:3])

    def raises(**kwargs):
        raise ValueError("server down")

    with caplog.at_level(logging.WARNING):
        reward = BatchRewardManager(tokenizer, 0, compute_score=raises, error_score=-2.0)(data)
    check_placement(reward, last, [-2.0] * 3)
    assert any("server down" in r.getMessage() and "ValueError" in r.getMessage() for r in caplog.records)

    def partly_bad(**kwargs):
        return [1.0, None, 0.5]

    check_placement(BatchRewardManager(tokenizer, 0, compute_score=partly_bad)(data), last, [1.0, 0.0, 0.5])
    with pytest.raises(ValueError, match="returned 2 items for a batch of 3"):
        BatchRewardManager(tokenizer, 0, compute_score=lambda **kw: [1.0, 1.0])(data)


# ----------------------------------------------------------------------------------------------------------------------
# dapo


def test_overlong_penalty_numbers():
    # max 16, buffer 4: no penalty up to 12 tokens, then -factor * (n - 12) / 4
    assert [overlong_penalty(n, 16, 4, 1.0) for n in (5, 12, 13, 14, 16)] == [0.0, 0.0, -0.25, -0.5, -1.0]
    assert overlong_penalty(14, 16, 4, 0.5) == -0.25


def test_dapo_manager_applies_penalty(tokenizer):
    rows = [("Q", "1 " * k + "#### 19", "arithmetic", "19") for k in (0, 8, 10, 12)]
    data, last = make_batch(tokenizer, rows)
    assert [p + 1 for p in last] == [4, 11, 13, 15]  # response lengths incl. EOS
    # max_resp_len 16, buffer 4: free up to 12 tokens, then -(n - 12) / 4 * factor
    penalties = [0.0, 0.0, -0.25, -0.75]
    cfg = {"enable": True, "len": 4, "penalty_factor": 1.0, "log": True}
    out = DAPORewardManager(tokenizer, 0, max_resp_len=RESP_LEN, overlong_buffer_cfg=cfg)(data, return_dict=True)
    check_placement(out["reward_tensor"], last, [1.0 + p for p in penalties])
    assert out["reward_extra_info"]["overlong_reward"] == pytest.approx(penalties)
    assert out["reward_extra_info"]["overlong"] == [False, False, True, True]
    cfg = OmegaConf.create({"enable": True, "len": 8, "penalty_factor": 0.5, "log": False})
    out = DAPORewardManager(tokenizer, 0, max_resp_len=RESP_LEN, overlong_buffer_cfg=cfg)(data, return_dict=True)
    check_placement(out["reward_tensor"], last, [1.0, 1.0 - 0.1875, 1.0 - 0.3125, 1.0 - 0.4375])
    assert out["reward_extra_info"] == {}
    # disabled buffer: plain scores
    plain = DAPORewardManager(tokenizer, 0, max_resp_len=RESP_LEN, overlong_buffer_cfg={"enable": False})(data)
    check_placement(plain, last, [1.0] * 4)


def test_dapo_config_errors(tokenizer):
    with pytest.raises(ValueError, match="max_resp_len"):
        DAPORewardManager(tokenizer, 0, overlong_buffer_cfg={"enable": True, "len": 4})
    with pytest.raises(ValueError, match="overlong_buffer_cfg.len"):
        DAPORewardManager(tokenizer, 0, max_resp_len=16, overlong_buffer_cfg={"enable": True, "len": 0})
    with pytest.raises(ValueError, match="overlong_buffer_cfg.len"):
        DAPORewardManager(tokenizer, 0, max_resp_len=16, overlong_buffer_cfg={"enable": True, "len": 32})


# ----------------------------------------------------------------------------------------------------------------------
# prime


def test_prime_scores_in_parallel(tokenizer):
    data, last = make_batch(tokenizer, ROWS)
    manager = PrimeRewardManager(tokenizer, 0, num_workers=2, timeout_s=20)
    out = manager(data, return_dict=True)
    check_placement(out["reward_tensor"], last, EXPECTED)
    assert data.batch["acc"].tolist() == EXPECTED


def _slow_or_raising(data_source, solution_str, ground_truth, extra_info=None):
    i = extra_info["index"]
    if i == 0:
        time.sleep(30)  # the in-worker alarm interrupts this
    if i == 1:
        signal.signal(signal.SIGALRM, signal.SIG_IGN)  # like a C call that never checks signals
        time.sleep(30)
    if i == 2:
        raise ZeroDivisionError("bad sample")
    return 1.0


def test_prime_timeout_and_errors_give_error_score(tokenizer, caplog):
    data, last = make_batch(tokenizer, ROWS)
    manager = PrimeRewardManager(tokenizer,
                                 0,
                                 compute_score=_slow_or_raising,
                                 num_workers=3,
                                 timeout_s=0.5,
                                 error_score=-1.0)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING):
        reward = manager(data)
    assert time.monotonic() - t0 < 8
    check_placement(reward, last, [-1.0, -1.0, -1.0, 1.0, 1.0])
    messages = [r.getMessage() for r in caplog.records]
    assert any("sample 0" in m and "RewardTimeoutError" in m for m in messages)
    assert any("sample 1" in m and "RewardTimeoutError" in m and "killed" in m for m in messages)
    assert any("sample 2" in m and "ZeroDivisionError" in m and "bad sample" in m for m in messages)


def test_prime_accepts_closures_and_checks_args(tokenizer):
    offset = 0.25
    data, last = make_batch(tokenizer, ROWS[:2])
    reward = PrimeRewardManager(tokenizer, 0, compute_score=lambda **kw: offset, num_workers=2, timeout_s=10)(data)
    check_placement(reward, last, [0.25, 0.25])
    with pytest.raises(ValueError, match="timeout_s"):
        PrimeRewardManager(tokenizer, 0, timeout_s=0)
    with pytest.raises(ValueError, match="mp_start_method"):
        PrimeRewardManager(tokenizer, 0, mp_start_method="threads")
    with pytest.raises(TypeError, match="cannot be pickled"):
        PrimeRewardManager(tokenizer, 0, compute_score=lambda **kw: 1.0, mp_start_method="spawn")


def test_custom_reward_file_with_naive_and_prime(tokenizer, tmp_path):
    from verl.utils.reward_score.custom import get_custom_reward_fn

    path = tmp_path / "user_reward.py"
    path.write_text("def length_reward(data_source, solution_str, ground_truth, extra_info=None, per_char=0.0):\n"
                    "    return {'score': per_char * len(solution_str), 'chars': len(solution_str)}\n")
    fn = get_custom_reward_fn(
        {"custom_reward_function": {
            "path": str(path),
            "name": "length_reward",
            "reward_kwargs": {
                "per_char": 0.5
            }
        }})
    data, last = make_batch(tokenizer, ROWS[:3])
    expected = [0.5 * len(r[1]) for r in ROWS[:3]]
    for manager in (NaiveRewardManager(tokenizer, 0, compute_score=fn),
                    PrimeRewardManager(tokenizer, 0, compute_score=fn, num_workers=2, timeout_s=10)):
        out = manager(data, return_dict=True)
        check_placement(out["reward_tensor"], last, expected)
        assert out["reward_extra_info"]["chars"] == [len(r[1]) for r in ROWS[:3]]
