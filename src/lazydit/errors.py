"""The errors a user can cause and fix. `lazydit` (the CLI) prints their message as one line and exits non-zero;
every other exception is a bug and keeps its traceback."""


class LazyditError(Exception):
    """Base of every error whose message tells the user what was wrong and what to do."""


class CheckpointError(LazyditError, ValueError):
    """A checkpoint file does not fit the model it is loaded into, or is not a checkpoint."""


class GateMismatchError(LazyditError, ValueError):
    """Gates used with a model or a step count they were not trained for."""


class DataMissingError(LazyditError, FileNotFoundError):
    """A dataset file is not where it was looked for."""


class UsageError(LazyditError, ValueError):
    """Options that do not fit together or lie out of range."""


class OptionRangeError(UsageError):
    """An option's value out of its range or unparsable (a method spec's `interval=0`): the CLI exits 2, as argparse
    does for its own options."""


class NonFiniteError(LazyditError, FloatingPointError):
    """Sampling or training produced NaN or Inf: nothing is written from such a run."""


class SmallSampleWarning(UserWarning):
    """A metric computed on too few samples to mean what it usually means (FID on a few hundred images)."""
