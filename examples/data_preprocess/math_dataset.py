"""Convert a local copy of a MATH-style dataset (``problem`` / ``solution``) to verl parquet.

``--local_dataset_path`` is a directory holding ``train*`` and ``test*`` files (jsonl, json or parquet, e.g. the
hub layout ``data/train-00000-of-00001.parquet``), or one file that is split with ``--test_ratio``. The ground
truth is the content of the last ``\\boxed{}`` in the solution; rows without one are skipped
(``data_source="DigitalLearningGmbH/MATH-lighteval"`` unless ``--data_source`` says otherwise).

    python examples/data_preprocess/math_dataset.py --local_dataset_path ~/MATH --local_dir ~/data/math [--sft]
"""
import argparse
import sys

from verl.utils.dataset.tasks import MATH_DATA_SOURCE, MATH_INSTRUCTION, last_boxed, write_qa_task


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_dataset_path", default=None, help="directory or file of a local MATH copy")
    parser.add_argument("--local_dir", "--local_save_dir", dest="local_dir", default="~/data/math")
    parser.add_argument("--train_size", type=int, default=-1, help="keep at most this many train rows (-1: all)")
    parser.add_argument("--test_size", type=int, default=-1, help="keep at most this many test rows (-1: all)")
    parser.add_argument("--test_ratio", type=float, default=0.1, help="test fraction when given a single file")
    parser.add_argument("--question_key", default="problem")
    parser.add_argument("--answer_key", default="solution")
    parser.add_argument("--data_source", default=MATH_DATA_SOURCE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft", action="store_true", help="write a `messages` column (problem + reference solution)")
    args = parser.parse_args(argv)
    try:
        paths = write_qa_task(args.local_dataset_path, args.local_dir, "math", args.data_source, args.question_key,
                              args.answer_key, MATH_INSTRUCTION, last_boxed, args.train_size, args.test_size,
                              args.test_ratio, args.seed, args.sft)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
