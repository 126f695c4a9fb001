"""`python -m sybil.download`: fetch preset checkpoints. The entry point only; the command
lives in sybil.cli.download (import that one: importing this module would rebind the
package attribute sybil.download)."""

import sys

from sybil.cli.download import main

if __name__ == "__main__":
    sys.exit(main())
