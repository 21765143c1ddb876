"""``python -m bnrepair``: the same command as ``bnrepair`` (and so ``torchrun -m bnrepair``)."""

from .cli import main

main()
