"""Errors a user can act on, each with its own exit code.

The CLI turns these into one message on stderr and a distinct non-zero exit status, so scripts can tell
bad input from a judge that broke from a bug (a Python traceback, exit 1).
"""
from __future__ import annotations


class SrlmError(Exception):
    """Base class: the message must say what was found, what was expected and, where possible, the fix."""

    exit_code = 2


class ConfigError(SrlmError):
    exit_code = 3


class InputError(SrlmError):
    """A data file (seed, prompts, records of a stage) is not what the stage expects."""

    exit_code = 4

    def __init__(self, message: str, *, path=None, line: int | None = None, field: str | None = None):
        where = ""
        if path is not None:
            where = str(path)
            if line is not None:
                where += f":{line}"
            if field:
                where += f": field '{field}'"
            where += ": "
        super().__init__(where + message)
        self.path, self.line, self.field = path, line, field


class RunDirError(SrlmError):
    """The run directory cannot be used (another config, another version, not writable)."""

    exit_code = 5


class ModelError(SrlmError):
    exit_code = 6


class JudgeIntegrityError(SrlmError):
    """The judge failed too often (or saturated) for its scores to be worth training on."""

    exit_code = 7


class OutputError(SrlmError):
    """An output cannot be written (disk full, read-only file system, no permission). What was written before
    stays valid: whole files are published by rename and record logs keep their complete lines, so freeing
    space and rerunning resumes."""

    exit_code = 8
