"""Task generators, answer extraction and the schema writer."""
import ast
import operator
import os
import random
import re
from fractions import Fraction

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from verl.utils.dataset.schema import (RL_COLUMNS, DataFormatError, make_rl_row, make_sft_row, read_records,
                                       write_splits)
from verl.utils.dataset.tasks import (arithmetic_rows, write_arithmetic_warmup, countdown_problem, countdown_rows,
                                      find_split_files, gsm8k_final_answer, last_boxed, split_records,
                                      write_arithmetic_task)

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _exact(expr: str) -> Fraction:
    """Exact value of a + - * / expression over integers (the test's own evaluator, not the generator's)."""

    def ev(node):
        if isinstance(node, ast.BinOp):
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        assert isinstance(node, ast.Constant) and isinstance(node.value, int)
        return Fraction(node.value)

    return ev(ast.parse(expr, mode="eval").body)


def test_arithmetic_rows_are_correct_distinct_and_seeded():
    used = set()
    train = arithmetic_rows(300, "train", seed=1, exclude=used)
    test = arithmetic_rows(50, "test", seed=1, exclude=used)
    keys = [(r["extra_info"]["a"], r["extra_info"]["op"], r["extra_info"]["b"]) for r in train + test]
    assert len(set(keys)) == 350  # no repeats, and no test problem in train
    for row in train + test:
        assert set(row) == set(RL_COLUMNS) and row["data_source"] == "arithmetic"
        info = row["extra_info"]
        a, op, b = info["a"], info["op"], info["b"]
        assert 0 <= a <= 99 and 0 <= b <= 99 and op in "+-"
        truth = row["reward_model"]["ground_truth"]
        assert int(truth) == (a + b if op == "+" else a - b) and int(truth) >= 0
        assert info["answer"].endswith(f"#### {truth}")
        assert row["prompt"] == [{"role": "user", "content": info["question"]}]
        assert f"{a} {op} {b}" in info["question"]
    assert arithmetic_rows(20, "train", seed=1) == train[:20]
    assert arithmetic_rows(20, "train", seed=2) != train[:20]
    with pytest.raises(ValueError, match="max_digits"):
        arithmetic_rows(500, "train", max_digits=1)


def test_arithmetic_sft_rows_have_messages():
    row = arithmetic_rows(1, "train", seed=0, sft=True)[0]
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    assert row["messages"][1]["content"].endswith("#### " + row["reward_model"]["ground_truth"])


def test_countdown_targets_are_reachable_with_each_number_once():
    rng = random.Random(0)
    for n in (2, 3, 4):
        for _ in range(40):
            p = countdown_problem(rng, num_numbers=n)
            assert _exact(p["solution"]) == p["target"] and 1 <= p["target"] <= 100
            assert sorted(int(x) for x in re.findall(r"\d+", p["solution"])) == sorted(p["numbers"])
            assert str(p["numbers"]) in p["question"] and str(p["target"]) in p["question"]
    rows = countdown_rows(5, "test", seed=3)
    assert rows == countdown_rows(5, "test", seed=3)
    truth = rows[0]["reward_model"]["ground_truth"]
    assert set(truth) == {"target", "numbers"} and rows[0]["data_source"] == "countdown"
    sft = countdown_rows(2, "train", seed=3, sft=True)[0]
    assert "<answer>" in sft["messages"][1]["content"]


@pytest.mark.parametrize("text,expected", [
    ("She sold 72 clips.\n#### 72", "72"),
    ("total is 1,234 dollars\n#### 1,234", "1234"),
    ("#### -5", "-5"),
    ("#### $3.50", "3.50"),
    ("no marker 42", None),
    ("#### none", None),
])
def test_gsm8k_final_answer(text, expected):
    assert gsm8k_final_answer(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("so $x = \\boxed{7}$.", "7"),
    ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\fbox{a{b}c}", "a{b}c"),
    ("$\\boxed 5$", "5"),
    ("\\boxed{unclosed", None),
    ("nothing here", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_row_builders_validate():
    row = make_rl_row("d", "hi", "1", "train", 4, extra_info={"k": 1})
    assert row["prompt"] == [{"role": "user", "content": "hi"}]
    assert row["extra_info"] == {"split": "train", "index": 4, "k": 1}
    with pytest.raises(DataFormatError, match="message 0 has content=5"):
        make_rl_row("d", [{"role": "user", "content": 5}], "1", "train", 0)
    with pytest.raises(DataFormatError, match="no assistant"):
        make_sft_row("d", [{"role": "user", "content": "x"}], "train", 0)


def test_write_splits_round_trip_and_refuses_empty(tmp_path):
    paths = write_arithmetic_task(str(tmp_path / "a"), train_size=7, test_size=3, seed=5)
    assert sorted(os.listdir(tmp_path / "a")) == ["test.parquet", "train.parquet"]  # no temp files left
    rows, columns = read_records(paths["train"])
    assert len(rows) == 7 and columns == list(RL_COLUMNS)
    assert rows[0]["prompt"][0]["role"] == "user"  # nested columns come back as plain lists/dicts
    assert isinstance(rows[0]["reward_model"], dict)
    assert pq.read_table(paths["test"]).num_rows == 3
    with pytest.raises(DataFormatError, match="empty test.parquet"):
        write_splits({"test": []}, str(tmp_path / "b"))


def test_find_split_files_hub_layout_and_single_file(tmp_path):
    (tmp_path / "main").mkdir()
    for name in ("train-00000-of-00001.parquet", "validation-00000-of-00001.parquet"):
        pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "#### 1"}]), tmp_path / "main" / name)
    (tmp_path / "README.md").write_text("x")
    found = find_split_files(str(tmp_path), "gsm8k")
    assert set(found) == {"train", "test"} and found["test"][0].endswith("validation-00000-of-00001.parquet")
    single = tmp_path / "main" / "train-00000-of-00001.parquet"
    assert find_split_files(str(single), "gsm8k") == {"all": [str(single)]}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_split_files(str(tmp_path / "nope"), "gsm8k")


def test_split_records_is_deterministic_and_disjoint():
    records = list(range(20))
    train, test = split_records(records, 0.25, seed=0)
    assert len(test) == 5 and sorted(train + test) == records
    assert split_records(records, 0.25, seed=0) == (train, test)
    assert split_records(records, 0.25, seed=1) != (train, test)
    with pytest.raises(ValueError, match="test_ratio"):
        split_records(records, 1.5, seed=0)


def test_worked_solutions_are_correct_column_by_column():
    """Every + and - problem of 2-digit operands: each line is true arithmetic, the carries/borrows chain from one
    column to the next, and the final answer is the value."""
    from verl.utils.dataset.tasks import worked_solution

    for a in range(100):
        for b in range(100):
            for op in "+-":
                if op == "-" and b > a:
                    continue
                *lines, final = worked_solution(a, op, b).split("\n")
                value = a + b if op == "+" else a - b
                assert final == f"#### {value}"
                digits, carry = [], 0
                for line in lines:
                    lhs, rhs = line.split(" = ")
                    assert eval(lhs) == int(rhs), line  # noqa: S307 (our own digits and + / -)
                    terms = lhs.split(" ")
                    if op == "+":
                        assert (int(terms[-1]) if len(terms) == 5 else 0) == carry, line
                        digits.append(int(rhs) % 10)
                        carry = int(rhs) // 10
                    else:
                        borrow_in = len(terms) >= 5 and terms[1] == "-" and terms[3] == "-"
                        assert borrow_in == bool(carry), line
                        digits.append(int(rhs))
                        carry = int(lhs.endswith("+ 10"))
                assert int("".join(map(str, reversed(digits)))) == value


def _problem_keys(path) -> set:
    return {(info["a"], info["op"], info["b"]) for info in pq.read_table(path).column("extra_info").to_pylist()}


def test_warmup_problems_are_disjoint_from_the_rl_task_and_half_end_with_the_answer_line(tmp_path):
    task = write_arithmetic_task(str(tmp_path / "task"), train_size=512, test_size=64)
    warm = write_arithmetic_warmup(str(tmp_path / "warm"),
                                   train_size=400,
                                   val_size=20,
                                   task_train_size=512,
                                   task_test_size=64,
                                   answer_line_ratio=0.5)
    task_keys = _problem_keys(task["train"]) | _problem_keys(task["test"])
    warm_train, warm_val = _problem_keys(warm["train"]), _problem_keys(warm["test"])
    assert len(warm_train) == 400 and len(warm_val) == 20
    assert not (warm_train | warm_val) & task_keys and not warm_train & warm_val

    replies = [m[-1]["content"] for m in pq.read_table(warm["train"]).column("messages").to_pylist()]
    with_line = [r for r in replies if "\n#### " in r]
    assert 0.4 < len(with_line) / len(replies) < 0.6
    without = [r for r in replies if "####" not in r]
    assert len(with_line) + len(without) == len(replies)
    assert all(re.fullmatch(r"(.+ = \d+\n?)+", r) for r in without)  # only the column lines are left
    val_replies = [m[-1]["content"] for m in pq.read_table(warm["test"]).column("messages").to_pylist()]
    assert all("\n#### " in r for r in val_replies)  # validation solutions stay complete
    with pytest.raises(ValueError, match="answer_line_ratio"):
        write_arithmetic_warmup(str(tmp_path / "bad"), 4, 1, answer_line_ratio=1.5)
