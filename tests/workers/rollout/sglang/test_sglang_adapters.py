"""The parts of the SGLang engine adapters that need no SGLang: server command lines, failures SGLang reports as
``success=False`` becoming errors, an unreachable server address, and the address a remote server is told to reach
the weight-update group at."""
from __future__ import annotations

import socket

import pytest

from verl.workers.rollout.sglang_rollout.engine import (HttpServerEngine, SGLangEngineError, SGLangServerError, _check,
                                                        server_cli_args)
from verl.workers.sharding_manager.fsdp_sglang import _address_towards


def test_server_cli_args():
    args = server_cli_args({
        "model_path": "/m",
        "tp_size": 2,
        "disable_cuda_graph": True,
        "skip_tokenizer_init": False,
        "context_length": None,
        "cuda_graph_bs": [1, 2],
        "json_model_override_args": {
            "a": 1
        }
    })
    assert args == [
        "--model-path", "/m", "--tp-size", "2", "--disable-cuda-graph", "--cuda-graph-bs", "1", "2",
        "--json-model-override-args", '{"a": 1}'
    ]


def test_failed_sglang_calls_raise():
    assert _check((True, "Success"), "x") == (True, "Success")
    _check({"success": True}, "x")
    _check(None, "x")  # calls that return nothing
    with pytest.raises(SGLangEngineError, match="update_weights_from_tensor failed: must run between"):
        _check((False, "must run between begin_weight_update() and end_weight_update()"), "update_weights_from_tensor")
    with pytest.raises(SGLangEngineError, match="update_weights_from_disk failed: no loader"):
        _check({"success": False, "message": "no loader"}, "update_weights_from_disk")


def test_unreachable_server_address_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    with pytest.raises(SGLangServerError, match=rf"no healthy SGLang server at http://127.0.0.1:{port}.*Fix:"):
        HttpServerEngine(address=f"127.0.0.1:{port}")


def test_weight_group_address_towards_the_server():
    assert _address_towards(None) == "127.0.0.1"
    assert _address_towards("http://localhost:30000") == "127.0.0.1"
    assert _address_towards("http://127.0.0.1:30000") == "127.0.0.1"
    address = _address_towards("http://10.255.255.1:30000")
    socket.inet_aton(address)  # an IPv4 address of this machine
