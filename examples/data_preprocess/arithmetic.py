"""Generate the arithmetic task (``a + b`` / ``a - b`` with 1..N-digit operands) as verl parquet.

This is the task a run with no arguments trains on: easy enough that a tiny model learns it on CPU. Prompts ask for
the final answer after ``####``; the ground truth is the number as a string (``data_source="arithmetic"``).

    python examples/data_preprocess/arithmetic.py --local_dir ~/data/arithmetic [--sft]
"""
import argparse
import sys

from verl.utils.dataset.tasks import write_arithmetic_task


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_dir", "--local_save_dir", dest="local_dir", default="~/data/arithmetic")
    parser.add_argument("--train_size", type=int, default=4096)
    parser.add_argument("--test_size", type=int, default=256)
    parser.add_argument("--max_digits", type=int, default=2, help="operands have 1..max_digits digits")
    parser.add_argument("--ops", default="+-", help="operators to draw from, a subset of '+-*'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft", action="store_true", help="write a `messages` column (question + worked answer)")
    args = parser.parse_args(argv)
    try:
        paths = write_arithmetic_task(args.local_dir, args.train_size, args.test_size, args.seed, args.max_digits,
                                      args.ops, args.sft)
    except ValueError as e:
        sys.exit(f"error: {e}")
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
