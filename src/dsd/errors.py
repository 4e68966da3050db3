"""The failures a user can cause or meet; the CLI prints each as one line and exits with status 2 (130 for a
Ctrl-C, as an interrupted command)."""


class DSDError(Exception):
    """Base class: the message is one line naming the key, file or step and what was expected."""


class ConfigError(DSDError, ValueError):
    """A bad configuration key or value."""


class DataError(DSDError, ValueError):
    """Bad or missing input data: the message names the file or folder."""


class CheckpointError(DSDError, ValueError):
    """A missing, corrupt, foreign or mismatched checkpoint."""


class NonFiniteLoss(DSDError, RuntimeError):
    """Training produced a NaN/inf loss more often than allowed."""


class Preempted(DSDError, RuntimeError):
    """SIGTERM / SIGUSR1 or a Ctrl-C (SIGINT) arrived; a resume checkpoint was written."""

    def __init__(self, message: str, signal_name: str = ""):
        super().__init__(message)
        self.exit_code = 130 if signal_name == "SIGINT" else 2
