"""Test-split NELBO of the tiny models at several block sizes: a thin call of `did eval-nll`.

    python examples/tiny/nelbo.py --model runs/tiny-pretrain/final --model did-tiny --model runs/tiny-nomix/final

is `did eval-nll --data data/tiny-corpus/test.jsonl --block-size 4,16,128 --noise-draws 4 --batch-size 64` with the
given models; any other `did eval-nll` option can be added (a later --data or --block-size wins).
"""

from __future__ import annotations

import sys

from did_cli.cli import app

DEFAULTS = ["--data", "data/tiny-corpus/test.jsonl", "--block-size", "4,16,128", "--noise-draws", "4"]


def main() -> None:
    app(["eval-nll", *DEFAULTS, "--batch-size", "64", *sys.argv[1:]], prog_name="nelbo.py")


if __name__ == "__main__":
    main()
