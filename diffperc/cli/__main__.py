"""``python -m diffperc.cli`` is the ``diffperc`` command, as it was before ``cli`` became a package."""

from diffperc.cli import main

main()
