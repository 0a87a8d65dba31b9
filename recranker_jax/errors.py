"""The one exception type for a user's mistake (bad file, bad config, bad option).

Every stage raises `RecRankerError` for problems the user can fix; the CLI
prints it as one line and exits with code 2. Anything else is a bug and keeps
its traceback.
"""


class RecRankerError(Exception):
    """A user-fixable error; its message is one line saying what is wrong and what was expected."""

    exit_code = 2


class Interrupted(RecRankerError):
    """The user stopped a stage (Ctrl-C or SIGTERM); what it had saved is kept and it resumes.
    Exit code 130 for Ctrl-C, 143 for SIGTERM (128 + the signal's number)."""

    exit_code = 130

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code
