"""kvhandoff.collectives."""
