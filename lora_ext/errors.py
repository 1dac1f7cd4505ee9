"""Errors with one clear line each: what file, what went wrong."""


class LoraExtError(Exception):
    """Base class: every error this package raises on bad input."""


class LoraFileError(LoraExtError):
    """A file could not be read as a LoRA or checkpoint. ``str()`` is one line naming both."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class AdapterError(LoraExtError):
    """A key group's tensors are inconsistent with the adapter type that claimed them."""


class BaseModelMismatch(LoraExtError):
    """A LoRA made for one base model was applied to another."""
