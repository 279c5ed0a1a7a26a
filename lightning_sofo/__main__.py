"""python -m lightning_sofo ... is the `sofo` command."""

from lightning_sofo.cli import main

main()
