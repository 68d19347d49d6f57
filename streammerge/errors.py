"""One exception hierarchy. Every error says what was wrong, where, and what to do about it."""

from __future__ import annotations


class StreamMergeError(Exception):
    """Base class: ``message`` names the file/key and what was expected; ``hint`` says what to do."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None, details: list[str] | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = list(details or [])

    def __str__(self) -> str:
        parts = [self.message]
        if self.details:
            shown = self.details[:50]
            parts.extend(f"  - {d}" for d in shown)
            if len(self.details) > len(shown):
                parts.append(f"  ... and {len(self.details) - len(shown)} more")
        if self.hint:
            parts.append(f"hint: {self.hint}")
        return "\n".join(parts)


class InputError(StreamMergeError):
    """The base checkpoint is missing, malformed or inconsistent."""


class UsageError(InputError):
    """Options that do not go together, or an unknown option value: a usage error (exit 2)."""

    exit_code = 2


class AdapterError(StreamMergeError):
    """The adapter is malformed, unsupported, or does not fit the base."""


class QuantError(StreamMergeError):
    """A quantized tensor cannot be read or written."""


class OutputError(StreamMergeError):
    """The output location is unusable, or writing failed."""


class WorkerLost(OutputError):
    """The worker process or node running a shard died before it returned (the task is resubmitted)."""

    def __init__(self, error: BaseException):
        self.kind = type(error).__name__  # the executor's error: NodeDiedError, WorkerCrashedError, ...
        lines = str(error).strip().splitlines()
        super().__init__(f"{self.kind}: {lines[0] if lines else self.kind}")


class NonFiniteError(StreamMergeError):
    """NaN or Inf found in an adapter tensor or produced by a merge."""


class VerifyError(StreamMergeError):
    """The output is incomplete, corrupt, or differs from what its inputs produce."""
