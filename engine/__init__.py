"""kvhandoff.engine."""
