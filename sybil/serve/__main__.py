"""`python -m sybil.serve`: the OpenAI-compatible server. The command lives in sybil.cli.serve."""

import sys

from sybil.cli.serve import main

sys.exit(main())
