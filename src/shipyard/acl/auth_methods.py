"""Consul's ACL auth methods of type `jwt` and their binding rules: checking their definitions, verifying a bearer JWT
into an identity (selectable fields and projected variables), and turning the rules an identity matches into the
roles, policies and identities of the token a login makes (Consul's agent/consul/auth/binder.go).

Pure: it never reads the store, never fetches keys over the network (JWKSURL and OIDC discovery are refused), and
never puts a bearer token or a claim value in an error message a caller could get back from someone else's JWT.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from shipyard.acl.templates import TEMPLATES, variables_of
from shipyard.errors import BadRequest

METHOD_TYPES = ("jwt",)
BIND_TYPES = ("service", "node", "policy", "role", "templated-policy")
_METHOD_NAME = re.compile(r"^[A-Za-z0-9\-_]{1,128}$")  # Consul's validAuthMethodName
_SERVICE_NAME = re.compile(r"^[a-z0-9]([a-z0-9\-_]*[a-z0-9])?$")  # acl.IsValidServiceIdentityName
_NODE_NAME = re.compile(r"^[a-z0-9]([a-z0-9\-_]*[a-z0-9])?$")  # acl.IsValidNodeIdentityName
_POLICY_OR_ROLE_NAME = re.compile(r"^[A-Za-z0-9\-_]{1,256}$")  # acl.IsValidPolicyName / IsValidRoleName
_HIL_VARIABLE = re.compile(r"\$\{([^}]*)\}")
MIN_TOKEN_TTL, MAX_TOKEN_TTL = 60.0, 24 * 3600.0  # Consul's ACLMinTokenTTL / ACLMaxTokenTTL defaults
# go-sso's defaults when a leeway is 0 (-1 turns the check's leeway off).
DEFAULT_EXPIRY_LEEWAY, DEFAULT_NOT_BEFORE_LEEWAY, DEFAULT_CLOCK_SKEW_LEEWAY = 150.0, 150.0, 60.0
_SIGNING_ALGS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "EdDSA")
_JWT_CONFIG_KEYS = {"JWTValidationPubKeys", "JWKSURL", "JWKSCACert", "OIDCDiscoveryURL", "OIDCDiscoveryCACert",
                    "BoundIssuer", "BoundAudiences", "ClaimMappings", "ListClaimMappings", "JWTSupportedAlgs",
                    "ExpirationLeeway", "NotBeforeLeeway", "ClockSkewLeeway"}


class LoginFailed(Exception):
    """A bearer token that does not verify; str() says why (never its content)."""


def go_duration(seconds: float) -> str:
    """Seconds as Go's time.Duration prints them ("1h0m0s", "10m0s", "30s", "0s")."""
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def parse_duration(value: Any, what: str) -> float:
    """A Go duration ("10m", "1h30m") or nanoseconds as a number, in seconds; BadRequest naming `what`."""
    if isinstance(value, bool):
        raise BadRequest(f"Invalid Auth Method: {what} must be a duration")
    if isinstance(value, int | float):
        return value / 1e9
    text = str(value)
    if text in ("", "0"):
        return 0.0
    parts = re.findall(r"(-?\d+(?:\.\d+)?)(ns|us|ms|s|m|h)", text)
    if not parts or "".join(a + b for a, b in parts) != text:
        raise BadRequest(f"Invalid Auth Method: {what} {text!r} is not a duration")
    scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(a) * scale[b] for a, b in parts)


# ---- auth methods ----------------------------------------------------------------------------------------------
def _str_list(config: dict[str, Any], key: str) -> list[str]:
    value = config.get(key) or []
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise BadRequest(f"Invalid Auth Method: {key} must be a list of strings")
    return list(value)


def _str_map(config: dict[str, Any], key: str) -> dict[str, str]:
    value = config.get(key) or {}
    if not isinstance(value, dict) or not all(isinstance(v, str) and v for v in value.values()):
        raise BadRequest(f"Invalid Auth Method: {key} must map claim names to variable names")
    return {str(k): v for k, v in value.items()}


@dataclass
class Identity:
    """What a verified JWT says, as binding rules see it: `fields` for selectors ({"value": {...}, "list": {...}}),
    `projected` for BindName interpolation ({"value.<name>": "..."})."""

    fields: dict[str, Any] = field(default_factory=lambda: {"value": {}, "list": {}})
    projected: dict[str, str] = field(default_factory=dict)


class JwtValidator:
    """A `jwt` auth method's Config, checked once: the keys loaded, the claims to bind and the mappings."""

    def __init__(self, config: Any) -> None:
        if not isinstance(config, dict):
            raise BadRequest("Invalid Auth Method: Config must be an object")
        unknown = sorted(set(config) - _JWT_CONFIG_KEYS)
        if unknown:
            raise BadRequest(f"Invalid Auth Method: unknown Config key(s) for type jwt: {', '.join(unknown)}")
        sources = [k for k in ("JWTValidationPubKeys", "JWKSURL", "OIDCDiscoveryURL") if config.get(k)]
        if len(sources) != 1:
            raise BadRequest("Invalid Auth Method: exactly one of 'JWTValidationPubKeys', 'JWKSURL', or "
                             "'OIDCDiscoveryURL' must be set for type 'jwt'")
        if sources[0] != "JWTValidationPubKeys":
            raise BadRequest(f"Invalid Auth Method: {sources[0]} is not supported by Shipyard (it fetches no keys "
                             "over the network): give the keys in JWTValidationPubKeys")
        self.keys = [_public_key(pem, i) for i, pem in enumerate(_str_list(config, "JWTValidationPubKeys"))]
        self.issuer = config.get("BoundIssuer") or ""
        if not isinstance(self.issuer, str):
            raise BadRequest("Invalid Auth Method: BoundIssuer must be a string")
        self.audiences = _str_list(config, "BoundAudiences")
        self.claims = _str_map(config, "ClaimMappings")
        self.list_claims = _str_map(config, "ListClaimMappings")
        self.algorithms = _str_list(config, "JWTSupportedAlgs") or ["RS256"]
        bad = [a for a in self.algorithms if a not in _SIGNING_ALGS]
        if bad:
            raise BadRequest(f"Invalid Auth Method: JWTSupportedAlgs: unsupported algorithm(s) {', '.join(bad)}")
        self.leeways = tuple(_leeway(config, key, default) for key, default in (
            ("ExpirationLeeway", DEFAULT_EXPIRY_LEEWAY), ("NotBeforeLeeway", DEFAULT_NOT_BEFORE_LEEWAY),
            ("ClockSkewLeeway", DEFAULT_CLOCK_SKEW_LEEWAY)))

    def blank_identity(self) -> Identity:
        """Every mapped variable present and empty (Consul's NewIdentity), so that `value.x == ""` selects."""
        identity = Identity()
        for name in self.claims.values():
            identity.fields["value"][name] = ""
            identity.projected[f"value.{name}"] = ""
        for name in self.list_claims.values():
            identity.fields["list"][name] = []
        return identity

    def verify(self, bearer: Any, now: float | None = None) -> Identity:
        """The identity of a JWT signed by one of the keys, with the bound issuer and audience, in its validity
        window; LoginFailed otherwise."""
        if not isinstance(bearer, str) or not bearer:
            raise LoginFailed("no BearerToken given")
        claims = self._signed_claims(bearer)
        self._check_claims(claims, time.time() if now is None else now)
        identity = self.blank_identity()
        for claim, name in self.claims.items():
            value = _claim(claims, claim)
            if value is not None:
                identity.fields["value"][name] = identity.projected[f"value.{name}"] = _claim_text(value, claim)
        for claim, name in self.list_claims.items():
            value = _claim(claims, claim)
            if value is not None:
                items = value if isinstance(value, list) else [value]
                identity.fields["list"][name] = [_claim_text(v, claim) for v in items]
        return identity

    def _signed_claims(self, bearer: str) -> dict[str, Any]:
        try:
            header_alg = jwt.get_unverified_header(bearer).get("alg")
        except jwt.PyJWTError:
            raise LoginFailed("the bearer token is not a JWT") from None
        if header_alg not in self.algorithms:
            raise LoginFailed(f"the JWT's algorithm {header_alg!r} is not one of JWTSupportedAlgs")
        for key in self.keys:
            try:
                claims = jwt.decode(bearer, key=key, algorithms=self.algorithms, options={
                    "verify_exp": False, "verify_nbf": False, "verify_iat": False, "verify_aud": False,
                    "verify_iss": False})
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as exc:
                raise LoginFailed(f"the JWT cannot be decoded ({type(exc).__name__})") from None
            return dict(claims)
        raise LoginFailed("failed to verify id token signature")

    def _check_claims(self, claims: dict[str, Any], now: float) -> None:
        expiry, not_before, skew = self.leeways
        if self.issuer and claims.get("iss") != self.issuer:
            raise LoginFailed("error validating claims: validation failed, invalid issuer claim (iss)")
        for name, leeway, late in (("exp", expiry, True), ("nbf", not_before, False), ("iat", skew, False)):
            value = claims.get(name)
            if value is None:
                continue
            if not isinstance(value, int | float):
                raise LoginFailed(f"error validating claims: {name} is not a number")
            if (late and now > value + leeway) or (not late and now + leeway < value):
                what = {"exp": "token is expired", "nbf": "token not valid yet", "iat": "token issued in future"}
                raise LoginFailed(f"error validating claims: validation failed, {what[name]} ({name})")
        audiences = claims.get("aud")
        given = [audiences] if isinstance(audiences, str) else list(audiences or [])
        if self.audiences and not set(given) & set(self.audiences):
            raise LoginFailed("error validating claims: aud claim does not match any bound audience")
        if not self.audiences and given:
            raise LoginFailed("error validating claims: audience claim found in JWT but no audiences bound")


def _leeway(config: dict[str, Any], key: str, default: float) -> float:
    seconds = parse_duration(config.get(key) or 0, key)
    if seconds < 0:
        return 0.0
    return seconds or default


def _public_key(pem: str, index: int) -> Any:
    try:
        return load_pem_public_key(pem.encode())
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"Invalid Auth Method: error parsing public key JWTValidationPubKeys[{index}]: "
                         f"{exc}") from None


def _claim(claims: dict[str, Any], name: str) -> Any:
    """A claim by name, or by JSON pointer ("/nested/claim") as go-sso reads ClaimMappings."""
    if not name.startswith("/"):
        return claims.get(name)
    value: Any = claims
    for part in name[1:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _claim_text(value: Any, claim: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise LoginFailed(f"error converting claim {claim!r} to a string")


def method_validator(method_type: str, config: Any) -> JwtValidator:
    if method_type not in METHOD_TYPES:
        raise BadRequest(f"Invalid Auth Method: Type should be one of: {list(METHOD_TYPES)}")
    return JwtValidator(config)


def method_record(body: dict[str, Any], existing: dict[str, Any] | None) -> dict[str, Any]:
    """The stored form of an auth method from a create or update body (Consul's AuthMethodSet checks)."""
    name = body.get("Name")
    if not isinstance(name, str) or not name:
        raise BadRequest("Invalid Auth Method: no Name is set")
    if not _METHOD_NAME.match(name):
        raise BadRequest("Invalid Auth Method: invalid Name. Only alphanumeric characters, '-' and '_' are allowed")
    method_type = body.get("Type")
    if existing is not None and method_type != existing["Type"]:
        raise BadRequest(f"Invalid Auth Method: cannot change type from {existing['Type']} to {method_type}")
    method_validator(str(method_type or ""), body.get("Config") or {})
    locality = body.get("TokenLocality") or ""
    if locality not in ("", "local", "global"):
        raise BadRequest("Invalid Auth Method: TokenLocality should be one of 'local' or 'global'")
    ttl = parse_duration(body.get("MaxTokenTTL") or 0, "MaxTokenTTL")
    if ttl and not MIN_TOKEN_TTL <= ttl <= MAX_TOKEN_TTL:
        raise BadRequest(f"Invalid Auth Method: MaxTokenTTL {go_duration(ttl)} must be between "
                         f"{go_duration(MIN_TOKEN_TTL)} and {go_duration(MAX_TOKEN_TTL)}")
    return {"Name": name, "Type": method_type, "DisplayName": str(body.get("DisplayName") or ""),
            "Description": str(body.get("Description") or ""), "MaxTokenTTL": ttl, "TokenLocality": locality,
            "Config": body.get("Config") or {}}


def public_method(record: dict[str, Any], *, stub: bool = False) -> dict[str, Any]:
    """Consul's ACLAuthMethod JSON (its list stub without Config)."""
    out = {"Name": record["Name"], "Type": record["Type"], "Description": record["Description"]}
    if record.get("DisplayName"):
        out["DisplayName"] = record["DisplayName"]
    if record.get("MaxTokenTTL"):
        out["MaxTokenTTL"] = go_duration(record["MaxTokenTTL"])
    if record.get("TokenLocality"):
        out["TokenLocality"] = record["TokenLocality"]
    if not stub:
        out["Config"] = record["Config"]
    out.update(CreateIndex=record["CreateIndex"], ModifyIndex=record["ModifyIndex"])
    return out


# ---- binding rules ---------------------------------------------------------------------------------------------
def interpolate(template: str, variables: dict[str, str], valid: re.Pattern[str] | None, what: str) -> str:
    """HIL's `${value.x}` interpolation as Consul's computeBindName does it: values lowercased (a value that had
    upper case is refused rather than silently changed), an unknown variable refused, the result checked."""
    def value_of(match: re.Match[str]) -> str:
        name = match.group(1).strip()
        if name not in variables:
            raise BadRequest(f"error interpreting template: unknown variable accessed: {name}")
        return variables[name]

    original = _HIL_VARIABLE.sub(value_of, template)
    computed = _HIL_VARIABLE.sub(lambda m: value_of(m).lower(), template)
    if valid is not None and not valid.match(computed):
        raise BadRequest(f"invalid bind name: {computed!r}")
    if original != computed:
        raise BadRequest(f"invalid {what}: the projected variables contain uppercase characters (interpolated as "
                         f"{original!r} before lowercasing), but {what}s for this type must be lowercase")
    return computed


def _templated_policy(bind_name: str, bind_vars: Any, variables: dict[str, str]) -> dict[str, Any]:
    if bind_name not in TEMPLATES:
        raise BadRequest(f"Bind name for templated-policy bind type does not match existing template name: "
                         f"{bind_name}")
    computed: dict[str, str] = {}
    if isinstance(bind_vars, dict) and bind_vars.get("Name"):
        computed["name"] = interpolate(str(bind_vars["Name"]), variables, None, "bind variable")
    return {"TemplateName": bind_name, "TemplateVariables": variables_of(bind_name, computed)}


_VALID_NAME = {"service": _SERVICE_NAME, "node": _NODE_NAME, "policy": _POLICY_OR_ROLE_NAME,
               "role": _POLICY_OR_ROLE_NAME}


def rule_record(body: dict[str, Any], validator: JwtValidator, check_selector: Callable[[str], None]) -> dict[str, Any]:
    """The stored form of a binding rule (Consul's BindingRuleSet checks), against its method's variables."""
    selector = body.get("Selector") or ""
    if not isinstance(selector, str):
        raise BadRequest("invalid Binding Rule: Selector must be a string")
    if selector:
        check_selector(selector)
    bind_type, bind_name = body.get("BindType") or "", body.get("BindName") or ""
    if not isinstance(bind_type, str) or not isinstance(bind_name, str) or not bind_type or not bind_name:
        raise BadRequest("invalid Binding Rule: bindType and bindName must not be empty")
    fake = {name: "fake" for name in validator.blank_identity().projected}
    try:
        if bind_type == "templated-policy":
            _templated_policy(bind_name, body.get("BindVars"), fake)
        elif bind_type in _VALID_NAME:
            interpolate(bind_name, fake, _VALID_NAME[bind_type], "bind name")
        else:
            raise BadRequest(f"unknown BindType {bind_type!r}")
    except BadRequest as exc:
        raise BadRequest(f"invalid Binding Rule: failed to validate bindType {bind_type!r}: {exc.message}") from None
    record = {"Description": str(body.get("Description") or ""), "AuthMethod": body["AuthMethod"],
              "Selector": selector, "BindType": bind_type, "BindName": bind_name}
    if body.get("BindVars"):
        record["BindVars"] = body["BindVars"]
    return record


@dataclass
class Bindings:
    """What the rules an identity matches give its token; policies and roles by name (the store resolves them)."""

    service_identities: list[dict[str, str]] = field(default_factory=list)
    node_identities: list[dict[str, str]] = field(default_factory=list)
    templated_policies: list[dict[str, Any]] = field(default_factory=list)
    policy_names: list[str] = field(default_factory=list)
    role_names: list[str] = field(default_factory=list)


def bind(rules: list[dict[str, Any]], identity: Identity, matches: Callable[[str, dict[str, Any]], bool],
         datacenter: str) -> Bindings:
    """Consul's Binder.Bind: every rule whose selector matches the identity contributes its computed name."""
    out = Bindings()
    for rule in rules:
        if rule["Selector"] and not matches(rule["Selector"], identity.fields):
            continue
        bind_type, bind_name = rule["BindType"], rule["BindName"]
        if bind_type == "templated-policy":
            out.templated_policies.append(_templated_policy(bind_name, rule.get("BindVars"), identity.projected))
            continue
        name = interpolate(bind_name, identity.projected, _VALID_NAME[bind_type], "bind name")
        if bind_type == "service":
            out.service_identities.append({"ServiceName": name})
        elif bind_type == "node":
            out.node_identities.append({"NodeName": name, "Datacenter": datacenter})
        elif bind_type == "policy":
            out.policy_names.append(name)
        else:
            out.role_names.append(name)
    return out


def login_description(meta: Any) -> str:
    """Consul's BuildTokenDescription("token created via login", meta)."""
    if not isinstance(meta, dict) or not meta:
        return "token created via login"
    import json

    return "token created via login: " + json.dumps({str(k): str(v) for k, v in sorted(meta.items())},
                                                   separators=(",", ":"))
