"""Exceptions raised by cordseg. The CLI turns each into one line on stderr."""


class CordsegError(Exception):
    """Base class of every error cordseg raises on purpose."""


class InputError(CordsegError):
    """The input image cannot be read or is not a usable 3D volume."""


class NoCordError(CordsegError):
    """No spinal cord was found in the image."""


class ModelError(CordsegError):
    """A model file is missing, unreadable or lacks the metadata the runtime needs."""


class OutputError(CordsegError):
    """The output cannot be written where asked."""


class ResourceError(CordsegError):
    """The computer ran out of something the run needs (memory)."""


class CordsegWarning(UserWarning):
    """Something in the input was repaired or assumed; the run goes on."""
