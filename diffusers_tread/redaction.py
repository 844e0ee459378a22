"""Keeping the Hub token out of what a training run writes (model cards, logs): redaction by value and by option."""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterable, Sequence

# The value after any spelling of a token option (--hub_token, --hub_tok, --hub-tokn, --token=...), and anything that
# looks like a Hugging Face access token ("hf_" and at least 12 letters or digits; real ones have 34).
_TOKEN_OPTION = re.compile(r"(--(?:hub[_-]t[\w-]*|tok|token)(?:=|\s+|'\s*,\s*'))([^\s',\]]+)", re.IGNORECASE)
_TOKEN_LIKE = re.compile(r"\bhf_[A-Za-z0-9]{12,}")


def redact_tokens(text: str) -> str:
    """``text`` with access tokens replaced by ``<redacted>``: the value of the ``HF_TOKEN`` environment variable,
    whatever follows an option spelled like ``--hub_token`` (including abbreviations and typos argparse rejects and
    then prints, as in "unrecognized arguments: --hub_tok hf_..."), and any ``hf_...``-looking word."""
    secret = os.environ.get("HF_TOKEN")
    if secret:
        text = text.replace(secret, "<redacted>")
    text = _TOKEN_OPTION.sub(r"\1<redacted>", text)
    return _TOKEN_LIKE.sub("<redacted>", text)


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with each secret's value replaced by ``<redacted>`` (by value, so that a token reaching the text by
    any route, an abbreviated option or a config file, is caught too), then `redact_tokens`."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<redacted>")
    return redact_tokens(text)


def launch_command(script: str, argv: Sequence[str], secrets: Iterable[str | None] = ()) -> str:
    """The ``accelerate launch`` command that ran ``script``, for a model card: quoted, with secrets redacted
    (``secrets`` plus ``HF_TOKEN``)."""
    text = " ".join(shlex.quote(arg) for arg in ["accelerate", "launch", script, *argv])
    return redact(text, [*secrets, os.environ.get("HF_TOKEN")])
