"""``python -m adaptive_data demo``: the same as the ``adaptive-data`` command."""

from ._cli import main

main()
