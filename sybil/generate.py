"""`python -m sybil.generate`: stream GPT-2 text from the command line. The entry point only; the command
lives in sybil.cli.generate (import that one: importing this module would rebind the
package attribute sybil.generate (the generate function))."""

import sys

from sybil.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
