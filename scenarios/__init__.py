"""kvhandoff.scenarios: the four field failures of the seeds, each reproduced unsafe and
then prevented (``kvhandoff scenario NNN [--unsafe] [--fixed]``).

One private module per scenario (``_s000`` .. ``_s003``) and a runner (``_runner``: the
unchecked collectives the unsafe runs use, the watchdog that ends a hang, the verdict).
``command`` is the CLI entry. Every scenario uses only the runtime's public API; imports of
torch, anyio and mpi4py happen inside functions, so importing this package stays cheap.
"""

from __future__ import annotations

from kvhandoff.scenarios._runner import SCENARIOS, Verdict

__all__ = ["SCENARIOS", "Verdict"]
