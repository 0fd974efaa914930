"""`python -m residency` is the `residency` command."""

import sys

from residency.cli import main

sys.exit(main())
