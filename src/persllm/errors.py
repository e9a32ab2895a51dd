"""Exceptions shown to users in one line; tracebacks are for bugs only."""

from __future__ import annotations


class PersllmError(Exception):
    """Base class for errors the CLI reports as a one-line message and exit code 1."""


class ConfigError(PersllmError):
    """The project file or a setting is wrong; the message names the file, the key and the fix."""

    def __init__(self, problems: list[str] | str, source: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        head = f"{source}: " if source else ""
        if len(self.problems) == 1:
            message = head + self.problems[0]
        else:
            message = head + f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


class DataError(PersllmError):
    """Input or intermediate data is missing or malformed."""


class BackendError(PersllmError):
    """An LLM backend failed; `retryable` tells the retry loop whether trying again can help."""

    def __init__(self, message: str, retryable: bool = False, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


class SmokeTestError(PersllmError):
    """A tuned model failed its post-training generation check and the run was asked to be strict about it."""


class DependencyError(PersllmError):
    """An optional dependency is missing; the message says what to install."""


def require(module: str, extra: str, purpose: str) -> None:
    """Import `module` or raise a DependencyError naming the pip extra that provides it."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise DependencyError(
            f"{purpose} needs the Python package '{module}', which is not installed: pip install 'persllm[{extra}]'"
        ) from exc


class ProjectLockedError(PersllmError):
    """Another process is writing to the project's output folder; the message names it."""
