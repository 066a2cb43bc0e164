"""The self-built tiny Qwen2 model: fast to build, loadable by the Auto classes, deterministic, cache-safe."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification, AutoTokenizer)

from verl.models.tiny import build_tiny_model, get_tiny_model_path, main

_COMPARED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _read(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "model"
    start = time.perf_counter()
    path = build_tiny_model(str(out), seed=0)
    return path, time.perf_counter() - start


def test_builds_fast_with_hf_layout(built):
    path, seconds = built
    assert seconds < 60, f"tiny model took {seconds:.1f}s to build"
    for name in _COMPARED_FILES + ("generation_config.json",):
        assert os.path.isfile(os.path.join(path, name)), name
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "qwen2"
    assert config.architectures == ["Qwen2ForCausalLM"]
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention, as in Qwen2
    n_params = sum(t.numel() for t in load_file(os.path.join(path, "model.safetensors")).values())
    assert 5e5 < n_params < 1e7


def test_roundtrip_from_pretrained_same_logits(built, tmp_path):
    path, _ = built
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    # the loaded weights are the saved ones (not a fresh init)
    saved = load_file(os.path.join(path, "model.safetensors"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    ids = tokenizer(["What is 12 + 35?", "Natalia sold 48 clips."], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape[:2] == ids["input_ids"].shape and logits.shape[-1] == model.config.vocab_size
    assert torch.isfinite(logits).all()

    model.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        assert torch.equal(again(**ids).logits, logits)
        out = again.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    prompt_len = ids["input_ids"].shape[1]
    assert out.shape[0] == 2 and prompt_len < out.shape[1] <= prompt_len + 5
    assert torch.equal(out[:, :prompt_len], ids["input_ids"])


def test_tokenizer_special_tokens_and_chat_template(built):
    path, _ = built
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id != tok.pad_token_id
    assert tok.convert_tokens_to_ids("<|im_start|>") not in (None, tok.unk_token_id)
    assert len(tok) <= AutoConfig.from_pretrained(path).vocab_size
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 7 + 8?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 7 + 8?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    no_gen = tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert text.startswith(no_gen) and not no_gen.endswith("assistant\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.eos_token_id in ids
    assert tok.decode(ids) == text


def test_chat_template_renders_tools_and_tool_calls(built):
    tok = AutoTokenizer.from_pretrained(built[0])
    tools = [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}]
    messages = [
        {
            "role": "system",
            "content": "Use tools."
        },
        {
            "role": "user",
            "content": "What is 6 * 7?"
        },
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{
                "type": "function",
                "function": {
                    "name": "calc",
                    "arguments": '{"e": "6*7"}'
                }
            }]
        },
        {
            "role": "tool",
            "content": "42"
        },
        {
            "role": "assistant",
            "content": "#### 42"
        },
    ]
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    assert text.startswith("<|im_start|>system\nUse tools.\n\n") and text.count("<|im_start|>system") == 1
    assert '\n<tools>\n{"type": "function", "function": {"name": "calc"' in text
    assert '<|im_start|>assistant\n\n<tool_call>{"name": "calc", "arguments": {"e": "6*7"}}</tool_call><|im_end|>\n' in text
    assert "<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n#### 42<|im_end|>\n")
    # arguments given as a dict render as JSON too
    messages[2]["tool_calls"][0]["function"]["arguments"] = {"e": "6*7"}
    assert tok.apply_chat_template(messages, tools=tools, tokenize=False) == text


def test_tokenizer_splits_digits_and_matches_tokenizer_json(built):
    path, _ = built
    tok = AutoTokenizer.from_pretrained(path)
    raw = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    assert tok.tokenize("12345") == ["1", "2", "3", "4", "5"]
    samples = [
        "What is 98 - 47? #### 51", "Using the numbers [3, 7, 25], reach 46. <answer>(25 - 3) + 7 * 3</answer>",
        "Compute $\\frac{1}{2} + \\boxed{7}$.", "  spaces\n\nand ünïcode 日本 text <|im_end|>"
    ]
    for text in samples:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == raw.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids) == text
    # the trained vocabulary learned something: common words are single tokens
    assert len(tok.tokenize(" answer")) == 1


def test_deterministic_for_a_seed(built, tmp_path):
    path, _ = built
    same = build_tiny_model(str(tmp_path / "same"), seed=0)
    other = build_tiny_model(str(tmp_path / "other"), seed=1)
    for name in _COMPARED_FILES:
        assert _read(os.path.join(path, name)) == _read(os.path.join(same, name)), name
    assert _read(os.path.join(path, "model.safetensors")) != _read(os.path.join(other, "model.safetensors"))


@pytest.mark.parametrize("variant,auto_cls,shape", [
    ("value", AutoModelForTokenClassification, lambda b, t: (b, t, 1)),
    ("reward", AutoModelForSequenceClassification, lambda b, t: (b, 1)),
])
def test_value_and_reward_variants_load(tmp_path, variant, auto_cls, shape):
    path = build_tiny_model(str(tmp_path / variant), seed=0, variant=variant)
    tok = AutoTokenizer.from_pretrained(path)
    model = auto_cls.from_pretrained(path).eval()
    assert model.config.num_labels == 1
    ids = tok(["What is 1 + 1?", "hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == shape(*ids["input_ids"].shape)
    assert torch.isfinite(logits).all()


def test_unknown_variant_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="causal_lm"):
        build_tiny_model(str(tmp_path / "x"), variant="critic")


def test_concurrent_cache_builds_in_separate_processes_match(built, tmp_path):
    """Separate processes (other hash seeds) build byte-identical models; racing cache builds both succeed, also as
    ranks of one initialised process group (transformers then saves on rank 0 only, unless told otherwise)."""
    path, _ = built
    cache = tmp_path / "cache"
    env = dict(os.environ,
               PYTHONHASHSEED="random",
               OMP_NUM_THREADS="1",
               MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()),
               WORLD_SIZE="2")
    code = ("import torch.distributed as dist; dist.init_process_group('gloo'); "
            "from verl.models.tiny import get_tiny_model_path; print(get_tiny_model_path(cache_dir=%r)); "
            "dist.barrier(); dist.destroy_process_group()" % str(cache))
    procs = [
        subprocess.Popen([sys.executable, "-c", code],
                         stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE,
                         env=dict(env, RANK=str(rank))) for rank in range(2)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
        results.append(out.decode().strip().splitlines()[-1])
    assert results[0] == results[1]
    assert sorted(os.listdir(cache)) == [os.path.basename(results[0])]  # no temporary build dirs left behind
    for name in _COMPARED_FILES:
        assert _read(os.path.join(results[0], name)) == _read(os.path.join(path, name)), name
    # a second request is served from the cache without rebuilding
    start = time.perf_counter()
    assert get_tiny_model_path(cache_dir=str(cache)) == results[0]
    assert time.perf_counter() - start < 5


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli(built, tmp_path, capsys):
    main(["--out", str(tmp_path / "cli"), "--seed", "0", "--variant", "causal_lm"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    for name in _COMPARED_FILES:
        assert _read(os.path.join(tmp_path / "cli", name)) == _read(os.path.join(built[0], name)), name
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--variant", "critic"])


def test_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("VERL_TINY_MODEL_CACHE", str(tmp_path / "envcache"))
    path = get_tiny_model_path(variant="reward")
    assert path.startswith(str(tmp_path / "envcache"))
    assert json.load(open(os.path.join(path, "config.json")))["architectures"] == ["Qwen2ForSequenceClassification"]


def test_incomplete_cache_entry_is_rebuilt(tmp_path):
    """An entry without config.json (an interrupted or foreign write) is replaced, not trusted or fatal."""
    cache = str(tmp_path / "cache")
    path = get_tiny_model_path(cache_dir=cache)
    os.remove(os.path.join(path, "config.json"))
    os.remove(os.path.join(path, "model.safetensors"))
    assert get_tiny_model_path(cache_dir=cache) == path
    assert os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, "model.safetensors"))
    assert sorted(os.listdir(cache)) == [os.path.basename(path)]
