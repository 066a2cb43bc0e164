"""FlopsCounter equals the documented formula; device peak table and overrides."""
from __future__ import annotations

import math

import pytest
from transformers import LlamaConfig, Qwen2Config

from verl.utils import flops_counter
from verl.utils.flops_counter import FlopsCounter, get_device_flops
from verl.utils.device import is_cuda_available


def tiny_qwen2_config() -> Qwen2Config:
    # the shape verl.models.tiny builds (vocab rounded up to a multiple of 64)
    return Qwen2Config(vocab_size=640,
                       hidden_size=128,
                       intermediate_size=512,
                       num_hidden_layers=4,
                       num_attention_heads=4,
                       num_key_value_heads=2)


def test_tiny_qwen2_flops_equal_formula():
    counter = FlopsCounter(tiny_qwen2_config())
    # by hand: head_dim 32, q 128, kv 2*32=64
    attn = 128 * (128 + 2 * 64) + 128 * 128  # q/k/v projections + o projection = 49152
    mlp = 3 * 128 * 512  # gate, up, down = 196608
    n_params = 4 * (attn + mlp) + 2 * 640 * 128  # + embedding and LM head = 1146880
    assert counter.dense_params() == n_params == 1146880
    seqlens, seconds = [10, 20, 30], 0.5
    flops = 6 * n_params * 60 + 12 * (10**2 + 20**2 + 30**2) * 32 * 4 * 4
    achieved, promised = counter.estimate_flops(seqlens, seconds)
    assert achieved == pytest.approx(flops / seconds / 1e12, rel=1e-12)
    assert promised > 0


def test_explicit_head_dim_and_gqa_defaults():
    # qwen3-style: head_dim is not hidden / heads
    cfg = Qwen2Config(vocab_size=100,
                      hidden_size=64,
                      intermediate_size=96,
                      num_hidden_layers=2,
                      num_attention_heads=4,
                      num_key_value_heads=1)
    cfg.head_dim = 32
    cfg.model_type = "qwen3"
    counter = FlopsCounter(cfg)
    attn = 64 * (128 + 2 * 32) + 128 * 64
    assert counter.dense_params() == 2 * (attn + 3 * 64 * 96) + 2 * 100 * 64
    achieved, _ = counter.estimate_flops([8], 1.0)
    assert achieved * 1e12 == pytest.approx(6 * counter.dense_params() * 8 + 12 * 64 * 32 * 4 * 2)
    # llama without explicit kv heads: multi-head attention
    llama = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    assert FlopsCounter(llama).dense_params() == 4 * 32 * 32 + 3 * 32 * 64 + 2 * 50 * 32


def test_unknown_model_type_estimates_zero(monkeypatch):
    monkeypatch.setattr(flops_counter, "_warned", set())  # the warning is once per process
    cfg = tiny_qwen2_config()
    cfg.model_type = "some_moe_model"
    with pytest.warns(UserWarning, match="some_moe_model"):
        counter = FlopsCounter(cfg)
    assert counter.estimate_flops([10], 1.0)[0] == 0.0
    with pytest.raises(ValueError, match="delta_time"):
        counter.estimate_flops([10], 0.0)


@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA H20", 148.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A10", 125.0),
    ("NVIDIA L40S", 362.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA B200", 2250.0),
    ("AMD Instinct MI300X", 1307.4),
])
def test_device_table(name, tflops):
    assert flops_counter._table_peak(name) == pytest.approx(tflops * 1e12)


def test_device_flops_units_and_override(monkeypatch):
    monkeypatch.setenv("VERL_DEVICE_PEAK_TFLOPS", "100")
    assert get_device_flops("T") == pytest.approx(100.0)
    assert get_device_flops("G") == pytest.approx(1e5)
    assert get_device_flops("P") == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unit"):
        get_device_flops("X")
    monkeypatch.delenv("VERL_DEVICE_PEAK_TFLOPS")
    peak = get_device_flops("T")
    if not is_cuda_available():  # measured fp32 matmul rate of this CPU
        assert 0 < peak < 1000 and math.isfinite(peak)
