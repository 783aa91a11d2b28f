"""Where secrets live: named in the config, read from the environment or a file."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, SecretStr


class SecretRef(BaseModel):
    """Where a secret lives: an environment variable or a file. Never the secret itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env: str | None = None
    file: Path | None = None

    def resolve(self, base_dir: Path) -> SecretStr | None:
        """The secret, or None when the variable is unset or the file is missing.

        A relative file is relative to `base_dir` (the config file's folder)."""
        if self.env:
            value = os.environ.get(self.env)
            if value:
                return SecretStr(value.strip())
        if self.file:
            path = self.file if self.file.is_absolute() else base_dir / self.file
            if path.is_file():
                return SecretStr(path.read_text().strip())
        return None

    def describe(self) -> str:
        where = [f"environment variable {self.env}" if self.env else "", str(self.file or "")]
        return " or file ".join(w for w in where if w) or "nowhere"


def secret_refs(value: object) -> Iterator[SecretRef]:
    """Every SecretRef inside a config model, list or dict, however deep."""
    if isinstance(value, SecretRef):
        yield value
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from secret_refs(getattr(value, name))
    elif isinstance(value, dict):
        for item in value.values():
            yield from secret_refs(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from secret_refs(item)


def resolved_values(refs: Iterable[SecretRef], base_dir: Path) -> set[str]:
    """The values of these secrets that can be read now (for redacting logs)."""
    values = (ref.resolve(base_dir) for ref in refs)
    return {value.get_secret_value() for value in values if value is not None}
