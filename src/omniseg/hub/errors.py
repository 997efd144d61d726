"""The error every weights reader raises (its own module, so readers and the package share it without a cycle)."""


class CheckpointError(RuntimeError):
    """A weights file that cannot be read or does not fit the model; the message names the file."""
