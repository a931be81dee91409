"""``python -m onecycle_fused``: see :mod:`onecycle_fused.cli`."""
import sys

from .cli import main

sys.exit(main())
