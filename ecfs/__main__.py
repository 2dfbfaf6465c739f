"""`python -m ecfs` runs the command line."""

from .frontend.cli import main

main()
