"""``python -m helpers``: the command-line interface of :mod:`helpers.apps.cli`."""

import sys

from helpers.apps.cli import main

sys.exit(main())
