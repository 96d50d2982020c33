"""The one base class of the errors a user can act on.

Every error raised for bad input, a refused request or a missing file derives from `ArtaugError`;
the command line prints such an error as one line and exits with code 2. Anything else is a bug and
keeps its traceback.
"""


class ArtaugError(Exception):
    """An error whose message tells the user what is wrong and what to do; no traceback is needed."""
