"""Consul's ?filter= language (hashicorp/go-bexpr 0.1.2, the version Consul builds with): parse, check, evaluate.

Pure: it sees records as the JSON shapes the API answers with plus a schema of their Go types; it never reads
the store or knows about HTTP.

What go-bexpr 0.1.2 does and this copies, because clients depend on it:
- selectors are checked against the record type before anything is evaluated ("Selector "Foo" is not valid"), as
  are operators (a string field takes ==, !=, in, not in, matches, not matches; a list of strings in, not in,
  is empty, is not empty; a map is empty, is not empty, in, not in on its keys) and values (coerced to the
  field's type: "Port == abc" is an error, "Port == 0x50" is 80);
- a selector through a list of records (Checks.Status) is true when any element matches;
- a map key that is absent makes ==, in, is not empty false and every other operator true;
- a value may be a bare word or a selector: "Meta.env == qa" compares with the text "qa".
Regular expressions use Python's re where Go uses RE2; the syntax they share (all that Consul's docs show) matches
the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# ---- types of the records filtered (the Go structs' shapes) ----------------------------------------------------


@dataclass(frozen=True)
class ListOf:
    elem: Schema


@dataclass(frozen=True)
class MapOf:
    elem: Schema  # map[string]elem


Schema = str | ListOf | MapOf | dict[str, Any]  # "string" | "int" | "uint" | "bool" | "float" | ... | struct
PRIMITIVES = ("string", "int", "uint", "bool", "float")

EQ, NE, IN, NOT_IN, EMPTY, NOT_EMPTY, MATCHES, NOT_MATCHES = (
    "Equal", "Not Equal", "In", "Not In", "Is Empty", "Is Not Empty", "Matches", "Not Matches",
)
NEGATED = {NE: EQ, NOT_IN: IN, NOT_EMPTY: EMPTY, NOT_MATCHES: MATCHES}
# A map key that is absent: "nothing is equal to it, it contains nothing, nothing is in it" (go-bexpr 0.1.2's
# switch: Equal, IsNotEmpty and In are false, every other operator true).
ABSENT_KEY_FALSE = (EQ, NOT_EMPTY, IN)


class FilterError(ValueError):
    """An expression Consul would refuse; str() is Consul's whole error text."""


# ---- the grammar (go-bexpr's grammar.peg, as a recursive-descent parser with its error texts) -----------------


@dataclass
class Match:
    selector: list[str]
    op: str
    value: str | None
    converted: Any = None


@dataclass
class Not:
    operand: Node


@dataclass
class Binary:
    op: str  # "and" | "or"
    left: Node
    right: Node


Node = Match | Not | Binary

_IDENT = re.compile(r"[a-zA-Z][a-zA-Z0-9_]*")
_WS = re.compile(r"[ \t\r\n]+")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?")
_GO_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[0-7]{3}|[abfnrtv\\'\"])")
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\",
                   "'": "'", '"': '"'}


class _Failed(Exception):
    """A rule's own error (go-bexpr's &{ return false, errors.New(...) } predicates)."""

    def __init__(self, pos: int, rule: str, message: str) -> None:
        super().__init__(message)
        self.pos, self.rule, self.message = pos, rule, message


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.far = 0
        self.expected: set[str] = set()

    # -- terminals, recording what was expected at the farthest failure (pigeon's "no match found" list)

    def fail(self, pos: int, what: str) -> None:
        if pos > self.far:
            self.far, self.expected = pos, {what}
        elif pos == self.far:
            self.expected.add(what)

    def lit(self, pos: int, word: str) -> int | None:
        if self.text.startswith(word, pos):
            return pos + len(word)
        self.fail(pos, f'"{word}"')
        return None

    def ws(self, pos: int) -> int | None:
        m = _WS.match(self.text, pos)
        if m is None:
            self.fail(pos, "[ \\t\\r\\n]")
            return None
        return m.end()

    def opt_ws(self, pos: int) -> int:
        return self.ws(pos) or pos

    def word(self, pos: int, word: str) -> int | None:
        """_ word — whitespace is required before the word (go-bexpr's operator rules)."""
        after_ws = self.ws(pos)
        return None if after_ws is None else self.lit(after_ws, word)

    # -- expressions

    def parse(self) -> Node:
        pos = self.opt_ws(0)
        node = self.or_expr(pos)
        if node is not None:
            end = self.opt_ws(node[1])
            if end == len(self.text):
                return node[0]
            self.fail(end, "EOF")
        raise FilterError(self.no_match())

    def no_match(self) -> str:
        items = sorted(self.expected)
        listed = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]
        return f"{_position(self.text, self.far)}: no match found, expected: {listed}"

    def or_expr(self, pos: int) -> tuple[Node, int] | None:
        left = self.and_expr(pos)
        if left is None:
            return None
        after = self.word(left[1], "or")
        if after is not None and (start := self.ws(after)) is not None:
            right = self.or_expr(start)
            if right is not None:
                return Binary("or", left[0], right[0]), right[1]
        return left

    def and_expr(self, pos: int) -> tuple[Node, int] | None:
        left = self.not_expr(pos)
        if left is None:
            return None
        after = self.word(left[1], "and")
        if after is not None and (start := self.ws(after)) is not None:
            right = self.and_expr(start)
            if right is not None:
                return Binary("and", left[0], right[0]), right[1]
        return left

    def not_expr(self, pos: int) -> tuple[Node, int] | None:
        after = self.lit(pos, "not")
        if after is not None and (start := self.ws(after)) is not None:
            inner = self.not_expr(start)
            if inner is not None:
                node = inner[0]
                return (node.operand if isinstance(node, Not) else Not(node)), inner[1]
        return self.grouping(pos)

    def grouping(self, pos: int) -> tuple[Node, int] | None:
        inner: tuple[Node, int] | None = None
        after = self.lit(pos, "(")
        if after is not None:
            inner = self.or_expr(self.opt_ws(after))
            if inner is not None:
                close = self.lit(self.opt_ws(inner[1]), ")")
                if close is not None:
                    return inner[0], close
        matched = self.match_expr(pos)
        if matched is not None:
            return matched
        if after is not None and inner is not None:
            raise _Failed(self.opt_ws(inner[1]), "grouping", "Unmatched parentheses")
        return None

    def match_expr(self, pos: int) -> tuple[Node, int] | None:
        return self.selector_op_value(pos) or self.selector_op(pos) or self.value_op_selector(pos)

    def selector_op_value(self, pos: int) -> tuple[Node, int] | None:
        sel = self.selector(pos)
        if sel is None:
            return None
        for op, parse_op in ((EQ, self.op_symbol("==")), (NE, self.op_symbol("!=")),
                             (IN, self.op_words("contains")), (NOT_IN, self.op_words("not", "contains")),
                             (MATCHES, self.op_words("matches")), (NOT_MATCHES, self.op_words("not", "matches"))):
            after = parse_op(sel[1])
            if after is not None:
                value = self.value(after)
                if value is not None:
                    return Match(sel[0], op, value[0]), value[1]
        return None

    def selector_op(self, pos: int) -> tuple[Node, int] | None:
        sel = self.selector(pos)
        if sel is None:
            return None
        for op, words in ((EMPTY, ("is", "empty")), (NOT_EMPTY, ("is", "not", "empty"))):
            after = self.op_words(*words, trailing=False)(sel[1])
            if after is not None:
                return Match(sel[0], op, None), after
        return None

    def value_op_selector(self, pos: int) -> tuple[Node, int] | None:
        value = self.value(pos)
        if value is None:
            return None
        for op, words in ((IN, ("in",)), (NOT_IN, ("not", "in"))):
            after = self.op_words(*words)(value[1])
            if after is not None:
                sel = self.selector(after)
                if sel is None:
                    raise _Failed(after, "match", "Invalid selector")
                return Match(sel[0], op, value[0]), sel[1]
        return None

    def op_symbol(self, symbol: str) -> Any:
        def parse(pos: int) -> int | None:
            after = self.lit(self.opt_ws(pos), symbol)
            return None if after is None else self.opt_ws(after)
        return parse

    def op_words(self, *words: str, trailing: bool = True) -> Any:
        def parse(pos: int) -> int | None:
            at: int | None = pos
            for word in words:
                at = None if at is None else self.word(at, word)
            if at is not None and trailing:
                at = self.ws(at)
            return at
        return parse

    # -- selectors and values

    def selector(self, pos: int) -> tuple[list[str], int] | None:
        m = _IDENT.match(self.text, pos)
        if m is None:
            self.fail(pos, "[a-zA-Z]")
            return None
        parts, at = [m.group()], m.end()
        while True:
            step = self.selector_step(at)
            if step is None:
                return parts, at
            parts.append(step[0])
            at = step[1]

    def selector_step(self, pos: int) -> tuple[str, int] | None:
        if self.text.startswith(".", pos):
            m = _IDENT.match(self.text, pos + 1)
            if m is not None:
                return m.group(), m.end()
            self.fail(pos + 1, "[a-zA-Z]")
            return None
        self.fail(pos, '"."')
        if not self.text.startswith("[", pos):
            self.fail(pos, '"["')
            return None
        start = self.opt_ws(pos + 1)
        lit = self.string(start)
        if lit is None:
            raise _Failed(start, "index", "Invalid index")
        close = self.lit(self.opt_ws(lit[1]), "]")
        if close is None:
            raise _Failed(self.opt_ws(lit[1]), "index", "Unclosed index expression")
        return lit[0], close

    def value(self, pos: int) -> tuple[str, int] | None:
        sel = self.selector(pos)
        if sel is not None:
            return ".".join(sel[0]), sel[1]
        m = _NUMBER.match(self.text, pos)
        if m is not None:
            end = m.end()
            if end == len(self.text) or self.text[end] in " \t\r\n)":
                return m.group(), end
            raise _Failed(pos, "number", "Invalid number literal")
        self.fail(pos, '"-"')
        self.fail(pos, "[0-9]")
        return self.string(pos)

    def string(self, pos: int) -> tuple[str, int] | None:
        quote = self.text[pos : pos + 1]
        if quote not in ('"', "`"):
            self.fail(pos, '"\\""')
            self.fail(pos, '"`"')
            return None
        end = self.text.find(quote, pos + 1)
        if end < 0:
            raise _Failed(pos, "string", "Unterminated string literal")
        body = self.text[pos + 1 : end]
        if quote == "`":
            return body.replace("\r", ""), end + 1
        return _go_unquote(body, pos), end + 1


def _go_unquote(body: str, pos: int) -> str:
    """strconv.Unquote of a double-quoted Go string whose quotes were stripped."""
    if "\n" in body:
        raise _Failed(pos, "string", "invalid syntax")
    out, at = [], 0
    while at < len(body):
        if body[at] != "\\":
            out.append(body[at])
            at += 1
            continue
        m = _GO_ESCAPE.match(body, at)
        if m is None:
            raise _Failed(pos, "string", "invalid syntax")
        code = m.group(1)
        if code[0] in "xuU":
            out.append(chr(int(code[1:], 16)))
        elif code[0].isdigit():
            out.append(chr(int(code, 8)))
        else:
            out.append(_SIMPLE_ESCAPES[code])
        at = m.end()
    return "".join(out)


def _position(text: str, offset: int) -> str:
    """pigeon's error position: line:column (byte offset); columns count characters from 1."""
    before = text[:offset]
    line = before.count("\n") + 1
    column = len(before) - (before.rfind("\n") + 1) + 1
    return f"{line}:{column} ({len(before.encode())})"


# ---- checking an expression against a record type (go-bexpr's validate.go) ------------------------------------


def _operators(schema: Schema) -> tuple[str, ...]:
    if schema == "string":
        return (EQ, NE, IN, NOT_IN, MATCHES, NOT_MATCHES)
    if isinstance(schema, str):
        return (EQ, NE)
    if isinstance(schema, MapOf):
        return (EMPTY, NOT_EMPTY, IN, NOT_IN)
    if isinstance(schema, ListOf):
        primitive = isinstance(schema.elem, str)
        return (IN, NOT_IN, EMPTY, NOT_EMPTY) if primitive else (EMPTY, NOT_EMPTY)
    return ()


def _subfields(schema: Schema) -> dict[str, Schema] | None:
    """Names a selector may continue with after this field; "*" is any map key."""
    if isinstance(schema, dict):
        return schema
    if isinstance(schema, MapOf):
        return {"*": schema.elem}
    if isinstance(schema, ListOf) and isinstance(schema.elem, dict | MapOf | ListOf):
        return _subfields(schema.elem)
    return None


def _selector_text(parts: list[str]) -> str:
    return '"' + ".".join(parts) + '"'


def _check(node: Node, schema: dict[str, Schema]) -> None:
    if isinstance(node, Not):
        _check(node.operand, schema)
    elif isinstance(node, Binary):
        _check(node.left, schema)
        _check(node.right, schema)
    else:
        _check_match(node, schema)


def _check_match(node: Match, schema: dict[str, Schema]) -> None:
    fields: dict[str, Schema] | None = schema
    field: Schema = schema
    for i, part in enumerate(node.selector):
        if fields is not None and part in fields:
            field = fields[part]
        elif fields is not None and "*" in fields:
            field = fields["*"]
        else:
            raise FilterError(f"Selector {_selector_text(node.selector[: i + 1])} is not valid")
        fields = _subfields(field)
    if node.op not in _operators(field):
        raise FilterError(f'Invalid match operator "{node.op}" for selector {_selector_text(node.selector)}')
    if node.value is None:
        return
    node.converted = _coerce(node, _coercion_type(field))
    if node.op in (MATCHES, NOT_MATCHES):
        try:
            node.converted = re.compile(node.value)
        except re.error as exc:
            raise FilterError(f"Failed to compile regular expression {_go_quote(node.value)}: "
                              f"error parsing regexp: {exc}") from None


def _coercion_type(field: Schema) -> str:
    if isinstance(field, ListOf) and isinstance(field.elem, str):
        return field.elem
    return field if isinstance(field, str) else "string"


_GO_INT = re.compile(r"[+-]?(0[xX](_?[0-9a-fA-F])+|0[bB](_?[01])+|0[oO]?(_?[0-7])+|[1-9](_?[0-9])*|0)")


def _coerce(node: Match, kind: str) -> Any:
    raw = node.value or ""
    try:
        if kind in ("int", "uint"):
            return _parse_go_int(raw, kind)
        if kind == "bool":
            return {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True,
                    "0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False}[raw]
        if kind == "float":
            return float(raw)
    except (ValueError, KeyError):
        func = {"int": "ParseInt", "uint": "ParseUint", "bool": "ParseBool", "float": "ParseFloat"}[kind]
        raise FilterError(f"Failed to coerce value {_go_quote(raw)} for selector {_selector_text(node.selector)}: "
                          f"strconv.{func}: parsing {_go_quote(raw)}: invalid syntax") from None
    return raw


def _parse_go_int(raw: str, kind: str) -> int:
    """strconv.ParseInt(raw, 0, 64) (or ParseUint): base prefixes and underscores, as go-bexpr coerces."""
    if _GO_INT.fullmatch(raw) is None or (kind == "uint" and raw[:1] in "+-"):
        raise ValueError(raw)
    text = raw.replace("_", "")
    sign, digits = (-1, text[1:]) if text.startswith("-") else (1, text.lstrip("+"))
    legacy_octal = len(digits) > 1 and digits[0] == "0" and digits[1].isdigit()  # Go reads 017 as octal
    return sign * (int(digits, 8) if legacy_octal else int(digits, 0))


def _go_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ---- evaluation (go-bexpr's evaluate.go) ----------------------------------------------------------------------


def _zero(schema: Schema) -> Any:
    if isinstance(schema, dict):
        return {}
    if isinstance(schema, ListOf):
        return []
    if isinstance(schema, MapOf):
        return {}
    return {"string": "", "bool": False, "float": 0.0}.get(schema, 0)


def _evaluate(node: Node, record: Any, schema: dict[str, Schema]) -> bool:
    if isinstance(node, Not):
        return not _evaluate(node.operand, record, schema)
    if isinstance(node, Binary):
        left = _evaluate(node.left, record, schema)
        if node.op == "and":
            return left and _evaluate(node.right, record, schema)
        return left or _evaluate(node.right, record, schema)
    return _match(node, 0, record, schema)


def _match(node: Match, depth: int, value: Any, schema: Schema) -> bool:
    if depth >= len(node.selector):
        base = NEGATED.get(node.op, node.op)
        result = _apply(node, base, value)
        return not result if base != node.op else result
    if isinstance(schema, ListOf):
        items = value if isinstance(value, list) else []
        return any(_match(node, depth, item, schema.elem) for item in items)  # lists: any element
    part = node.selector[depth]
    if isinstance(schema, MapOf):
        mapping = value if isinstance(value, dict) else {}
        if part not in mapping or mapping[part] is None:
            return node.op not in ABSENT_KEY_FALSE
        return _match(node, depth + 1, mapping[part], schema.elem)
    assert isinstance(schema, dict)
    record = value if isinstance(value, dict) else {}
    field = schema[part]
    child = record.get(part)
    return _match(node, depth + 1, _zero(field) if child is None else child, field)


def _apply(node: Match, op: str, value: Any) -> bool:
    want = node.converted
    if op == EQ:
        return bool(value == want)
    if op == EMPTY:
        return len(value) == 0 if isinstance(value, list | dict | str) else False
    if op == MATCHES:
        return isinstance(value, str) and want.search(value) is not None
    # In: a key of a map, an element of a list, a substring of a string
    if isinstance(value, dict):
        return want in value
    if isinstance(value, list):
        return want in value
    return isinstance(value, str) and want in value


# ---- the public face ------------------------------------------------------------------------------------------


PREFIX = "Failed to create boolean expression evaluator: "


@dataclass
class Filter:
    """A checked expression, ready to test records of the type it was compiled for."""

    expression: Node
    schema: dict[str, Schema]

    def matches(self, record: Any) -> bool:
        return _evaluate(self.expression, record, self.schema)

    def select(self, records: list[Any]) -> list[Any]:
        return [r for r in records if self.matches(r)]


def compile_filter(expression: str, schema: dict[str, Schema]) -> Filter:
    """A Filter for records of `schema`, or FilterError with Consul's text."""
    parser = _Parser(expression)
    try:
        node = parser.parse()
    except _Failed as failed:
        raise FilterError(f"{PREFIX}{_position(expression, failed.pos)}: rule {failed.rule}: {failed.message}") \
            from None
    except FilterError as exc:
        raise FilterError(PREFIX + str(exc)) from None
    try:
        _check(node, schema)
    except FilterError as exc:
        raise FilterError(PREFIX + str(exc)) from None
    return Filter(node, schema)


# ---- Consul's record types (the Go structs its endpoints filter) ----------------------------------------------

WEIGHTS: dict[str, Schema] = {"Passing": "int", "Warning": "int"}
SERVICE_ADDRESS: dict[str, Schema] = {"Address": "string", "Port": "int"}
UPSTREAM: dict[str, Schema] = {
    "DestinationType": "string", "DestinationNamespace": "string", "DestinationPartition": "string",
    "DestinationPeer": "string", "DestinationName": "string", "Datacenter": "string",
    "LocalBindAddress": "string", "LocalBindPort": "int", "LocalBindSocketPath": "string",
    "LocalBindSocketMode": "string", "CentrallyConfigured": "bool",
    "MeshGateway": {"Mode": "string"},
}
PROXY: dict[str, Schema] = {
    "DestinationServiceName": "string", "DestinationServiceID": "string", "LocalServiceAddress": "string",
    "LocalServicePort": "int", "LocalServiceSocketPath": "string", "Mode": "string",
    "Upstreams": ListOf(UPSTREAM), "MeshGateway": {"Mode": "string"},
    "Expose": {"Checks": "bool", "Paths": ListOf({"ListenerPort": "int", "Path": "string",
                                                    "LocalPathPort": "int", "Protocol": "string"})},
    "TransparentProxy": {"OutboundListenerPort": "int", "DialedDirectly": "bool"},
    "AccessLogs": {"Enabled": "bool", "DisableListenerLogs": "bool", "Type": "string", "Path": "string",
                   "JSONFormat": "string", "TextFormat": "string"},
}
CONNECT: dict[str, Schema] = {"Native": "bool", "PeerMeta": {"SNI": ListOf("string"), "SpiffeID": ListOf("string"),
                                                              "Protocol": "string"}}

NODE: dict[str, Schema] = {
    "ID": "string", "Node": "string", "Address": "string", "Datacenter": "string", "PeerName": "string",
    "TaggedAddresses": MapOf("string"), "Meta": MapOf("string"),
}
NODE_SERVICE: dict[str, Schema] = {
    "Kind": "string", "ID": "string", "Service": "string", "Tags": ListOf("string"), "Address": "string",
    "TaggedAddresses": MapOf(SERVICE_ADDRESS), "Meta": MapOf("string"), "Port": "int", "SocketPath": "string",
    "Weights": WEIGHTS, "EnableTagOverride": "bool", "Proxy": PROXY, "Connect": CONNECT, "PeerName": "string",
    "Locality": {"Region": "string", "Zone": "string"},
}
# api.AgentService: /v1/agent/services filters these (it also carries the datacenter).
AGENT_SERVICE: dict[str, Schema] = {**NODE_SERVICE, "Datacenter": "string"}
HEALTH_CHECK_DEFINITION: dict[str, Schema] = {
    "HTTP": "string", "TLSServerName": "string", "TLSSkipVerify": "bool", "Header": MapOf(ListOf("string")),
    "Method": "string", "Body": "string", "DisableRedirects": "bool", "TCP": "string", "TCPUseTLS": "bool",
    "UDP": "string", "H2PING": "string", "H2PingUseTLS": "bool", "GRPC": "string", "GRPCUseTLS": "bool",
    "OSService": "string", "Interval": "int", "OutputMaxSize": "uint", "Timeout": "int",
    "DeregisterCriticalServiceAfter": "int", "ScriptArgs": ListOf("string"), "DockerContainerID": "string",
    "Shell": "string", "AliasNode": "string", "AliasService": "string", "TTL": "int",
}
HEALTH_CHECK: dict[str, Schema] = {
    "Node": "string", "CheckID": "string", "Name": "string", "Status": "string", "Notes": "string",
    "Output": "string", "ServiceID": "string", "ServiceName": "string", "ServiceTags": ListOf("string"),
    "Type": "string", "Interval": "string", "Timeout": "string", "ExposedPort": "int", "PeerName": "string",
    "Definition": HEALTH_CHECK_DEFINITION,
}
SERVICE_NODE: dict[str, Schema] = {
    "ID": "string", "Node": "string", "Address": "string", "Datacenter": "string", "PeerName": "string",
    "TaggedAddresses": MapOf("string"), "NodeMeta": MapOf("string"), "ServiceKind": "string",
    "ServiceID": "string", "ServiceName": "string", "ServiceTags": ListOf("string"), "ServiceAddress": "string",
    "ServiceTaggedAddresses": MapOf(SERVICE_ADDRESS), "ServiceWeights": WEIGHTS, "ServiceMeta": MapOf("string"),
    "ServicePort": "int", "ServiceSocketPath": "string", "ServiceEnableTagOverride": "bool",
    "ServiceProxy": PROXY, "ServiceConnect": CONNECT,
}
CHECK_SERVICE_NODE: dict[str, Schema] = {"Node": NODE, "Service": NODE_SERVICE, "Checks": ListOf(HEALTH_CHECK)}
