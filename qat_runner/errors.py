"""The user-facing error type: no Hydra here, so the modules that build datasets, models and
checkpoints raise it without importing Hydra (`config.py` re-exports it)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A bad value in the user's config: reported as one line, exit code 2, before training."""


def first_sentence(err: BaseException) -> str:
    """The gist of a library's error, without its advice (torch suggests weights_only=False)."""
    return str(err).splitlines()[0].split(". ")[0][:200]
