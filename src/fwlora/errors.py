"""Every exception fwlora raises on purpose, in one place (pure Python: the method math imports it too).

    FWLoRAError (a ValueError)     the root: a problem the user can fix; the CLI prints it, exit code 2
      MethodError                  a method's library refuses a setting, a model or a call
      UserError                    bad input to the experiment system: a setting, a path, a missing package
        DataError                  a malformed data file; the message names the file and row
    NonFiniteFisherError           a warm-up statistic became NaN/inf (training diverged; not the user's doing)
    NonFiniteError                 the loss or the gradient became NaN/inf; the message names the step
    TrainingInterrupted            SIGINT/SIGTERM stopped a run after it saved a checkpoint (resume it)
"""

from __future__ import annotations


class FWLoRAError(ValueError):
    """A problem the user can fix: a bad setting, an unsupported model, a missing file or package."""


class MethodError(FWLoRAError):
    """A method's library (FWLoRAConfig, FisherWeightedLoRA, ...) refuses a setting, a model or a call."""


class UserError(FWLoRAError):
    """Bad input, a bad setting or a missing resource, with a message that says how to fix it."""


class DataError(UserError):
    """A malformed data file; the message names the file and line (or row)."""


class NonFiniteFisherError(FloatingPointError):
    """A layer's gradient statistic became NaN/inf during a warm-up: training diverged."""


class NonFiniteError(FloatingPointError):
    """The loss or the gradient became NaN/inf; the message names the step."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped a run after it saved a checkpoint (not an error: resume with --resume)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def bad_setting(settings: object, name: str, why: str) -> MethodError:
    """The error for one field of a method's settings dataclass: 'Class.field = value: why'."""
    return MethodError(f"{type(settings).__name__}.{name} = {getattr(settings, name)!r}: {why}")
