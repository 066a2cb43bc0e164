"""Generate the countdown task (reach a target with + - * / using each given number once) as verl parquet.

The answer is an equation inside ``<answer> </answer>``; the ground truth is ``{"target": int, "numbers": [...]}``
(``data_source="countdown"``). Every target is reachable: problems are built from a random expression.

    python examples/data_preprocess/countdown.py --local_dir ~/data/countdown [--num_numbers 4] [--sft]
"""
import argparse
import sys

from verl.utils.dataset.tasks import write_countdown_task


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_dir", "--local_save_dir", dest="local_dir", default="~/data/countdown")
    parser.add_argument("--train_size", type=int, default=4096)
    parser.add_argument("--test_size", type=int, default=256)
    parser.add_argument("--num_numbers", type=int, default=3)
    parser.add_argument("--max_number", type=int, default=20, help="numbers are drawn from 1..max_number")
    parser.add_argument("--max_target", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft", action="store_true", help="write a `messages` column (question + a solution)")
    args = parser.parse_args(argv)
    try:
        paths = write_countdown_task(args.local_dir, args.train_size, args.test_size, args.seed, args.num_numbers,
                                     args.max_number, args.max_target, args.sft)
    except ValueError as e:
        sys.exit(f"error: {e}")
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
