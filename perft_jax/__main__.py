"""`python -m perft_jax COMMAND [args ...]`: train, eval, generate, convert and params (perft_jax/cli.py)."""
import sys

from perft_jax.cli import main

sys.exit(main())
