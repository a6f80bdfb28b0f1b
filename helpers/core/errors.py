"""One exception type for bad user input, so the CLI can print one line and exit non-zero."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input that the user must fix: a malformed list, a missing image, an unknown name.

    The message is one line and, where a file is at fault, starts with ``file:line:``.
    """


def at(path: str | Path, line: int | None, message: str) -> InputError:
    """Build an :class:`InputError` whose message names the file (and line, when known)."""
    where = f"{path}:{line}" if line is not None else f"{path}"
    return InputError(f"{where}: {message}")


def choose(value, choices, what: str):
    """Return ``value`` if it is one of ``choices``, else raise a one-line :class:`InputError`.

    >>> choose("avg", ("avg", "gem"), "pooling")
    'avg'
    """
    if value not in choices:
        raise InputError(f"unknown {what} {value!r}; choose one of: {', '.join(map(str, choices))}")
    return value
