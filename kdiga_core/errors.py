"""Errors raised by kdiga_core.

Every error carries one clear sentence meant for a person; the service turns
them into 4xx responses unchanged, so the wording is part of the contract.
"""


class KdigaError(ValueError):
    """Base class: bad input the user can fix. The message is one sentence."""


class UnknownNameError(KdigaError):
    """A name picked from a registry (architecture, attack, method) is unknown."""

    def __init__(self, kind: str, name: str, valid: list[str]):
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        super().__init__(f"Unknown {kind} '{name}'; valid names are: {', '.join(self.valid)}.")


class ModelFormatError(KdigaError):
    """A model file is in a format we refuse or cannot read."""


class DataError(KdigaError):
    """A dataset file is malformed or unsafe."""


class CancelledError(Exception):
    """Raised inside the training loop when the caller's cancel check returns True."""


class StoppedError(Exception):
    """Raised at a safe point (after a checkpoint was written) when the job's time budget is spent.

    Not a failure: the job keeps its checkpoint and a later run with ``resume=True`` continues it.
    The message is one sentence for a person.
    """
