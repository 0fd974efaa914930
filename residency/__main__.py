"""`python -m residency` is the `residency` command."""

import sys

from residency.entry import main

sys.exit(main())
