"""``python -m kvhandoff.cli``: the same as the ``kvhandoff`` command."""

from __future__ import annotations

import sys

from kvhandoff.cli import main

sys.exit(main())
