"""kvhandoff.cuda_ext."""
