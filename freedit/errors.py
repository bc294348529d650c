"""Errors the CLI reports as one line (exit 2): bad input or an environment that cannot do the job.

They live here, free of torch and TensorRT imports, so the CLI can catch them whatever is installed.
"""


class FreeditError(Exception):
    """Base of the errors that mean "this input or environment cannot do that", not a bug."""


class ExportError(FreeditError):
    """An export that could not be completed; nothing was left under the target name."""


class BuildError(FreeditError):
    """A TensorRT plan that could not be built; nothing was left under the plan's name."""


class StalePlanError(FreeditError):
    """A plan whose manifest does not match its ONNX, builder, device or settings."""


class BackendUnavailable(FreeditError):
    """A backend this machine cannot run (no GPU, no CUDA provider, no TensorRT)."""


class CapacityError(FreeditError):
    """An engine (e.g. a TensorRT plan's profile) cannot hold the rows a request needs."""


class ModelOutputError(FreeditError):
    """The model returned values sampling cannot use (NaN or infinity); generation stopped."""
