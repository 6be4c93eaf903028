"""Errors that featcache raises for bad input; the CLI turns them into messages."""


class FeatcacheError(Exception):
    """Base class: a problem with the user's input or environment, with what to do about it."""


class ArgumentError(FeatcacheError, ValueError):
    """An option or argument with a value featcache cannot use; the message says which and
    what to pass instead."""


class UnknownBackboneError(FeatcacheError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class UnsupportedModelError(FeatcacheError):
    """A model whose preprocessing or outputs featcache cannot reproduce faithfully."""


class WeightsError(FeatcacheError):
    """Weights could not be loaded (hub unreachable, bad --weights path, mismatched tensors)."""


class DatasetError(FeatcacheError):
    """A dataset spec, folder or image is unusable."""


class BadImageError(DatasetError):
    """One image could not be decoded."""

    def __init__(self, path: str, reason: str):
        super().__init__(
            f"cannot read image {path}: {reason}. Remove or replace the file, "
            "or pass --skip-bad to record it as skipped and go on."
        )
        self.path = path
        self.reason = reason


class OutputError(FeatcacheError):
    """An output path cannot be written (its folder does not exist, ...)."""


class StoreError(FeatcacheError):
    """A store is missing, incomplete, mismatched or lacks what was asked."""


class SpecMismatchError(StoreError):
    """An existing store or partial extraction was made with a different spec."""
