"""`python -m dpo_client`: the same as the `dpo` command."""
from dpo_client.cli import main

main()
