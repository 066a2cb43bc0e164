"""custom_reward_function.{path, name, reward_kwargs}: loading a user's file, and each way it can go wrong."""
import pickle
import textwrap

import pytest
from omegaconf import OmegaConf

from verl.utils.reward_score.custom import CustomRewardFunctionError, get_custom_reward_fn, load_extern_object

USER_FILE = textwrap.dedent("""
    import dataclasses

    @dataclasses.dataclass
    class Verdict:
        ok: bool

    def compute_score(data_source, solution_str, ground_truth, extra_info=None, bonus=0.0):
        return float(solution_str.strip() == ground_truth) + bonus

    def my_reward(data_source, solution_str, ground_truth, extra_info=None):
        return {"score": 0.5, "len": len(solution_str), "verdict": Verdict(True).ok}

    NOT_A_FUNCTION = 3
""")


def _config(path, name=None, reward_kwargs=None):
    section = {"path": str(path) if path is not None else None, "name": name}
    if reward_kwargs is not None:
        section["reward_kwargs"] = reward_kwargs
    return OmegaConf.create({"custom_reward_function": section})


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(USER_FILE)
    return path


def test_no_path_means_no_custom_fn():
    assert get_custom_reward_fn(_config(None)) is None
    assert get_custom_reward_fn(OmegaConf.create({})) is None
    assert get_custom_reward_fn({"custom_reward_function": {"path": ""}}) is None


def test_default_name_and_explicit_name(user_file):
    fn = get_custom_reward_fn(_config(user_file))
    assert fn("x", "42", "42") == 1.0
    assert fn("x", "41", "42") == 0.0
    other = get_custom_reward_fn({"custom_reward_function": {"path": str(user_file), "name": "my_reward"}})
    assert other("x", "abc", "y") == {"score": 0.5, "len": 3, "verdict": True}


def test_reward_kwargs_are_bound_and_picklable(user_file):
    fn = get_custom_reward_fn(_config(user_file, reward_kwargs={"bonus": 0.25}))
    assert fn(data_source="x", solution_str="42", ground_truth="42") == 1.25
    # the loaded module is registered in sys.modules, so the bound function pickles by reference
    assert pickle.loads(pickle.dumps(fn))("x", "1", "2") == 0.25


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="custom_reward_function.path.*nope.py"):
        get_custom_reward_fn(_config(tmp_path / "nope.py"))


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(CustomRewardFunctionError, match="directory"):
        get_custom_reward_fn(_config(tmp_path))


def test_missing_function_lists_what_the_file_defines(user_file):
    with pytest.raises(AttributeError) as info:
        get_custom_reward_fn(_config(user_file, name="compute_reward"))
    message = str(info.value)
    assert "compute_reward" in message and "custom_reward_function.name" in message
    assert "compute_score" in message and "my_reward" in message and "Verdict" in message
    assert "NOT_A_FUNCTION" not in message


def test_name_that_is_not_callable(user_file):
    with pytest.raises(TypeError, match="NOT_A_FUNCTION.*not a function"):
        get_custom_reward_fn(_config(user_file, name="NOT_A_FUNCTION"))


def test_file_that_fails_to_import(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import math\nvalue = 1 / 0\n\ndef compute_score(**kw):\n    return 0\n")
    with pytest.raises(CustomRewardFunctionError) as info:
        get_custom_reward_fn(_config(path))
    message = str(info.value)
    assert "broken.py" in message and "ZeroDivisionError" in message and "line 2" in message
    syntax = tmp_path / "syntax.py"
    syntax.write_text("def compute_score(:\n")
    with pytest.raises(CustomRewardFunctionError, match="SyntaxError"):
        get_custom_reward_fn(_config(syntax))


def test_bad_reward_kwargs_type(user_file):
    with pytest.raises(TypeError, match="reward_kwargs"):
        get_custom_reward_fn({"custom_reward_function": {"path": str(user_file), "reward_kwargs": [1, 2]}})


def test_pkg_prefix_imports_a_module():
    fn = load_extern_object("pkg://verl.utils.reward_score.gsm8k", "compute_score")
    assert fn("#### 3", "3") == 1.0
    with pytest.raises(CustomRewardFunctionError, match="no_such_module"):
        load_extern_object("pkg://no_such_module", "f")
