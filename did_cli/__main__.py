"""`python -m did_cli` runs the CLI (what `accelerate launch -m did_cli finetune ...` needs)."""

from did_cli.cli import main

main()
