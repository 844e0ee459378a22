"""Keeping the Hub token out of what a training run writes (model cards, logs): redaction by value and by option."""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterable, Sequence


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with each secret's value and whatever follows a ``--hub_token`` option replaced by ``<redacted>``:
    by value, so that a token reaching the text by any route (an abbreviated option, a config file) is caught too."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<redacted>")
    return re.sub(r"(--hub_token[ =])\S+", r"\1<redacted>", text)


def launch_command(script: str, argv: Sequence[str], secrets: Iterable[str | None] = ()) -> str:
    """The ``accelerate launch`` command that ran ``script``, for a model card: quoted, with secrets redacted
    (``secrets`` plus ``HF_TOKEN``)."""
    text = " ".join(shlex.quote(arg) for arg in ["accelerate", "launch", script, *argv])
    return redact(text, [*secrets, os.environ.get("HF_TOKEN")])
