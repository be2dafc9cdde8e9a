"""The jwt plugin: verifies HS256/RS256 tokens against the consumer's jwt credential found by a claim (Kong's jwt).

Never trusts a token's own idea of its algorithm or key: both come from the stored credential.
"""

from __future__ import annotations

import base64
import functools
import json
import time
from collections.abc import Mapping
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qsl

import jwt
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from shipyard.gateway.plugins.base import Plugin, PluginConfigError, Reject, RequestContext, register
from shipyard.gateway.plugins.config_schema import ConfigReader
from shipyard.gateway.plugins.key_auth import anonymous_consumer, consumers_of, identify

ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256")


@functools.lru_cache(maxsize=1024)
def public_key(pem: str) -> RSAPublicKey | EllipticCurvePublicKey:
    """Parsing a PEM costs more than verifying a signature; credentials change rarely."""
    key = load_pem_public_key(pem.encode())
    if not isinstance(key, RSAPublicKey | EllipticCurvePublicKey):  # what RS* and ES* verify with (a DSA key: no)
        raise ValueError("not an RSA or EC public key")  # refused by access() as an invalid signature
    return key


def verification_key(credential: Mapping[str, Any],
                     secret_is_base64: bool) -> RSAPublicKey | EllipticCurvePublicKey | bytes:
    algorithm = str(credential.get("algorithm") or "HS256")
    if algorithm.startswith(("RS", "ES")):
        return public_key(str(credential.get("rsa_public_key") or ""))
    secret = str(credential.get("secret") or "")
    return base64.b64decode(secret) if secret_is_base64 else secret.encode()


def _unauthorized(message: str) -> Reject:
    return Reject(401, message)


@register
class JwtPlugin(Plugin):
    name = "jwt"
    priority = 1450

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        r = ConfigReader(config)
        self.uri_param_names = r.str_list("uri_param_names", ["jwt"])
        self.cookie_names = r.str_list("cookie_names", [])
        self.header_names = [h.lower() for h in r.str_list("header_names", ["authorization"])]
        self.key_claim_name = r.str("key_claim_name", "iss")
        self.claims_to_verify = r.str_list("claims_to_verify", ["exp"])
        for claim in self.claims_to_verify:
            if claim not in ("exp", "nbf"):
                raise PluginConfigError(f"claims_to_verify: expected one of: exp, nbf (got '{claim}')")
        self.leeway = r.int("leeway", 0, minimum=0) or 0
        self.maximum_expiration = r.int("maximum_expiration", 0, minimum=0) or 0
        self.secret_is_base64 = r.bool("secret_is_base64", False)
        self.claims_to_headers = r.str_map("claims_to_headers")
        self.anonymous = r.str("anonymous", "")
        r.finish()

    def _token(self, ctx: RequestContext) -> str | None:
        if ctx.query:
            for name, value in parse_qsl(ctx.query):
                if name in self.uri_param_names and value:
                    return value
        if self.cookie_names:
            raw = ctx.header("cookie")
            if raw:
                cookies = SimpleCookie()
                try:
                    cookies.load(raw)
                except Exception:
                    cookies = SimpleCookie()
                for name in self.cookie_names:
                    if name in cookies and cookies[name].value:
                        return cookies[name].value
        for name, value in ctx.request_headers:
            if name.lower() in self.header_names:
                scheme, _, token = value.strip().partition(" ")
                if scheme.lower() == "bearer" and token.strip():
                    return token.strip()
        return None

    def _refuse(self, ctx: RequestContext, reject: Reject) -> Reject | None:
        return None if anonymous_consumer(ctx, self.anonymous) else reject

    async def access(self, ctx: RequestContext) -> Reject | None:
        if ctx.consumer is not None and self.anonymous:
            return None
        token = self._token(ctx)
        if token is None:
            return self._refuse(ctx, _unauthorized("Unauthorized"))
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            return self._refuse(ctx, _unauthorized(f"Bad token; {exc}"))
        key = claims.get(self.key_claim_name)
        if not key or not isinstance(key, str):
            return self._refuse(ctx, _unauthorized(f"No mandatory '{self.key_claim_name}' in claims"))
        index = consumers_of(ctx)
        hit = index.lookup_jwt(key) if index is not None else None
        if hit is None:
            return self._refuse(ctx, _unauthorized(f"No credentials found for given '{self.key_claim_name}'"))
        consumer, credential = hit
        algorithm = str(credential.get("algorithm") or "HS256")
        if header.get("alg") != algorithm:
            return self._refuse(ctx, _unauthorized("Invalid algorithm"))
        try:
            verified = jwt.decode(
                token, verification_key(credential, self.secret_is_base64), algorithms=[algorithm],
                leeway=self.leeway,
                options={"verify_exp": "exp" in self.claims_to_verify, "verify_nbf": "nbf" in self.claims_to_verify,
                         "verify_aud": False, "verify_iat": False, "verify_iss": False,
                         "require": list(self.claims_to_verify)},
            )
        except jwt.ExpiredSignatureError:
            return self._refuse(ctx, _unauthorized("token expired"))
        except jwt.ImmatureSignatureError:
            return self._refuse(ctx, _unauthorized("token not valid yet"))
        except jwt.MissingRequiredClaimError as exc:
            return self._refuse(ctx, _unauthorized(f"token has no '{exc.claim}' claim"))
        except (jwt.InvalidSignatureError, jwt.DecodeError, ValueError, TypeError):
            return self._refuse(ctx, _unauthorized("Invalid signature"))
        except jwt.PyJWTError as exc:
            return self._refuse(ctx, _unauthorized(f"Bad token; {exc}"))
        too_long = self.maximum_expiration and "exp" in verified
        if too_long and float(verified["exp"]) - time.time() > self.maximum_expiration:
            return self._refuse(ctx, _unauthorized("exceeds maximum allowed expiration"))
        identify(ctx, consumer, credential)
        for claim, header_name in self.claims_to_headers.items():
            if claim in verified:
                value = verified[claim]
                ctx.set_header(header_name, value if isinstance(value, str) else json.dumps(value))
        ctx.shared["jwt_claims"] = verified
        return None
