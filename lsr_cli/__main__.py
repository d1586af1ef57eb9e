"""``python -m lsr_cli`` runs the command-line interface."""

from .cli import main

main()
