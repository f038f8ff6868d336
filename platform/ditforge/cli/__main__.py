"""`python -m ditforge.cli`: the same as the `ditforge` entry point."""

from . import main

main()
