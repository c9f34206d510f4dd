"""redact: take credentials out of URIs before they are written anywhere (files, MLflow, logs, errors).

A tracking URI such as ``http://alice:pw@mlflow:5000`` or a presigned ``s3://...?X-Amz-Signature=...`` works as
given, but only its redacted form may leave the process.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote, unquote_plus, urlsplit, urlunsplit

MASK = "***"


# Query parameter names that carry secrets: token, key, secret, password, signature, anything X-Amz-*.
_SECRET_PARAM = re.compile(r"token|key|secret|passw|pwd|signature|sig$|credential|auth|^x-amz-", re.I)


_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+(?<![.,;:)\]])")  # not the sentence's period


def redact_uri(uri: str) -> str:
    """``uri`` with its userinfo replaced by *** and the values of secret-looking query parameters masked; a URI
    inside a query value (``dvc://path?repo=https://user:token@host/r``) is redacted by the same rule."""
    try:
        parts = urlsplit(uri)
    except ValueError:  # not parseable as a URI: mask everything between :// and an @, if any
        return re.sub(r"(://)[^/@\s]*@", rf"\1{MASK}@", uri)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
    query = "&".join(_redact_pair(p) for p in parts.query.split("&")) if parts.query else parts.query
    if netloc == parts.netloc and query == parts.query:
        return uri
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _redact_pair(pair: str) -> str:
    """One ``name=value`` of a query: the value masked when the name looks secret, redacted when it is a URI (plain
    or percent-encoded); anything else kept byte for byte."""
    name, sep, value = pair.partition("=")
    if not sep:
        return pair
    if _SECRET_PARAM.search(unquote_plus(name)):
        return f"{name}={MASK}"
    plain = unquote_plus(value)
    if "://" not in plain and "@" not in plain:
        return pair
    safe = redact_uri(plain)
    if safe == plain:
        return pair
    return f"{name}={safe if plain == value else quote(safe, safe='*')}"


def redact_text(text: str) -> str:
    """Every URI inside free text (a log line, an exception message) redacted."""
    return _URI_IN_TEXT.sub(lambda m: redact_uri(m.group(0)), text)


def redact_values(values: dict[str, Any]) -> dict[str, Any]:
    """A flat mapping (params, tags, lineage) with every string value passed through redact_text."""
    return {k: redact_text(v) if isinstance(v, str) else v for k, v in values.items()}


def redact_tree(value: Any) -> Any:
    """Nested dicts/lists (a params mapping, a manifest) with every string passed through redact_text."""
    if isinstance(value, dict):
        return {k: redact_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_tree(v) for v in value]
    return redact_text(value) if isinstance(value, str) else value
