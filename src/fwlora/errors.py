"""The one exception type for mistakes a user can fix; the CLI prints it and exits with code 2."""

from fwlora.method import FWLoRAError


class UserError(FWLoRAError):
    """Bad input, a bad setting or a missing resource, with a message that says how to fix it."""


class DataError(UserError):
    """A malformed data file; the message names the file and line."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped a run after it saved a checkpoint (not an error: resume with --resume)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class NonFiniteError(Exception):
    """The loss or the gradient became NaN/inf; the message names the step."""
