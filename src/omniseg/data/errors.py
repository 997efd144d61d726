"""One error type for bad input, so callers can catch it and users always see which file is wrong."""

from __future__ import annotations

import os


class DataError(ValueError):
    """Bad or inconsistent input data. The message always starts with the offending file."""

    def __init__(self, path: str | os.PathLike | None, problem: str | None = None):
        if problem is None:
            # One-argument form: a DataLoader worker re-raising the error in the main process passes
            # just the (already file-naming) message; the error keeps its type across the boundary.
            path, problem = None, str(path)
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)
