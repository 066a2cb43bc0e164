"""The documentation site (mkdocs.yml, docs/*.md) builds without warnings, and what it shows is true.

* ``mkdocs build --strict`` passes (broken links, anchors, pages missing from the nav are errors);
* docs/config_reference.md equals a fresh generation from verl/trainer/config/*.yaml, and every key has a meaning;
* every command in a ```bash / ```shell block of docs/*.md is covered: this test runs it (cheap ones, in a sandbox
  HOME), or a test runs its entry point (an example script, ``python -m module``, a script) and the command's
  ``key=value`` overrides compose against that entry point's config and its ``--flags`` are ones that test passes,
  or it appears verbatim in a file under tests/ or examples/, or it is listed in ``ALIASES`` with the CI line that
  runs it;
* the Python blocks marked ``<!-- docs-test: ... -->`` run, and print what their comments say;
* every error message quoted in the docs is the one the code raises (regenerated here).
"""
from __future__ import annotations

import ast
import functools
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = os.path.join(REPO, "docs")
CONFIG_DIR = os.path.join(REPO, "verl", "trainer", "config")
FIXTURES = os.path.join(REPO, "tests", "fixtures")

# ------------------------------------------------------------------------------------------------ doc parsing -----
_FENCE = re.compile(r"^```(\w*)\s*$")
_MARKER = re.compile(r"^<!--\s*docs-test:\s*([\w-]+)\s*-->\s*$")


def doc_pages() -> list[str]:
    return sorted(os.path.join(DOCS, n) for n in os.listdir(DOCS) if n.endswith(".md"))


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def code_blocks(path: str) -> list[tuple[str, str, str | None]]:
    """``(language, body, marker)`` of every fenced block; ``marker`` is a ``<!-- docs-test: X -->`` line directly
    above the fence (blank lines allowed)."""
    blocks, lines = [], read(path).splitlines()
    i, marker = 0, None
    while i < len(lines):
        m = _MARKER.match(lines[i])
        if m:
            marker = m.group(1)
        fence = _FENCE.match(lines[i])
        if fence:
            body = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            blocks.append((fence.group(1), "\n".join(body) + "\n", marker))
            marker = None
        elif lines[i].strip() and not m:
            marker = None
        i += 1
    return blocks


def commands_of(body: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments and blank lines dropped, whitespace
    normalised."""
    joined = body.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        tokens = shlex.split(line, comments=True)
        if not tokens:
            continue
        out.append(normalize(strip_comment(line)))
    return out


def strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment`` (a ``#`` outside quotes, after whitespace or at the start)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def normalize(text: str) -> str:
    return " ".join(text.split())


def all_doc_commands() -> list[tuple[str, str]]:
    """``(page name, command)`` for every command of every shell block."""
    out = []
    for page in doc_pages():
        for lang, body, _ in code_blocks(page):
            if lang in ("bash", "shell", "sh"):
                out += [(os.path.basename(page), cmd) for cmd in commands_of(body)]
    return out


# ---------------------------------------------------------------------------------------------- coverage rules ----
# 1. commands this test runs itself (in a sandbox HOME, from the repository root): command -> files it must create
#    (relative to HOME) and text its output must contain
RUN_HERE = {
    "python -m verl.trainer.main_ppo --cfg job": ([], ["train_batch_size", "ppo_mini_batch_size"]),
    "python examples/data_preprocess/arithmetic.py --local_dir ~/data/arithmetic":
        (["data/arithmetic/train.parquet", "data/arithmetic/test.parquet"], []),
    "python examples/data_preprocess/gsm8k.py --local_dataset_path ~/gsm8k --local_dir ~/data/gsm8k":
        (["data/gsm8k/train.parquet", "data/gsm8k/test.parquet"], []),
}
# what the sandbox HOME holds before those run: the GSM8K fixture where the quickstart says a local copy lives
SANDBOX_FILES = {"gsm8k": os.path.join(FIXTURES, "gsm8k")}

# 2. entry points that tests run, with the test file, a string in it that shows it runs the entry point, and the
#    config that ``key=value`` arguments must compose against ((config dir, config name) or None)
_PPO = (CONFIG_DIR, "ppo_trainer")
ENTRY_MODULES = {
    "verl.trainer.main_ppo": ("tests/trainer/test_kill_resume.py", '"-m", "verl.trainer.main_ppo"', _PPO),
    "recipe.minimal.main_minimal": ("tests/recipe/test_minimal_recipe.py", '"-m", "recipe.minimal.main_minimal"',
                                    (os.path.join(REPO, "recipe", "minimal", "config"), "minimal_trainer")),
    "verl.model_merger": ("tests/model_merger/test_model_merger.py", 'runpy.run_module("verl.model_merger"', None),
}
ENTRY_SCRIPTS = {
    "scripts/rollout_viewer.py": ("tests/trainer/test_debug_dump_notebook.py", "rollout_viewer.py", None),
    "scripts/model_merger.py": ("tests/model_merger/test_model_merger.py", '"scripts", "model_merger.py"', None),
    "examples/sft/gsm8k/run_qwen_05.sh":
        ("tests/trainer/test_fsdp_sft_trainer.py", '"gsm8k/run_qwen_05.sh"', (CONFIG_DIR, "sft_trainer")),
    "examples/sft/multiturn/run_qwen_05_multiturn.sh":
        ("tests/trainer/test_fsdp_sft_trainer.py", '"multiturn/run_qwen_05_multiturn.sh"', (CONFIG_DIR, "sft_trainer")),
    "recipe/dapo/run_dapo_qwen2.5_7b.sh": ("tests/recipe/test_dapo.py", '"recipe", "dapo", "run_dapo_qwen2.5_7b.sh"',
                                           (os.path.join(REPO, "recipe", "dapo", "config"), "dapo_trainer")),
}
EXAMPLE_TEST = "tests/examples/test_example_scripts.py"  # runs every script whose path is a key of its CHECKS
EXAMPLE_CONFIGS = {"generation": (CONFIG_DIR, "generation")}  # examples/<folder>: config (default: ppo_trainer)

# 3. commands a CI step runs in another spelling: doc command -> (file, the line there)
ALIASES = {
    "pip install -e .": (".ci/run", 'python -m pip install --quiet -e ".[test]"'),
}

# 4. shell steps that only set up the environment of the commands after them
ENV_STEP = re.compile(r"^(\.|source) \S+/bin/activate$")

_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@functools.lru_cache(maxsize=1)
def example_checks() -> frozenset[str]:
    """The script paths (relative to examples/) that tests/examples/test_example_scripts.py runs: its CHECKS keys."""
    tree = ast.parse(read(os.path.join(REPO, EXAMPLE_TEST)))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CHECKS" for t in node.targets):
            return frozenset(ast.literal_eval(k) for k in node.value.keys)
    raise AssertionError(f"{EXAMPLE_TEST} has no CHECKS")


@functools.lru_cache(maxsize=1)
def verbatim_corpus() -> str:
    """Every source / script file under tests/ and examples/, whitespace-normalised, joined."""
    texts = []
    for top in ("tests", "examples"):
        for root, _, files in os.walk(os.path.join(REPO, top)):
            for name in files:
                if name.endswith((".py", ".sh")) and os.path.join(root, name) != os.path.abspath(__file__):
                    texts.append(normalize(read(os.path.join(root, name))))
    return "\n".join(texts)


def compose_errors(config: tuple[str, str] | None, overrides: list[str]) -> str | None:
    """None when ``overrides`` compose against ``config`` (Hydra), else the error."""
    if config is None or not overrides:
        return None
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=config[0], version_base=None):
            compose(config_name=config[1], overrides=overrides)
    except Exception as exc:  # noqa: BLE001 - any composition failure is the answer
        return f"{type(exc).__name__}: {exc}"
    return None


def entry_point_problems(tokens: list[str]) -> list[str] | None:
    """None when ``tokens`` is not an entry-point command; else the reasons it is not covered (empty: covered)."""
    env = []
    while tokens and _ASSIGN.match(tokens[0]):
        env.append(tokens[0].split("=", 1)[0])
        tokens = tokens[1:]
    if len(tokens) >= 3 and tokens[0] in ("python", "python3") and tokens[1] == "-m":
        target, args = tokens[2], tokens[3:]
        spec = ENTRY_MODULES.get(target)
    elif len(tokens) >= 2 and tokens[0] in ("python", "python3", "bash"):
        target, args = tokens[1], tokens[2:]
        spec = ENTRY_SCRIPTS.get(target)
        if spec is None and target.startswith("examples/") and target.endswith(".sh"):
            rel = target[len("examples/"):]
            if rel in example_checks():
                spec = (EXAMPLE_TEST, f'"{rel}"', EXAMPLE_CONFIGS.get(rel.split("/")[0], _PPO))
    else:
        return None
    if spec is None:
        return None
    problems = []
    test_file, evidence, config = spec
    test_text = read(os.path.join(REPO, test_file))
    if evidence not in test_text:
        problems.append(f"{test_file} no longer contains {evidence!r}: does a test still run {target}?")
    if target.endswith(".sh"):
        script = read(os.path.join(REPO, target))
        problems += [f"{target} does not read the variable {v}" for v in env if f"${{{v}" not in script]
    elif env:
        problems.append(f"environment assignments {env} before a non-script command")
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    flags = [a.split("=", 1)[0] for a in args if a.startswith("--")]
    problems += [f"flag {f} is not passed by {test_file}" for f in flags if f'"{f}"' not in test_text]
    error = compose_errors(config, overrides)
    if error:
        problems.append(f"the overrides {overrides} do not compose against {config[1]}.yaml: {error}")
    return problems


def coverage_problems(command: str, corpus: str) -> list[str]:
    """Why ``command`` is not covered (empty list: covered)."""
    if command in RUN_HERE or ENV_STEP.match(command):
        return []
    if command in ALIASES:
        path, line = ALIASES[command]
        return [] if line in read(os.path.join(REPO, path)) else [f"{path} no longer contains {line!r}"]
    problems = entry_point_problems(shlex.split(command))
    if problems is not None:
        return problems
    if command in corpus:
        return []
    return ["not run by this test, not an entry point a test runs, not verbatim in tests/ or examples/, no alias"]


# ----------------------------------------------------------------------------------------------------- tests ------
def test_mkdocs_build_strict(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d",
                           str(tmp_path / "site")],
                          cwd=REPO,
                          capture_output=True,
                          text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr
    for page in doc_pages():  # every page is built (the nav and docs_dir agree)
        name = os.path.splitext(os.path.basename(page))[0]
        built = "index.html" if name == "README" else os.path.join(name, "index.html")
        assert (tmp_path / "site" / built).is_file(), f"{page} was not built"


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference",
                                                  os.path.join(REPO, "scripts", "gen_config_reference.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_config_reference_is_up_to_date():
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "gen_config_reference.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_config_reference_lists_every_key_of_every_yaml():
    import yaml

    gen = _load_generator()
    files = gen.load_all()
    assert set(files) == {n for n in os.listdir(CONFIG_DIR) if n.endswith(".yaml")}

    def leaves(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict) and value:
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    reference = read(os.path.join(DOCS, "config_reference.md"))
    for name, cfg in files.items():
        data = yaml.safe_load(read(os.path.join(CONFIG_DIR, name)))
        data.pop("defaults", None)
        parsed = {e.path for e in cfg.entries if not e.is_section}
        assert parsed == set(leaves(data)), f"{name}: the comment-aware parser disagrees with PyYAML"
        for key in parsed:
            assert f"| `{key}` |" in reference, f"{name}: {key} is missing from docs/config_reference.md"


@pytest.mark.parametrize(
    "name", ["ppo_trainer.yaml", "generation.yaml", "evaluation.yaml", "sft_trainer.yaml", "ppo_megatron_trainer.yaml"])
def test_every_config_key_has_a_meaning(name):
    gen = _load_generator()
    files = gen.load_all()
    missing = gen.missing_meanings(files).get(name, [])
    assert not missing, (f"{name}: keys without a comment (add `# meaning` above the key or after its value): "
                         f"{missing}")


def test_generator_reads_comments_and_derives_meanings(tmp_path):
    gen = _load_generator()
    (tmp_path / "base.yaml").write_text("# file header\n\nsection:\n  # above\n  a: 1  # after\n  b: '#no' # c\n")
    (tmp_path / "child.yaml").write_text("defaults:\n  - base\n  - _self_\n\nsection:\n  a: 2\n"
                                         "  f: ${oc.select:section.b,x}\ncritic:\n  lr: 4\n")
    files = gen.load_all(str(tmp_path))
    base, child = files["base.yaml"].by_path(), files["child.yaml"].by_path()
    assert files["base.yaml"].header == "file header"
    assert base["section.a"].meaning == "above after" and base["section.a"].value == "1"
    assert base["section.b"].value == "'#no'" and base["section.b"].meaning == "c"
    assert files["child.yaml"].defaults == ["base", "_self_"]
    assert child["section.a"].meaning == "As in `base.yaml`: above after"
    assert child["section.f"].meaning == "Follows `section.b` (`x` when that key is absent)."
    assert child["critic.lr"].meaning == "" and gen.missing_meanings(files) == {"child.yaml": ["critic.lr"]}
    (tmp_path / "child.yaml").write_text("critic:\n  lr: 4\nactor_rollout_ref:\n  actor:\n    lr: 3  # the lr\n")
    files = gen.load_all(str(tmp_path))
    assert files["child.yaml"].by_path()["critic.lr"].meaning == "As `actor_rollout_ref.actor.lr`, for this role: " \
                                                                 "the lr"


def test_doc_commands_are_found():
    commands = all_doc_commands()
    pages = {page for page, _ in commands}
    assert {"install.md", "quickstart.md", "sglang.md"} <= pages
    assert set(RUN_HERE) <= {cmd for _, cmd in commands}, "RUN_HERE lists a command no page shows any more"


@pytest.mark.parametrize("page, command", all_doc_commands())
def test_every_doc_command_is_covered(page, command):
    problems = coverage_problems(command, verbatim_corpus())
    assert not problems, f"docs/{page}: `{command}`: " + "; ".join(problems)


@pytest.fixture(scope="module")
def sandbox_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    for name, source in SANDBOX_FILES.items():
        shutil.copytree(source, home / name)
    return home


def _sandbox_env(home) -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["HOME"] = str(home)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # `python` = this interpreter
    return env


@pytest.mark.parametrize("command", sorted(RUN_HERE))
def test_doc_command_runs(command, sandbox_home):
    files, texts = RUN_HERE[command]
    proc = subprocess.run(["bash", "-c", command],
                          cwd=REPO,
                          env=_sandbox_env(sandbox_home),
                          capture_output=True,
                          text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rel in files:
        assert (sandbox_home / rel).is_file(), f"`{command}` did not write ~/{rel}"
    for text in texts:
        assert text in proc.stdout, f"`{command}` did not print {text!r}"


def _marked_blocks(marker: str) -> list[tuple[str, str]]:
    return [(os.path.basename(p), body) for p in doc_pages() for lang, body, m in code_blocks(p) if m == marker]


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray cluster for this module: the Ray examples join it through RAY_ADDRESS (as a user's script joins
    a running cluster), which saves starting a second one."""
    import ray

    from verl.single_controller.ray.utils import local_ray_init_kwargs

    context = ray.init(**local_ray_init_kwargs(num_cpus=4))
    try:
        yield context.address_info["address"]
    finally:
        ray.shutdown()


@pytest.mark.parametrize("page, body", _marked_blocks("run-python"), ids=lambda x: x if x.endswith(".md") else "")
def test_python_example_runs_and_prints_what_it_says(page, body, tmp_path, request):
    script = tmp_path / "example.py"
    script.write_text(body)
    address = request.getfixturevalue("ray_address") if "init_ray(" in body else None
    env = _sandbox_env(tmp_path)  # after ray.init, which exports the cluster's auth mode to os.environ
    if address:
        env["RAY_ADDRESS"] = address
        env["HOME"] = os.environ.get("HOME", env["HOME"])  # Ray keeps the cluster's auth token under ~/.ray
    proc = subprocess.run([sys.executable, str(script)],
                          cwd=tmp_path,
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    printed = proc.stdout.splitlines()
    expected = [m.group(1).strip() for m in re.finditer(r"^\s*print\(.*\)\s+# (.*)$", body, re.M)]
    found = [line for line in printed if line.strip() in expected]
    assert [line.strip() for line in found] == expected, f"{page}: printed {printed}, the comments say {expected}"
    if "to_parquet(\"train.parquet\")" in body:
        import pyarrow.parquet as pq

        from verl.utils.dataset.schema import RL_COLUMNS

        assert tuple(pq.read_table(tmp_path / "train.parquet").column_names) == RL_COLUMNS


def test_quickstart_describes_the_embedded_default():
    from verl.trainer.main_ppo import EMBEDDED_DEFAULT_OVERRIDES as d

    claim = (f"trains {d['trainer.total_training_steps']} steps of {d['data.train_batch_size']} prompts x "
             f"{d['actor_rollout_ref.rollout.n']} responses, validating every {d['trainer.test_freq']} steps")
    assert claim in normalize(read(os.path.join(DOCS, "quickstart.md"))), claim


def test_install_lists_every_extra():
    tree = ast.parse(read(os.path.join(REPO, "setup.py")))
    extras = [
        ast.literal_eval(k) for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "extras_require"
                                                for t in node.targets)
        for k in node.value.keys
    ]
    page = read(os.path.join(DOCS, "install.md"))
    assert extras and all(f"| `{e}` |" in page for e in extras), f"install.md must list the extras {extras}"


def test_reward_function_example_scores_as_documented(tmp_path):
    from verl.utils.reward_score.custom import get_custom_reward_fn

    (body,) = [b for _, b in _marked_blocks("reward-file")]
    path = tmp_path / "my_reward.py"
    path.write_text(body)
    page = read(os.path.join(DOCS, "data_and_rewards.md"))
    assert "+custom_reward_function.reward_kwargs.format_bonus=0.2" in page
    fn = get_custom_reward_fn({
        "custom_reward_function": {
            "path": str(path),
            "name": "compute_score",
            "reward_kwargs": {
                "format_bonus": 0.2
            }
        }
    })
    assert fn("openai/gsm8k", "so 48 + 24 = 72\n#### 72", "72", {}) == {"score": 1.0, "acc": True}
    assert fn("openai/gsm8k", "#### 1,000.", "1000") == {"score": 1.0, "acc": True}
    assert fn("openai/gsm8k", "#### 71", "72") == {"score": 0.2, "acc": False}
    assert fn("openai/gsm8k", "72", "72") == 0.0


# ------------------------------------------------------------------------------------- quoted error messages -----
# the worked example of docs/batch_sizes.md
BATCH_EXAMPLE = [
    "trainer.nnodes=1", "trainer.n_gpus_per_node=8", "trainer.device=cpu", "algorithm.adv_estimator=grpo",
    "data.train_batch_size=1024", "actor_rollout_ref.rollout.n=5", "actor_rollout_ref.actor.ppo_mini_batch_size=256",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=32", "data.max_prompt_length=512",
    "data.max_response_length=1024"
]
BATCH_ERRORS = [
    ["actor_rollout_ref.actor.ppo_mini_batch_size=300"],
    ["actor_rollout_ref.actor.ppo_mini_batch_size=2048"],
    ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=48"],
    ["data.train_batch_size=1020"],
    ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=null"],
    ["actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=null"],
    ["actor_rollout_ref.actor.ppo_micro_batch_size=128"],
    ["actor_rollout_ref.actor.use_dynamic_bsz=True", "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=1024"],
    ["actor_rollout_ref.rollout.n=1"],
]


def _validate(overrides: list[str], check_paths: bool = False) -> list[str]:
    from hydra import compose, initialize_config_dir

    from verl.utils.config import validate_config

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        config = compose(config_name="ppo_trainer", overrides=overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return validate_config(config, check_paths=check_paths)


def _config_error(overrides: list[str], check_paths: bool = False) -> str:
    from verl.utils.config import ConfigError

    with pytest.raises(ConfigError) as info:
        _validate(overrides, check_paths)
    return str(info.value)


def test_batch_size_worked_example_is_valid_and_its_numbers_hold():
    assert _validate(BATCH_EXAMPLE) == []
    assert _validate(
        BATCH_EXAMPLE +
        ["actor_rollout_ref.actor.use_dynamic_bsz=True", "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=16384"]
    ) == []
    page = read(os.path.join(DOCS, "batch_sizes.md"))
    for claim in ("**5120 responses**", "**4 mini-batches**", "**160 rows**", "**10 forward/backward passes**"):
        assert claim in page
    assert (1024 * 5, 1024 // 256, 256 * 5 // 8, 256 * 5 // 8 // 16) == (5120, 4, 160, 10)


@pytest.mark.parametrize("extra", BATCH_ERRORS, ids=lambda e: " ".join(e))
def test_batch_size_errors_are_quoted_verbatim(extra):
    message = _config_error(BATCH_EXAMPLE + extra)
    assert message in read(os.path.join(DOCS, "batch_sizes.md")), message


def test_faq_and_install_quote_the_missing_engine_error():
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here: the error needs an environment without it")
    message = _config_error(BATCH_EXAMPLE + ["actor_rollout_ref.rollout.name=vllm"])
    for page in ("faq.md", "install.md"):
        assert message in read(os.path.join(DOCS, page)), message


def test_faq_quotes_the_missing_reward_file_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.parquet").write_bytes(b"")
    message = _config_error(BATCH_EXAMPLE + [
        "trainer.n_gpus_per_node=1", "data.train_files=train.parquet", "data.val_files=train.parquet",
        "actor_rollout_ref.model.path=Qwen/Qwen2.5-0.5B-Instruct", "custom_reward_function.path=rewards/missing.py"
    ],
                            check_paths=True)
    assert message in read(os.path.join(DOCS, "faq.md")), message


def test_faq_quotes_the_reward_name_and_data_source_errors(tmp_path, monkeypatch):
    from verl.utils.reward_score import UnknownDataSourceError, default_compute_score
    from verl.utils.reward_score.custom import get_custom_reward_fn

    faq = read(os.path.join(DOCS, "faq.md"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_reward.py").write_text([b for _, b in _marked_blocks("reward-file")][0])
    with pytest.raises(AttributeError) as info:
        get_custom_reward_fn({"custom_reward_function": {"path": "my_reward.py", "name": "compute_reward"}})
    assert str(info.value) in faq, str(info.value)
    with pytest.raises(UnknownDataSourceError) as info:
        default_compute_score("my_dataset", "#### 1", "1")
    assert str(info.value) in faq, str(info.value)


def test_faq_quotes_the_gpu_count_error_mock_cuda(monkeypatch):
    """The check needs visible CUDA GPUs, which this machine lacks: the device queries are mocked."""
    import types

    import verl.utils.device as device

    monkeypatch.setattr(device, "is_cuda_available", lambda: True)
    monkeypatch.setattr(device, "get_torch_device", lambda: types.SimpleNamespace(device_count=lambda: 4))
    message = _config_error(BATCH_EXAMPLE + ["trainer.device=cuda"])
    assert message in read(os.path.join(DOCS, "faq.md")), message


def test_faq_quotes_the_ray_resource_error(ray_address):
    from verl.single_controller.ray import RayResourcePool

    with pytest.raises(RuntimeError) as info:
        RayResourcePool(process_on_nodes=[8], use_gpu=False).get_placement_groups()
    # the cluster's memory totals differ between machines: the docs show them as "..."
    message = re.sub(r"in total \(CPU=4[^)]*\)", "in total (CPU=4, ...)", str(info.value))
    assert message in read(os.path.join(DOCS, "faq.md")), message


def test_coverage_rules_reject_uncovered_commands():
    corpus = verbatim_corpus()
    assert coverage_problems("python -m verl.trainer.main_ppo data.no_such_key=1", corpus)
    assert coverage_problems("FOO=1 bash examples/grpo_trainer/run_qwen2-7b_seq_balance.sh", corpus)
    assert coverage_problems("python -m verl.model_merger merge --no-such-flag x", corpus)
    assert coverage_problems("python scripts/no_such_script.py", corpus)
    assert not coverage_problems("bash examples/grpo_trainer/run_qwen2-7b_seq_balance.sh trainer.save_freq=5", corpus)
    assert commands_of("# a comment\nfoo --a \\\n  --b   x  # trailing\n\nbar '#not a comment'\n") == [
        "foo --a --b x", "bar '#not a comment'"
    ]
