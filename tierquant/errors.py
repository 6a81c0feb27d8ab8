"""The one exception type for expected failures: bad input, bad config, missing files."""


class TierquantError(Exception):
    """An expected failure with a message a user can act on.

    Stage entry points print the message (no traceback) and exit non-zero.
    The message names the file, tensor or config key at fault and what to do.
    """
