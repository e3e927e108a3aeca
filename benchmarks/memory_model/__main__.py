"""``python -m benchmarks.memory_model``: see the package's docstring (``--help``)."""

from .cli import main

main()
