"""``python -m mtrec``: the command line (what ``torchrun -m mtrec train ...`` starts in every process)."""

from mtrec.cli import main

main()
