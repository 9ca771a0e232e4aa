"""`python -m edgeseq`: the same as the `edgeseq` command."""
from edgeseq.cli import main

main()
