"""Convert a local copy of GSM8K to verl parquet.

``--local_dataset_path`` is a directory holding ``train*`` and ``test*`` files (the original ``train.jsonl`` /
``test.jsonl``, or the hub layout ``main/train-00000-of-00001.parquet``), or one file that is split with
``--test_ratio``. Rows need ``question`` and ``answer`` columns; the ground truth is the number after ``####`` in
the answer (``data_source="openai/gsm8k"``).

    python examples/data_preprocess/gsm8k.py --local_dataset_path ~/gsm8k --local_dir ~/data/gsm8k [--sft]
"""
from verl.utils.dataset.tasks import GSM8K_DATA_SOURCE, GSM8K_INSTRUCTION, gsm8k_final_answer, qa_task_cli


def main(argv: list[str] | None = None) -> None:
    qa_task_cli(argv, __doc__, "gsm8k", GSM8K_DATA_SOURCE, "question", "answer", GSM8K_INSTRUCTION, gsm8k_final_answer)


if __name__ == "__main__":
    main()
