"""``python -m pyobc``: the same as the ``pyobc`` console script."""
import sys

from .cli import main

if __name__ == "__main__":  # guarded so that importing the module (doctest collection) runs nothing
    sys.exit(main())
