"""Convert a local copy of a MATH-style dataset (``problem`` / ``solution``) to verl parquet.

``--local_dataset_path`` is a directory holding ``train*`` and ``test*`` files (jsonl, json or parquet, e.g. the
hub layout ``data/train-00000-of-00001.parquet``), or one file that is split with ``--test_ratio``. The ground
truth is the content of the last ``\\boxed{}`` in the solution; rows without one are skipped
(``data_source="DigitalLearningGmbH/MATH-lighteval"`` unless ``--data_source`` says otherwise).

    python examples/data_preprocess/math_dataset.py --local_dataset_path ~/MATH --local_dir ~/data/math [--sft]
"""
from verl.utils.dataset.tasks import MATH_DATA_SOURCE, MATH_INSTRUCTION, last_boxed, qa_task_cli


def main(argv: list[str] | None = None) -> None:
    qa_task_cli(argv, __doc__, "math", MATH_DATA_SOURCE, "problem", "solution", MATH_INSTRUCTION, last_boxed)


if __name__ == "__main__":
    main()
