"""``python -m pyobc``: the same as the ``pyobc`` console script."""
import sys

from .cli import main

sys.exit(main())
