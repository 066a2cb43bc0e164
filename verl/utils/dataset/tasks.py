"""Built-in tasks: generated arithmetic and countdown problems, and row builders for local GSM8K / MATH copies.

They live in the package (not only in ``examples/data_preprocess/``) because the trainer's embedded default run
generates the arithmetic task on the fly and the tiny test model trains its tokenizer on these texts.

Answer formats (the reward functions in ``verl.utils.reward_score`` match them):

* ``arithmetic`` and ``openai/gsm8k``: the final answer follows ``####`` (``... #### 68``); ground truth is the
  number as a string.
* math (``DigitalLearningGmbH/MATH-lighteval``): the final answer is in ``\\boxed{...}``; ground truth is the
  content of the last box of the reference solution.
* ``countdown``: an equation inside ``<answer> </answer>`` that uses every given number exactly once; ground truth
  is ``{"target": int, "numbers": [int, ...]}``.
"""
from __future__ import annotations

import os
import random
import re
from typing import Any, Iterator, Mapping, Sequence

from verl.utils.dataset.schema import DataFormatError, make_rl_row, make_sft_row, read_records, write_splits

ARITHMETIC_DATA_SOURCE = "arithmetic"
COUNTDOWN_DATA_SOURCE = "countdown"
GSM8K_DATA_SOURCE = "openai/gsm8k"
MATH_DATA_SOURCE = "DigitalLearningGmbH/MATH-lighteval"
#: split sizes of the arithmetic task as the embedded default writes it (``write_arithmetic_task``'s defaults)
ARITHMETIC_TRAIN_SIZE = 4096
ARITHMETIC_TEST_SIZE = 256

GSM8K_INSTRUCTION = 'Solve it step by step, and write the final answer as a number after "####".'
MATH_INSTRUCTION = "Solve it step by step, and put the final answer in \\boxed{}."

# ----------------------------------------------------------------------------------------------------------------------
# arithmetic


def arithmetic_problem(rng: random.Random, max_digits: int = 2, ops: str = "+-") -> dict[str, Any]:
    """One problem ``a op b`` with operands of 1..``max_digits`` digits; subtraction never goes negative."""
    if max_digits < 1:
        raise ValueError(f"max_digits must be >= 1, got {max_digits}")
    bad = set(ops) - set("+-*")
    if not ops or bad:
        raise ValueError(f"ops must be a non-empty subset of '+-*', got {ops!r}")
    hi = 10**max_digits - 1
    a, b, op = rng.randint(0, hi), rng.randint(0, hi), rng.choice(ops)
    if op == "-" and b > a:
        a, b = b, a
    value = a + b if op == "+" else a - b if op == "-" else a * b
    question = f'What is {a} {op} {b}? Give the final answer after "####".'
    return {"a": a, "b": b, "op": op, "question": question, "answer": str(value), "solution": worked_solution(a, op, b)}


def worked_solution(a: int, op: str, b: int) -> str:
    """The reference solution: column by column from the units up for ``+`` and ``-`` (one digit, its carry or
    borrow, per line), then ``#### value``.

    Why columns: writing ``a + b = value`` directly makes a model produce the leading digit before the carries
    that decide it, which the tiny model learns only after thousands of SFT steps; one column per line is a
    one-digit lookup plus a carry, which it learns in a few hundred, so the embedded default run starts RL from a
    policy that is sometimes right.
    """
    if op == "*":
        return f"{a} * {b} = {a * b}\n#### {a * b}"
    lines, digits, carry = [], [], 0
    x, y = a, b
    while x or y or carry or not lines:
        dx, dy = x % 10, y % 10
        x, y = x // 10, y // 10
        if op == "+":
            total = dx + dy + carry
            lines.append(f"{dx} + {dy}" + (f" + {carry}" if carry else "") + f" = {total}")
            digits.append(total % 10)
            carry = total // 10
        else:
            top = dx - carry
            borrow = int(top < dy)
            lines.append((f"{dx} - {carry}" if carry else f"{dx}") + f" - {dy}" + (" + 10" if borrow else "") +
                         f" = {top + 10 * borrow - dy}")
            digits.append(top + 10 * borrow - dy)
            carry = borrow
            if not x and not y:
                break
    value = a + b if op == "+" else a - b
    assert int("".join(str(d) for d in reversed(digits))) == value
    return "\n".join(lines) + f"\n#### {value}"


def arithmetic_rows(num_rows: int,
                    split: str,
                    seed: int = 0,
                    max_digits: int = 2,
                    ops: str = "+-",
                    sft: bool = False,
                    exclude: set | None = None) -> list[dict[str, Any]]:
    """``num_rows`` distinct problems as verl rows (RL ``prompt`` rows, or SFT ``messages`` rows).

    ``exclude`` holds ``(a, op, b)`` keys already used (e.g. by the train split) and is updated in place, so test
    problems never appear in training.
    """
    space = len(ops) * (10**max_digits)**2
    exclude = set() if exclude is None else exclude
    if num_rows + len(exclude) > space // 2:
        raise ValueError(f"asked for {num_rows} {split} arithmetic problems but only about {space} distinct ones exist "
                         f"with max_digits={max_digits}, ops={ops!r}; lower the size or raise --max_digits.")
    rng = random.Random(f"arithmetic-{seed}-{split}")
    rows = []
    while len(rows) < num_rows:
        p = arithmetic_problem(rng, max_digits=max_digits, ops=ops)
        key = (p["a"], p["op"], p["b"])
        if key in exclude:
            continue
        exclude.add(key)
        index = len(rows)
        info = {"question": p["question"], "answer": p["solution"], "a": p["a"], "b": p["b"], "op": p["op"]}
        if sft:
            messages = [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": p["solution"]}]
            rows.append(make_sft_row(ARITHMETIC_DATA_SOURCE, messages, split, index, "math", p["answer"], info))
        else:
            rows.append(
                make_rl_row(ARITHMETIC_DATA_SOURCE, p["question"], p["answer"], split, index, "math", extra_info=info))
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# countdown


def countdown_problem(rng: random.Random,
                      num_numbers: int = 3,
                      max_number: int = 20,
                      max_target: int = 100) -> dict[str, Any]:
    """Numbers and a target reachable by combining all of them with + - * / (exact division only).

    The generator builds the expression by repeatedly merging two random items of the pool, so the reference
    solution is a random tree, not only left-to-right chains.
    """
    if num_numbers < 2:
        raise ValueError(f"num_numbers must be >= 2, got {num_numbers}")
    for _ in range(10_000):
        numbers = [rng.randint(1, max_number) for _ in range(num_numbers)]
        pool = [(n, str(n), True) for n in numbers]  # (value, text, is_atom)
        while len(pool) > 1:
            i, j = rng.sample(range(len(pool)), 2)
            (x, xs, xa), (y, ys, ya) = pool[i], pool[j]
            ops = ["+", "*"] + (["-"] if x - y >= 0 else []) + (["/"] if y != 0 and x % y == 0 else [])
            op = rng.choice(ops)
            value = {"+": x + y, "-": x - y, "*": x * y, "/": x // y if y else 0}[op]
            text = f"{xs if xa else '(' + xs + ')'} {op} {ys if ya else '(' + ys + ')'}"
            pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [(value, text, False)]
        target, solution, _ = pool[0]
        if 1 <= target <= max_target:
            question = (f"Using the numbers {numbers}, write an equation that equals {target}. You may use + - * / "
                        f"and parentheses, and must use each number exactly once. Put the equation inside "
                        f"<answer> </answer>, for example <answer>(1 + 2) * 3</answer>.")
            return {"numbers": numbers, "target": target, "solution": solution, "question": question}
    raise ValueError(f"could not generate a countdown problem with num_numbers={num_numbers}, "
                     f"max_number={max_number}, max_target={max_target}; raise max_target.")


def countdown_rows(num_rows: int,
                   split: str,
                   seed: int = 0,
                   num_numbers: int = 3,
                   max_number: int = 20,
                   max_target: int = 100,
                   sft: bool = False) -> list[dict[str, Any]]:
    """``num_rows`` countdown problems as verl rows; ground truth ``{"target", "numbers"}``."""
    rng = random.Random(f"countdown-{seed}-{split}")
    rows = []
    for index in range(num_rows):
        p = countdown_problem(rng, num_numbers=num_numbers, max_number=max_number, max_target=max_target)
        truth = {"target": p["target"], "numbers": p["numbers"]}
        info = {"question": p["question"], "answer": p["solution"]}
        if sft:
            reply = f"{p['solution']} = {p['target']}\n<answer>{p['solution']}</answer>"
            messages = [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": reply}]
            rows.append(make_sft_row(COUNTDOWN_DATA_SOURCE, messages, split, index, "math", truth, info))
        else:
            rows.append(make_rl_row(COUNTDOWN_DATA_SOURCE, p["question"], truth, split, index, "math", extra_info=info))
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# GSM8K and MATH from local copies

_SPLIT_FILE = re.compile(r"^(train|test|validation|val)([-_.].*)?\.(parquet|jsonl|json)$", re.IGNORECASE)


def find_split_files(path: str, what: str) -> dict[str, list[str]]:
    """Map split name to files under a local dataset copy (a directory tree like the HF hub layout, or one file).

    A single file maps to ``{"all": [path]}``; the caller splits it.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: --local_dataset_path {path!r} does not exist. Download the dataset "
                                f"(jsonl or parquet) to this machine and pass its directory or file.")
    if os.path.isfile(path):
        return {"all": [path]}
    found: dict[str, list[str]] = {}
    for root, _dirs, files in sorted(os.walk(path)):
        for name in sorted(files):
            m = _SPLIT_FILE.match(name)
            if m:
                split = {"validation": "test", "val": "test"}.get(m.group(1).lower(), m.group(1).lower())
                found.setdefault(split, []).append(os.path.join(root, name))
    if not found:
        raise FileNotFoundError(f"{what}: no train*/test* .jsonl/.json/.parquet files under {path!r}. Pass the "
                                f"directory holding them, or a single file (split with --test_ratio).")
    return found


def read_split_records(files: Sequence[str], required: Sequence[str], what: str) -> list[dict[str, Any]]:
    """Concatenated records of ``files``, checking the columns this task needs."""
    records: list[dict[str, Any]] = []
    for f in files:
        rows, columns = read_records(f)
        missing = [c for c in required if c not in columns]
        if missing:
            raise DataFormatError(f"{what}: file {f!r} has no column {missing[0]!r} (available: {columns}). "
                                  f"Point --local_dataset_path at the right files or name the columns with "
                                  f"--question_key/--answer_key.")
        records.extend(rows)
    return records


def gsm8k_final_answer(answer: str) -> str | None:
    """The number after the last ``####`` of a GSM8K reference answer, commas and ``$`` removed."""
    if not isinstance(answer, str) or "####" not in answer:
        return None
    tail = answer.rsplit("####", 1)[1].strip()
    m = re.match(r"-?[\d,\$]*\.?\d+", tail)
    return m.group(0).replace(",", "").replace("$", "") if m else None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed x``) in ``text``; None if absent.

    Uses the reward scorer's parser so that the ground truth written here is exactly what the scorer extracts.
    """
    from verl.utils.reward_score.math import last_boxed_only_string, remove_boxed

    boxed = last_boxed_only_string(text)
    return remove_boxed(boxed) if boxed is not None else None


def qa_rows(records: Sequence[Mapping[str, Any]],
            split: str,
            data_source: str,
            question_key: str,
            answer_key: str,
            instruction: str,
            extract: Any,
            sft: bool = False) -> tuple[list[dict[str, Any]], int]:
    """Rows for question/answer datasets (GSM8K, MATH); returns ``(rows, skipped)``.

    Records whose reference answer has no extractable final answer are skipped (and counted), since they cannot be
    scored.
    """
    rows, skipped = [], 0
    for record in records:
        question, answer = record[question_key], record[answer_key]
        truth = extract(answer)
        if truth is None:
            skipped += 1
            continue
        index = len(rows)
        prompt = f"{question} {instruction}"
        info = {"question": question, "answer": answer}
        for extra in ("level", "type", "subject", "unique_id"):
            if extra in record and record[extra] is not None:
                info[extra] = record[extra]
        if sft:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            rows.append(make_sft_row(data_source, messages, split, index, "math", truth, info))
        else:
            rows.append(make_rl_row(data_source, prompt, truth, split, index, "math", extra_info=info))
    return rows, skipped


def split_records(records: Sequence[Any], test_ratio: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Deterministic shuffled train/test split of one file's records."""
    if not 0.0 < test_ratio < 1.0:
        raise ValueError(f"--test_ratio must be in (0, 1), got {test_ratio}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_test = max(1, int(round(len(records) * test_ratio)))
    if n_test >= len(records):
        raise ValueError(f"cannot split {len(records)} records into train and test with test_ratio={test_ratio}")
    test = [records[i] for i in sorted(order[:n_test])]
    train = [records[i] for i in sorted(order[n_test:])]
    return train, test


# ----------------------------------------------------------------------------------------------------------------------
# the embedded default task and the tokenizer corpus


def write_arithmetic_task(local_dir: str,
                          train_size: int = ARITHMETIC_TRAIN_SIZE,
                          test_size: int = ARITHMETIC_TEST_SIZE,
                          seed: int = 0,
                          max_digits: int = 2,
                          ops: str = "+-",
                          sft: bool = False) -> dict[str, str]:
    """Write the arithmetic task (the run-with-no-arguments default) to ``local_dir``; return ``{split: path}``.

    Test problems never occur in the train split.
    """
    used: set = set()
    train = arithmetic_rows(train_size, "train", seed, max_digits, ops, sft=sft, exclude=used)
    test = arithmetic_rows(test_size, "test", seed, max_digits, ops, sft=sft, exclude=used)
    return write_splits({"train": train, "test": test}, local_dir)


def write_arithmetic_warmup(local_dir: str,
                            train_size: int,
                            val_size: int,
                            seed: int = 0,
                            max_digits: int = 2,
                            ops: str = "+-",
                            task_train_size: int = ARITHMETIC_TRAIN_SIZE,
                            task_test_size: int = ARITHMETIC_TEST_SIZE,
                            answer_line_ratio: float = 1.0) -> dict[str, str]:
    """Write SFT rows (worked solutions) of arithmetic problems that are in neither split of the RL task that
    :func:`write_arithmetic_task` writes with the same seed and sizes; return ``{split: path}``.

    Why disjoint: after a warm-up of several epochs on the RL prompts themselves, the RL train reward would measure
    recall of memorised answers; with disjoint problems, RL prompts are as new to the model as test problems.

    ``answer_line_ratio`` is the fraction of training solutions that end with the ``#### N`` line; the others stop
    after the last column. The embedded default uses 0.5: the warmed model then writes the answer line about half
    the time, and writing it more often (the line the reward reads) is what GRPO learns within minutes on a
    1M-parameter model, whose digit arithmetic itself does not improve under RL (see docs/quickstart.md).
    """
    if not 0.0 <= answer_line_ratio <= 1.0:
        raise ValueError(f"answer_line_ratio must be in [0, 1], got {answer_line_ratio}")
    used: set = set()
    arithmetic_rows(task_train_size, "train", seed, max_digits, ops, exclude=used)
    arithmetic_rows(task_test_size, "test", seed, max_digits, ops, exclude=used)
    rows = arithmetic_rows(train_size + val_size, "warmup", seed, max_digits, ops, sft=True, exclude=used)
    train = rows[:train_size]
    if answer_line_ratio < 1.0:
        rng = random.Random(f"arithmetic-{seed}-warmup-answer-line")
        for row in train:
            keep = rng.random() < answer_line_ratio
            if not keep:
                reply = row["messages"][-1]
                reply["content"] = reply["content"].rsplit("\n####", 1)[0]
            row["extra_info"]["answer_line"] = keep
    return write_splits({"train": train, "test": rows[train_size:]}, local_dir)


def write_countdown_task(local_dir: str,
                         train_size: int = 4096,
                         test_size: int = 256,
                         seed: int = 0,
                         num_numbers: int = 3,
                         max_number: int = 20,
                         max_target: int = 100,
                         sft: bool = False) -> dict[str, str]:
    """Write the countdown task to ``local_dir``; return ``{split: path}``."""
    kw = dict(seed=seed, num_numbers=num_numbers, max_number=max_number, max_target=max_target, sft=sft)
    return write_splits(
        {
            "train": countdown_rows(train_size, "train", **kw),
            "test": countdown_rows(test_size, "test", **kw)
        }, local_dir)


def write_qa_task(local_dataset_path: str | None,
                  local_dir: str,
                  what: str,
                  data_source: str,
                  question_key: str,
                  answer_key: str,
                  instruction: str,
                  extract: Any,
                  train_size: int = -1,
                  test_size: int = -1,
                  test_ratio: float = 0.1,
                  seed: int = 0,
                  sft: bool = False) -> dict[str, str]:
    """Convert a local question/answer dataset copy (GSM8K, MATH) to verl parquet; return ``{split: path}``.

    ``local_dataset_path`` is a directory with ``train*`` / ``test*`` files (jsonl, json or parquet, searched
    recursively, as in the Hugging Face hub layout) or one file, which is split with ``test_ratio``. ``train_size``
    / ``test_size`` cap the rows kept per split (-1: all).
    """
    if not local_dataset_path:
        raise FileNotFoundError(f"{what}: --local_dataset_path is required: no dataset hub is reachable from here. "
                                f"Copy the dataset (jsonl or parquet with columns {question_key!r} and "
                                f"{answer_key!r}) to this machine and pass its directory or file.")
    found = find_split_files(local_dataset_path, what)
    required = [question_key, answer_key]
    if "all" in found:
        train_records, test_records = split_records(read_split_records(found["all"], required, what), test_ratio, seed)
    else:
        missing = [s for s in ("train", "test") if s not in found]
        if missing:
            raise FileNotFoundError(f"{what}: no {missing[0]}* file under {local_dataset_path!r} (found splits: "
                                    f"{sorted(found)}); pass a single file instead and split it with --test_ratio.")
        train_records = read_split_records(found["train"], required, what)
        test_records = read_split_records(found["test"], required, what)
    splits = {}
    for split, records, cap in (("train", train_records, train_size), ("test", test_records, test_size)):
        if cap is not None and cap >= 0:
            records = records[:cap]
        rows, skipped = qa_rows(records, split, data_source, question_key, answer_key, instruction, extract, sft)
        if skipped:
            print(f"{what}: skipped {skipped} of {len(records)} {split} records without an extractable final answer")
        if records and not rows:
            raise DataFormatError(f"{what}: none of the {len(records)} {split} records has a final answer in column "
                                  f"{answer_key!r} that can be extracted; check --answer_key and the file contents.")
        splits[split] = rows
    return write_splits(splits, local_dir)


def qa_task_cli(argv: list[str] | None, description: str, what: str, data_source: str, question_key: str,
                answer_key: str, instruction: str, extract: Any) -> None:
    """The command line shared by the local-copy converters (``examples/data_preprocess/gsm8k.py``,
    ``math_dataset.py``): parse ``argv``, run :func:`write_qa_task`, print the written paths, and exit with a
    one-line error for a missing file or column."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_dataset_path", default=None, help=f"directory or file of a local {what} copy")
    parser.add_argument("--local_dir", "--local_save_dir", dest="local_dir", default=f"~/data/{what}")
    parser.add_argument("--train_size", type=int, default=-1, help="keep at most this many train rows (-1: all)")
    parser.add_argument("--test_size", type=int, default=-1, help="keep at most this many test rows (-1: all)")
    parser.add_argument("--test_ratio", type=float, default=0.1, help="test fraction when given a single file")
    parser.add_argument("--question_key", default=question_key)
    parser.add_argument("--answer_key", default=answer_key)
    parser.add_argument("--data_source", default=data_source)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft", action="store_true", help="write a `messages` column (question + reference answer)")
    args = parser.parse_args(argv)
    try:
        paths = write_qa_task(args.local_dataset_path, args.local_dir, what, args.data_source, args.question_key,
                              args.answer_key, instruction, extract, args.train_size, args.test_size, args.test_ratio,
                              args.seed, args.sft)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    for split, path in paths.items():
        print(f"{split}: {path}")


def task_texts(seed: int = 0, num_arithmetic: int = 400, num_countdown: int = 200) -> Iterator[str]:
    """Prompts and reference answers of the generated tasks (tokenizer training text for the tiny model)."""
    rng = random.Random(f"corpus-{seed}")
    for i in range(num_arithmetic):
        p = arithmetic_problem(rng, max_digits=1 + i % 3, ops="+-*")
        yield p["question"]
        yield p["solution"]
    for i in range(num_countdown):
        p = countdown_problem(rng, num_numbers=3 + i % 2)
        yield p["question"]
        yield f"{p['solution']} = {p['target']}\n<answer>{p['solution']}</answer>"
