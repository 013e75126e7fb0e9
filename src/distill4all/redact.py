"""Secrets out of every error that is recorded or shown: a task's `last_error`, a stage's error in
the store and the manifest, and what the CLI prints.

A teacher may echo its key back in a 401's message, and an error may quote a `base_url` that
carries `user:password@`. The config registers its secrets here as it is validated (each
teacher's `api_key` and its URL's password, the judge's too); `redact` takes them out of a text,
with every URL's userinfo and the values of environment variables named like keys
(`OPENAI_API_KEY`, `HF_TOKEN`…), which a message may quote without the config knowing them.
"""

from __future__ import annotations

import base64
import os
import re
from urllib.parse import unquote, urlsplit

MASK = "***"
MIN_SECRET_CHARS = 4  # a shorter "secret" is a piece of ordinary words: masking it would garble every message

_known: set[str] = set()
_URL_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]*(?:@[^/\s@]*)*@")
_KEY_NAMED = re.compile(r"(?:^|_)(?:API_?)?KEY$|TOKEN$|SECRET$|PASSWORD$|PASSWD$", re.IGNORECASE)


def remember(secret: str | None) -> None:
    """Mask `secret` wherever `redact` finds it from now on."""
    if secret and len(secret) >= MIN_SECRET_CHARS:
        _known.add(secret)


def remember_url(url: str | None) -> None:
    """A URL's password, as written and percent-decoded, and the Basic credentials made of it
    (a server may echo its Authorization header)."""
    if not url or "@" not in url:
        return
    try:
        parts = urlsplit(url)
        user, password = parts.username, parts.password
    except ValueError:
        return
    if password is None:
        return
    for secret in {password, unquote(password)}:
        remember(secret)
    remember(base64.b64encode(f"{unquote(user or '')}:{unquote(password)}".encode()).decode())


def strip_userinfo(url: str) -> str:
    """The URL with its `user:password@` masked (for messages that name an endpoint)."""
    return _URL_USERINFO.sub(rf"\1{MASK}@", url)


def redact(text: str) -> str:
    """`text` without any secret known here, any URL's userinfo, or a key-named variable's value."""
    if not text:
        return text
    secrets = _known | {v for k, v in os.environ.items() if _KEY_NAMED.search(k) and len(v) >= MIN_SECRET_CHARS}
    for secret in sorted(secrets, key=len, reverse=True):  # longest first: one secret may hold another
        if secret in text:
            text = text.replace(secret, MASK)
    return strip_userinfo(text)
