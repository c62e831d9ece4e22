"""`python -m prunec` is the same as the `prunec` command."""

from prunec.cli.main import main

main()
