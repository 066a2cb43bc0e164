"""Convert a local copy of GSM8K to verl parquet.

``--local_dataset_path`` is a directory holding ``train*`` and ``test*`` files (the original ``train.jsonl`` /
``test.jsonl``, or the hub layout ``main/train-00000-of-00001.parquet``), or one file that is split with
``--test_ratio``. Rows need ``question`` and ``answer`` columns; the ground truth is the number after ``####`` in
the answer (``data_source="openai/gsm8k"``).

    python examples/data_preprocess/gsm8k.py --local_dataset_path ~/gsm8k --local_dir ~/data/gsm8k [--sft]
"""
import argparse
import sys

from verl.utils.dataset.tasks import GSM8K_DATA_SOURCE, GSM8K_INSTRUCTION, gsm8k_final_answer, write_qa_task


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_dataset_path", default=None, help="directory or file of a local GSM8K copy")
    parser.add_argument("--local_dir", "--local_save_dir", dest="local_dir", default="~/data/gsm8k")
    parser.add_argument("--train_size", type=int, default=-1, help="keep at most this many train rows (-1: all)")
    parser.add_argument("--test_size", type=int, default=-1, help="keep at most this many test rows (-1: all)")
    parser.add_argument("--test_ratio", type=float, default=0.1, help="test fraction when given a single file")
    parser.add_argument("--question_key", default="question")
    parser.add_argument("--answer_key", default="answer")
    parser.add_argument("--data_source", default=GSM8K_DATA_SOURCE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft", action="store_true", help="write a `messages` column (question + reference answer)")
    args = parser.parse_args(argv)
    try:
        paths = write_qa_task(args.local_dataset_path, args.local_dir, "gsm8k", args.data_source, args.question_key,
                              args.answer_key, GSM8K_INSTRUCTION, gsm8k_final_answer, args.train_size, args.test_size,
                              args.test_ratio, args.seed, args.sft)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
