"""The key-auth plugin: identifies the consumer by an API key in a header or the query string (Kong's key-auth).

Never logs or forwards the key when hide_credentials is set; never does I/O (keys come from the ConsumerIndex).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

from shipyard.gateway.plugins.base import Consumer, FastRequest, Plugin, Reject, RequestContext, register
from shipyard.gateway.plugins.config_schema import ConfigReader

if TYPE_CHECKING:
    from shipyard.gateway.plugin_chain import ConsumerIndex  # which imports the plugins

KEY_AUTH_CHALLENGE = ("WWW-Authenticate", 'Key realm="shipyard"')


def consumers_of(ctx: RequestContext) -> ConsumerIndex | None:
    """The ConsumerIndex the data plane put in ctx.shared (None when there is none)."""
    return ctx.shared.get("consumers")


def anonymous_consumer(ctx: RequestContext, anonymous: str) -> bool:
    """Kong's `anonymous`: let the request through as that consumer instead of refusing it."""
    if not anonymous:
        return False
    index = consumers_of(ctx)
    consumer = index.get(anonymous) if index is not None else None
    if consumer is None:
        return False
    ctx.consumer = consumer
    ctx.credential = None
    ctx.set_header("X-Anonymous-Consumer", "true")
    ctx.set_header("X-Consumer-ID", consumer.id)
    ctx.set_header("X-Consumer-Username", consumer.username)
    return True


_IDENTITY_HEADERS: dict[tuple[str, str], tuple[Consumer, tuple[tuple[str, str], ...], frozenset[str]]] = {}


def identity_headers(consumer: Consumer, credential_id: str) -> tuple[tuple[tuple[str, str], ...], frozenset[str]]:
    """The X-Consumer-* headers for a consumer and credential, and their names in lower case: made once per
    credential, not per request (keyed by ids, which hash faster than the Consumer; a changed consumer with the
    same id, from a new route table, is made again)."""
    found = _IDENTITY_HEADERS.get((consumer.id, credential_id))
    if found is None or (found[0] is not consumer and found[0] != consumer):
        pairs = [("X-Consumer-ID", consumer.id)]
        if consumer.username:
            pairs.append(("X-Consumer-Username", consumer.username))
        if consumer.custom_id:
            pairs.append(("X-Consumer-Custom-ID", consumer.custom_id))
        if credential_id:
            pairs.append(("X-Credential-Identifier", credential_id))
        found = (consumer, tuple(pairs), frozenset(name.lower() for name, _ in pairs))
        if len(_IDENTITY_HEADERS) >= 10000:
            _IDENTITY_HEADERS.clear()
        _IDENTITY_HEADERS[(consumer.id, credential_id)] = found
    return found[1], found[2]


_IDENTITY_BLOCKS: dict[tuple[str, str], tuple[Consumer, bytes, frozenset[bytes]]] = {}


def identity_block(consumer: Consumer, credential_id: str) -> tuple[bytes, frozenset[bytes]]:
    """identity_headers as header lines for fast_access, and their names in lower case (bytes). UnicodeEncodeError
    for a consumer whose names are not Latin-1 (fast_access leaves those to access())."""
    found = _IDENTITY_BLOCKS.get((consumer.id, credential_id))
    if found is None or (found[0] is not consumer and found[0] != consumer):
        pairs, lnames = identity_headers(consumer, credential_id)
        block = "".join(f"{name}: {value}\r\n" for name, value in pairs).encode("latin-1")
        found = (consumer, block, frozenset(name.encode("latin-1") for name in lnames))
        if len(_IDENTITY_BLOCKS) >= 10000:
            _IDENTITY_BLOCKS.clear()
        _IDENTITY_BLOCKS[(consumer.id, credential_id)] = found
    return found[1], found[2]


def identify(ctx: RequestContext, consumer: Consumer, credential: Mapping[str, Any] | None) -> None:
    ctx.consumer = consumer
    ctx.credential = credential
    credential_id = str(credential.get("id") or "") if credential else ""
    ctx.set_headers(*identity_headers(consumer, credential_id))


@register
class KeyAuthPlugin(Plugin):
    name = "key-auth"
    priority = 1250

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        r = ConfigReader(config)
        self.key_names = frozenset(k.lower() for k in r.str_list("key_names", ["apikey"]))
        self.key_names_b = frozenset(k.encode("latin-1", "replace") for k in self.key_names)
        self._fast_keys: dict[bytes, tuple] = {}  # key as sent -> (index, consumer, credential, block, drop)
        self.key_in_header = r.bool("key_in_header", True)
        self.key_in_query = r.bool("key_in_query", True)
        self.hide_credentials = r.bool("hide_credentials", False)
        self.anonymous = r.str("anonymous", "")
        r.finish()
        if not self.key_names:
            raise_error("key_names: must have at least one name")

    def _find_key(self, ctx: RequestContext) -> tuple[str, str, str] | None:
        if self.key_in_header:
            for name, value in ctx.request_headers:
                if name.lower() in self.key_names:
                    return "header", name, value
        if self.key_in_query and ctx.query:
            for name, value in parse_qsl(ctx.query, keep_blank_values=True):
                if name.lower() in self.key_names:
                    return "query", name, value
        return None

    async def access(self, ctx: RequestContext) -> Reject | None:
        if ctx.consumer is not None and self.anonymous:
            return None  # already identified by another auth plugin (Kong's "logical OR")
        found = self._find_key(ctx)
        if found is None or not found[2]:
            if anonymous_consumer(ctx, self.anonymous):
                return None
            return Reject(401, "No API key found in request", headers=[KEY_AUTH_CHALLENGE])
        where, name, key = found
        index = consumers_of(ctx)
        hit = index.lookup_key(key) if index is not None else None
        if hit is None:
            if anonymous_consumer(ctx, self.anonymous):
                return None
            return Reject(401, "Invalid authentication credentials", headers=[KEY_AUTH_CHALLENGE])
        if self.hide_credentials:
            if where == "header":
                ctx.remove_header(name)
            else:
                ctx.query = urlencode([(k, v) for k, v in parse_qsl(ctx.query, keep_blank_values=True)
                                       if k.lower() not in self.key_names])
        identify(ctx, *hit)
        return None

    def fast_access(self, req: FastRequest) -> bool:
        """access() for a valid key in a header; anything else (no key, a key in the query, a bad key) is left to
        access()."""
        if not self.key_in_header:
            return False
        names = self.key_names_b
        for name, value in req.headers:
            if name.lower() in names:
                return self._fast_admit(req, name, value)
        return False

    def _fast_admit(self, req: FastRequest, name: bytes, value: bytes) -> bool:
        if not value:
            return False
        index = req.consumers
        # Per key as sent: what this index made of it (the index is rebuilt with every route table: a new one
        # misses, so a revoked key is looked up again and refused by access()).
        known = self._fast_keys.get(value)
        if known is None or known[0] is not index:
            known = self._fast_lookup(index, value)
            if known is None:
                return False
        _, consumer, credential, block, drop = known
        if self.hide_credentials:
            drop = drop | {name.lower()}
        req.consumer = consumer
        req.credential = credential
        req.drop = drop if req.drop is None else req.drop | drop
        req.upstream_block += block
        return True

    def _fast_lookup(self, index: ConsumerIndex | None, value: bytes) -> tuple[Any, ...] | None:
        hit = index.lookup_key(value.decode("latin-1")) if index is not None else None
        if hit is None:
            return None
        consumer, credential = hit
        credential_id = str(credential.get("id") or "") if credential else ""
        try:
            block, drop = identity_block(consumer, credential_id)
        except UnicodeEncodeError:
            return None
        if len(self._fast_keys) >= 10000:
            self._fast_keys.clear()
        known = self._fast_keys[value] = (index, consumer, credential, block, drop)
        return known


def raise_error(message: str) -> None:
    from shipyard.gateway.plugins.base import PluginConfigError

    raise PluginConfigError(message)
