"""Request paths as the gateway routes them: one canonical form for matching and forwarding, and route regexes.

Pure functions of bytes; it never decodes a reserved escape (%2F stays %2F in what is forwarded), never decodes
twice, and never compiles a pattern with a backtracking engine (a route regex can never stall a worker).

The canonical form (RFC 3986 6.2.2, as Kong 3 normalises before routing; nginx's merge_slashes):
- percent-escapes of unreserved characters (ALPHA DIGIT - . _ ~) are decoded, any hex case; every other escape is
  kept, with its hex made uppercase; a '%' without two hex digits after it is refused (400, as nginx does);
- empty segments are merged ('//' -> '/'), '.' and '..' segments resolved (also '%2e' ones, being decoded first);
  '..' never climbs above '/'.
The gateway matches routes on that form and forwards it, so the upstream decodes what was matched.

Two things an upstream may read differently from the canonical form: an encoded slash ('%2F', which many servers
decode into a separator after routing) and ';' path parameters (which Tomcat, Jetty and Spring strip from each
segment, so '/..;/' climbs). For a path with either, `strict_view` gives it read that way too; the proxy answers
400 unless both readings pick the same route, so neither can reach a route the canonical form did not.
"""

from __future__ import annotations

from typing import Any

import re2  # type: ignore[import-untyped]

UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")


class InvalidPath(ValueError):
    """A request path that cannot be read one way only (bad percent-encoding)."""


def needs_canonical(path: bytes) -> bool:
    """False for the common path that is already canonical: the check the proxy's hot path pays."""
    return b"%" in path or b"//" in path or b"/." in path or b";" in path


def _decode_unreserved(path: bytes) -> bytes:
    if b"%" not in path:
        return path
    parts = path.split(b"%")
    out = [parts[0]]
    for part in parts[1:]:
        if len(part) < 2 or part[0] not in HEX_DIGITS or part[1] not in HEX_DIGITS:
            raise InvalidPath("invalid percent-encoding in the request path")
        value = int(part[:2], 16)
        if value in UNRESERVED:
            out.append(bytes((value,)))
        else:
            out.append(b"%" + part[:2].upper())
        out.append(part[2:])
    return b"".join(out)


def _resolve_segments(path: bytes) -> bytes:
    """Merges empty segments and resolves '.' and '..' (RFC 3986 5.2.4); a trailing dot segment leaves a '/'."""
    segments = path.split(b"/")[1:]
    out: list[bytes] = []
    for segment in segments:
        if segment == b"..":
            if out:
                out.pop()
        elif segment != b"." and segment != b"":
            out.append(segment)
    result = b"/" + b"/".join(out)
    if segments and segments[-1] in (b"", b".", b"..") and result != b"/":
        result += b"/"
    return result


def canonical_path(path: bytes) -> bytes:
    """The form routes are matched on and the upstream is sent (see the module docstring). Raises InvalidPath."""
    if not needs_canonical(path):
        return path
    return _resolve_segments(_decode_unreserved(path))


def strict_view(canonical: bytes) -> bytes | None:
    """The canonical path as a server that decodes '%2F' and strips ';' parameters would route it; None when that
    reading cannot differ (no encoded slash, no ';')."""
    if b"%2F" not in canonical and b";" not in canonical:
        return None
    path = canonical.replace(b"%2F", b"/")
    if b";" in path:
        path = b"/".join(segment.partition(b";")[0] for segment in path.split(b"/"))
    return _resolve_segments(path)


def canonical_prefix(prefix: str) -> str:
    """A configured route path in the canonical form, so '/caf%65' and '/cafe' name the same routes."""
    raw = prefix.encode("utf-8")
    try:
        canonical = canonical_path(raw)
    except InvalidPath:
        return prefix  # matched as written: a request path with that escape is refused before it is matched
    return canonical.decode("utf-8", "surrogateescape")


# ---- route regexes --------------------------------------------------------------------------------------------


def _options() -> Any:
    options = re2.Options()
    options.log_errors = False  # a bad pattern is a schema error for the caller, not a line on stderr
    return options


RE2_OPTIONS = _options()
RegexError = re2.error


def compile_route_regex(pattern: str) -> Any:
    """A route's regex path, compiled by RE2 (linear time in the path's length whatever the pattern: no
    catastrophic backtracking). Matched against the canonical path's bytes, anchored at its start, like re.match.
    Raises RegexError for syntax RE2 does not have (backreferences, lookaround)."""
    return re2.compile(pattern.encode("utf-8"), RE2_OPTIONS)


def regex_error_text(exc: Exception) -> str:
    text = exc.args[0] if exc.args else str(exc)
    return text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
