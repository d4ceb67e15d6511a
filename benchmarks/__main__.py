"""``python -m benchmarks``: the single-machine benchmark suite (see :mod:`benchmarks.cli`)."""
import sys

from benchmarks.cli import main

sys.exit(main())
