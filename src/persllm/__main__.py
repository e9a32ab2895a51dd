"""`python -m persllm` runs the CLI."""

from persllm.cli import main

main()
