"""The one exception type whose message is meant for the user, as a single line."""


class SybilError(Exception):
    """A problem the user can fix; the CLIs print its message and exit with status 2."""
