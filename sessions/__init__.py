"""kvhandoff.sessions."""
