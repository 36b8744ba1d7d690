"""``python -m coin ...``: the ``coin`` command, for an environment where the console script is not on PATH."""

from coin.cli import main

main()
