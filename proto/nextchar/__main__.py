"""`python -m nextchar ...` is the `nextchar` command."""

import sys

from nextchar.client.cli import main

sys.exit(main())
