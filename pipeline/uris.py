"""URIs as logs and messages show them: credentials masked.

`mask_uri` hides the password (or token) of a URI's userinfo and the values of query parameters
that look like secrets (`token`, `password`, `secret`, `key`, `signature`, `sig`, `credential`,
`auth`, in any case, as part of a longer name too), so `https://user:tok@host/?sig=abc&a=1`
logs as `https://user:***@host/?sig=***&a=1`. Anything that is not a URI is returned unchanged.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["mask_uri"]

_SECRET_NAME = re.compile(r"token|passw|pwd|secret|key|sig|credential|auth", re.IGNORECASE)
MASK = "***"


def mask_uri(value: str) -> str:
    """`value` with the secrets of a URI masked (see the module's docstring)."""
    if not isinstance(value, str) or "://" not in value:
        return value
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - a malformed port raises here
    except ValueError:
        return re.sub(r"//[^/@]*@", f"//{MASK}@", value)
    netloc = parts.netloc
    secret_query = any(_SECRET_NAME.search(k) for k, _ in parse_qsl(parts.query))
    if "@" not in netloc and not secret_query:
        return value
    if "@" in netloc:
        user = parts.username or ""
        where = netloc.rsplit("@", 1)[1]
        shown = f"{user}:{MASK}" if parts.password is not None else (MASK if user else "")
        netloc = f"{shown}@{where}" if shown else where
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_NAME.search(k) for k, _ in pairs):
            query = urlencode(
                [(k, MASK if _SECRET_NAME.search(k) else v) for k, v in pairs], safe="*"
            )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
