"""``python -m diffperc`` is the ``diffperc`` command."""

from diffperc.cli import main

main()
