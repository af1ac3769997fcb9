"""``python -m qcore.cli``: the same as the ``qcore`` console script."""

from qcore.cli import main

main()
