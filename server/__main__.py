"""`python -m server`: the same as `soft-serve`."""

from server.cli import main

main()
