"""One exception hierarchy for the whole kit.

It lives in ``edge_runtime`` because that package is the leaf every other package may import;
the edge box and the trainer raise the same types. Only the CLI layer turns these into an exit code.
"""
from __future__ import annotations


class DefectkitError(Exception):
    """Base of every error the kit raises on purpose. The message says what to fix."""

    exit_code = 1


class UserInputError(DefectkitError):
    """Bad input from a person: a wrong path, a malformed line spec, an empty data set. Exit code 2."""

    exit_code = 2


class DataError(UserInputError):
    """A data set that cannot be used as it is (names file and record)."""


class ConfigError(UserInputError):
    """A line spec or setting that is malformed or unknown."""


class MissingDependencyError(DefectkitError):
    """An optional package is not installed; the message names the package and the extra."""

    exit_code = 3


class BundleError(DefectkitError):
    """A bundle that does not verify (signature, checksum, schema) or cannot be loaded."""

    exit_code = 4


class ModelError(DefectkitError):
    """A model file that a backend cannot load or run (ops, version, shapes)."""

    exit_code = 5


def require(module: str, extra: str, purpose: str):
    """Import an optional module or raise a MissingDependencyError that says how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised via tests with a fake module name
        raise MissingDependencyError(
            f"{purpose} needs the Python package '{module}', which is not installed ({exc}). "
            f"Install it with: pip install 'defectkit[{extra}]'"
        ) from exc
