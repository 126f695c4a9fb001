"""`python -m sybil.perplexity`: the perplexity of a text. The entry point only; the command
lives in sybil.cli.perplexity (import that one: importing this module would rebind the
package attribute sybil.perplexity)."""

import sys

from sybil.cli.perplexity import main

if __name__ == "__main__":
    sys.exit(main())
