"""redact: take credentials out of URIs before they are written anywhere (files, MLflow, logs, errors).

A tracking URI such as ``http://alice:pw@mlflow:5000`` or a presigned ``s3://...?X-Amz-Signature=...`` works as
given, but only its redacted form may leave the process.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"


# Query parameter names that carry secrets: token, key, secret, password, signature, anything X-Amz-*.
_SECRET_PARAM = re.compile(r"token|key|secret|passw|pwd|signature|sig$|credential|auth|^x-amz-", re.I)


_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+(?<![.,;:)\]])")  # not the sentence's period


def redact_uri(uri: str) -> str:
    """``uri`` with its userinfo replaced by *** and the values of secret-looking query parameters masked."""
    try:
        parts = urlsplit(uri)
    except ValueError:  # not parseable as a URI: mask everything between :// and an @, if any
        return re.sub(r"(://)[^/@\s]*@", rf"\1{MASK}@", uri)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_PARAM.search(k) for k, _ in pairs):
            query = urlencode([(k, MASK if _SECRET_PARAM.search(k) else v) for k, v in pairs], safe="*")
    if netloc == parts.netloc and query == parts.query:
        return uri
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Every URI inside free text (a log line, an exception message) redacted."""
    return _URI_IN_TEXT.sub(lambda m: redact_uri(m.group(0)), text)


def redact_values(values: dict[str, Any]) -> dict[str, Any]:
    """A flat mapping (params, tags, lineage) with every string value passed through redact_text."""
    return {k: redact_text(v) if isinstance(v, str) else v for k, v in values.items()}
