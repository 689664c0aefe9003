"""`python -m tinygpt ...`: the same as the `tinygpt` command."""
import sys

from tinygpt.cli import main

sys.exit(main())
