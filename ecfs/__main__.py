"""`python -m ecfs` runs the command line."""

from .cli import main

main()
