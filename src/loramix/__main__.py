"""`python -m loramix` (also what torchrun and accelerate launch run)."""

from loramix.cli import main

main()
