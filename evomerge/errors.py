"""User-facing errors: one line that names the file, the key and what is allowed."""

from __future__ import annotations


class EvomergeError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits non-zero."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None, allowed: str | None = None):
        self.file = file
        self.key = key
        self.allowed = allowed
        self.detail = message
        super().__init__(self._format())

    def _format(self) -> str:
        parts = []
        if self.file:
            parts.append(str(self.file))
        if self.key:
            parts.append(f"key '{self.key}'")
        head = ": ".join(parts)
        msg = f"{head}: {self.detail}" if head else self.detail
        if self.allowed:
            msg += f" (allowed: {self.allowed})"
        return " ".join(msg.split()) if "\n" in msg else msg  # one line, whatever a library put in the detail

    def located(self, file: str, key: str | None = None) -> "EvomergeError":
        """The same error with the file (and a default key) filled in where it was missing."""
        if self.file:
            return self
        return type(self)(self.detail, file=file, key=self.key or key, allowed=self.allowed)


class ConfigError(EvomergeError):
    """A recipe or search-space file is malformed or asks for something impossible."""


class ModelLoadError(EvomergeError):
    """A model could not be found, read or is incompatible with the others."""


class DataError(EvomergeError):
    """A task's data file or data set is missing, malformed or too small."""
