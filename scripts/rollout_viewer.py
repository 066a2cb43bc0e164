#!/usr/bin/env python
"""Look at a rollout or validation dump in a terminal: the per-step curves, a table of samples, one sample in full.

    python scripts/rollout_viewer.py DUMP_DIR [--step N] [--min-score X] [--max-len N] [--sample I]

DUMP_DIR is a run's ``trainer.rollout_data_dir`` or ``trainer.validation_data_dir``. ``--sample`` takes the id in
the table's first column; without it the first sample of the filtered table is shown. The format and the reader are
those of :mod:`verl.utils.rollout_dump` (shared with ``notebooks/view_data.ipynb``).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from verl.utils.rollout_dump import filter_samples, load_dump, render_conversation, step_summary

TABLE_COLUMNS = ("step", "score", "reward", "response_length", "advantages", "gts", "output")


def _one_line(text: object, width: int) -> str:
    text = str(text).replace("\n", "\\n")
    return text if len(text) <= width else text[:width - 3] + "..."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Show a verl rollout/validation dump (trainer.rollout_data_dir).")
    parser.add_argument("dump_dir", help="the dump directory ({step}.jsonl files and metrics.jsonl)")
    parser.add_argument("--step", type=int, default=None, help="only this step")
    parser.add_argument("--min-score", type=float, default=None, help="only samples with score >= X")
    parser.add_argument("--max-score", type=float, default=None, help="only samples with score <= X")
    parser.add_argument("--min-len", type=int, default=None, help="only responses of at least N tokens")
    parser.add_argument("--max-len", type=int, default=None, help="only responses of at most N tokens")
    parser.add_argument("--sample", type=int, default=None, help="render this sample (id from the table)")
    parser.add_argument("--limit", type=int, default=20, help="rows of the sample table (default 20; 0: all)")
    parser.add_argument("--width", type=int, default=60, help="characters of text per table cell (default 60)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        dump = load_dump(args.dump_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    samples = dump.samples
    components = ", ".join(dump.reward_components) or "none"
    print(f"dump {dump.path}: {len(samples)} samples, steps {dump.steps}, reward components: {components}")

    print("\n== per step")
    print(step_summary(dump).to_string(float_format=lambda v: f"{v:.4g}"))

    table = filter_samples(samples,
                           step=args.step,
                           min_score=args.min_score,
                           max_score=args.max_score,
                           min_length=args.min_len,
                           max_length=args.max_len)
    print(f"\n== samples: {len(table)} of {len(samples)} match")
    if len(table):
        shown = table if args.limit <= 0 else table.head(args.limit)
        view = shown.loc[:, list(TABLE_COLUMNS)].copy()
        for column in ("gts", "output"):
            view[column] = view[column].map(lambda v: _one_line(v, args.width))
        view.index.name = "sample"
        print(view.to_string(float_format=lambda v: f"{v:.4g}"))
        if len(shown) < len(table):
            print(f"... {len(table) - len(shown)} more (--limit 0 shows all)")

    if args.sample is not None:
        if args.sample not in samples.index:
            print(f"error: --sample {args.sample} is not a sample id of this dump (0 to {len(samples) - 1})",
                  file=sys.stderr)
            return 2
        chosen = args.sample
    elif len(table):
        chosen = table.index[0]
    else:
        return 0
    print(f"\n== sample {chosen}")
    print(render_conversation(samples.loc[chosen].to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
