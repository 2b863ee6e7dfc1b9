"""``python -m gendd`` (and ``torchrun ... -m gendd``): the command line."""

from gendd.cli import main

main()
