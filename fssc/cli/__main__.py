"""``python -m fssc.cli``: the ``fssc`` console script."""

from fssc.cli import main

main()
