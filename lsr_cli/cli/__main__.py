"""``python -m lsr_cli.cli`` runs the command-line interface (as ``python -m lsr_cli`` does)."""

from . import main

main()
