"""``python -m fedstream``: the same as the ``fedstream`` command."""

import sys

from ._cli import main

sys.exit(main())
