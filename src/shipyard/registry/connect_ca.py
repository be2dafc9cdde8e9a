"""Consul Connect's built-in CA under `connect/ca/`: its configuration, its roots (with their private keys, in the
store only) and leaf certificates with SPIFFE URI SANs, signed by the active root.

Owns every key and certificate it makes; it never returns a root's private key to a caller, and never logs one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from shipyard.errors import BadRequest, ShipyardError
from shipyard.registry.sessions import _parse_go_duration
from shipyard.store import Compare, Put

if TYPE_CHECKING:
    from shipyard.registry.node import NodeIdentity
    from shipyard.store import Store

CA_PREFIX = "connect/ca/"
CONFIG_KEY = "connect/ca/config"
ROOTS_PREFIX = "connect/ca/roots/"
LEAF_PREFIX = "connect/leaf/"
CLUSTER_KEY = "connect/ca/cluster-id"
BOOTSTRAP_KEY = "connect/ca/first-root"  # claimed by the txn that makes the first root
DEFAULT_CONFIG: dict[str, Any] = {
    "LeafCertTTL": "72h", "RotationPeriod": "2160h", "IntermediateCertTTL": "8760h", "RootCertTTL": "87600h",
    "PrivateKeyType": "ec", "PrivateKeyBits": 256,
}
_KEY_FIELDS = ("PrivateKey", "RootCert")  # given by an operator to bring their own root; never answered back


def _colon_hex(data: bytes) -> str:
    return ":".join(f"{b:02x}" for b in data)


def trust_domain(cluster_id: str) -> str:
    return f"{cluster_id}.consul"


def _new_key(key_type: str, bits: int) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if key_type == "ec":
        curves: dict[int, ec.EllipticCurve] = {224: ec.SECP224R1(), 256: ec.SECP256R1(), 384: ec.SECP384R1(),
                                               521: ec.SECP521R1()}
        if bits not in curves:
            raise BadRequest(f"EC key length must be one of (224, 256, 384, 521) bits, got {bits}")
        return ec.generate_private_key(curves[bits])
    if key_type == "rsa":
        if bits not in (2048, 4096):
            raise BadRequest(f"RSA key length must be 2048 or 4096 bits, got {bits}")
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    raise BadRequest(f"unsupported key type {key_type!r}: must be ec or rsa")


def _key_pem(key: Any) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _key_info(cert: x509.Certificate) -> tuple[str, int]:
    public = cert.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        return "ec", public.curve.key_size
    if isinstance(public, rsa.RSAPublicKey):
        return "rsa", public.key_size
    raise BadRequest("RootCert must hold an EC or RSA public key")


def _serial() -> int:
    """A positive serial that fits Consul's uint64 CARoot.SerialNumber (and a JSON integer)."""
    return secrets.randbits(62) | 1


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _iso(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class LeafCert:
    service: str
    service_uri: str
    cert_pem: str
    key_pem: str
    serial: str
    valid_after: str
    valid_before: str
    create_index: int = 0
    modify_index: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "SerialNumber": self.serial, "CertPEM": self.cert_pem, "PrivateKeyPEM": self.key_pem,
            "Service": self.service, "ServiceURI": self.service_uri, "ValidAfter": self.valid_after,
            "ValidBefore": self.valid_before, "CreateIndex": self.create_index, "ModifyIndex": self.modify_index,
        }


class ConnectCA:
    """The built-in "consul" CA provider. Its first root is made on first use (one txn: a race makes one)."""

    def __init__(self, store: Store, node: NodeIdentity) -> None:
        self.store = store
        self.node = node

    # ---- configuration ------------------------------------------------------------------------

    async def cluster_id(self) -> str:
        kv = await self.store.get(CLUSTER_KEY)
        if kv is not None:
            return kv.value.decode()
        candidate = str(uuid.uuid4())
        await self.store.txn([Compare(CLUSTER_KEY, "version", "=", 0)], [Put(CLUSTER_KEY, candidate.encode())])
        kv = await self.store.get(CLUSTER_KEY)
        return kv.value.decode() if kv is not None else candidate

    async def configuration(self) -> dict[str, Any]:
        await self.ensure_root()
        kv = await self.store.get(CONFIG_KEY)
        stored = orjson.loads(kv.value) if kv is not None else {"Provider": "consul", "Config": DEFAULT_CONFIG}
        config = {k: v for k, v in stored["Config"].items() if k not in _KEY_FIELDS}
        return {
            "Provider": stored["Provider"], "Config": {**config, "ClusterID": await self.cluster_id()},
            "State": None, "ForceWithoutCrossSigning": False,
            "CreateIndex": kv.create_revision if kv else 0, "ModifyIndex": kv.mod_revision if kv else 0,
        }

    async def update_configuration(self, body: Any) -> None:
        """Consul's provider "consul" only. A new key type/size, or an operator's own PrivateKey/RootCert, makes a new
        active root; the old one stays listed (inactive) so leaves it signed keep verifying until they expire."""
        if not isinstance(body, dict):
            raise BadRequest("Request decode failed: expected a JSON object")
        provider = body.get("Provider") or ""
        if provider != "consul":
            raise BadRequest(f"unknown CA provider {provider!r}: this server has the built-in \"consul\" provider only")
        given = body.get("Config") or {}
        if not isinstance(given, dict):
            raise BadRequest("Request decode failed: Config must be an object")
        for field in ("LeafCertTTL", "RotationPeriod", "IntermediateCertTTL", "RootCertTTL"):
            if field in given:
                parse_duration(given[field], field)
        current = (await self.configuration())["Config"]
        merged = {**DEFAULT_CONFIG, **{k: v for k, v in given.items() if k != "ClusterID"}}
        rotate = any(k in given for k in _KEY_FIELDS) or (
            merged["PrivateKeyType"], int(merged["PrivateKeyBits"])
        ) != (current["PrivateKeyType"], int(current["PrivateKeyBits"]))
        if rotate:
            await self._add_root(merged, make_active=True)
        await self.store.put(CONFIG_KEY, orjson.dumps({"Provider": "consul", "Config": merged}))

    # ---- roots --------------------------------------------------------------------------------

    async def ensure_root(self) -> None:
        held = await self.store.range(ROOTS_PREFIX, prefix=True)
        if not held.kvs:
            await self._add_root(DEFAULT_CONFIG, make_active=True, only_if_none=True)

    async def _add_root(self, config: dict[str, Any], *, make_active: bool, only_if_none: bool = False) -> None:
        cluster = await self.cluster_id()
        key, cert = self._root_material(config, cluster)
        # Consul's root ID is the certificate's SHA-1 fingerprint.
        root_id = _colon_hex(hashlib.sha1(cert.public_bytes(serialization.Encoding.DER)).digest())
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        key_type, bits = _key_info(cert)
        record = {
            "ID": root_id, "Name": "Consul CA Primary Cert", "SerialNumber": cert.serial_number,
            "SigningKeyID": _colon_hex(ski), "ExternalTrustDomain": cluster,
            "NotBefore": _iso(cert.not_valid_before_utc), "NotAfter": _iso(cert.not_valid_after_utc),
            "RootCert": cert.public_bytes(serialization.Encoding.PEM).decode(), "IntermediateCerts": None,
            "Active": make_active, "PrivateKeyType": key_type, "PrivateKeyBits": bits,
            "PrivateKey": _key_pem(key),
        }
        held = await self.store.range(ROOTS_PREFIX, prefix=True)
        if only_if_none and held.kvs:
            return
        ops = [Put(ROOTS_PREFIX + root_id, orjson.dumps(record))]
        for kv in held.kvs:
            old = orjson.loads(kv.value)
            if make_active and old.get("Active"):
                ops.append(Put(kv.key, orjson.dumps({**old, "Active": False})))
        if only_if_none:
            # Another request may be making the first root right now: the one that claims the marker wins.
            compares = [Compare(BOOTSTRAP_KEY, "version", "=", 0)]
            ops.append(Put(BOOTSTRAP_KEY, root_id.encode()))
        else:
            compares = [Compare(kv.key, "mod", "=", kv.mod_revision) for kv in held.kvs]
        result = await self.store.txn(compares, ops)
        if not result.succeeded and not only_if_none:
            raise ShipyardError("the CA roots changed while rotating; retry", status=500)

    def _root_material(self, config: dict[str, Any], cluster: str) -> tuple[Any, x509.Certificate]:
        if config.get("PrivateKey"):
            return self._imported_root(config)
        key = _new_key(str(config.get("PrivateKeyType", "ec")), int(config.get("PrivateKeyBits", 256)))
        ttl = parse_duration(config.get("RootCertTTL") or "87600h", "RootCertTTL")
        now = _now()
        common_name = f"pri-{uuid.uuid4().hex[:7]}.consul.ca.{cluster[:8]}.consul"
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(_serial()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(seconds=ttl))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain(cluster)}")]),
                           critical=False)
        )
        return key, builder.sign(key, hashes.SHA256())

    @staticmethod
    def _imported_root(config: dict[str, Any]) -> tuple[Any, x509.Certificate]:
        try:
            key = serialization.load_pem_private_key(str(config["PrivateKey"]).encode(), password=None)
            cert = x509.load_pem_x509_certificate(str(config.get("RootCert") or "").encode())
        except (ValueError, TypeError) as exc:
            raise BadRequest(f"error parsing CA PrivateKey/RootCert: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise BadRequest("PrivateKey must be an EC or RSA key")
        if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
            raise BadRequest("RootCert does not match PrivateKey")
        return key, cert

    async def roots(self) -> tuple[dict[str, Any], int, int]:
        """Consul's IndexedCARoots (private keys left out), its index and the revision read at."""
        await self.ensure_root()
        held = await self.store.range(ROOTS_PREFIX, prefix=True)
        roots = []
        active = ""
        for kv in held.kvs:
            record = orjson.loads(kv.value)
            record.pop("PrivateKey", None)
            record.update(CreateIndex=kv.create_revision, ModifyIndex=kv.mod_revision)
            active = record["ID"] if record["Active"] else active
            roots.append(record)
        roots.sort(key=lambda r: not r["Active"])
        body = {"ActiveRootID": active, "TrustDomain": trust_domain(await self.cluster_id()), "Roots": roots}
        return body, held.index, held.revision

    async def _active_signer(self) -> tuple[Any, x509.Certificate]:
        await self.ensure_root()
        for kv in (await self.store.range(ROOTS_PREFIX, prefix=True)).kvs:
            record = orjson.loads(kv.value)
            if record.get("Active"):
                key = serialization.load_pem_private_key(record["PrivateKey"].encode(), password=None)
                return key, x509.load_pem_x509_certificate(record["RootCert"].encode())
        raise ShipyardError("the CA has no active root", status=500)

    # ---- leaves -------------------------------------------------------------------------------

    async def leaf(self, service: str) -> LeafCert:
        """This agent's leaf certificate for `service`, kept in the store and renewed past half its life or when the
        active root changed (as Consul's agent cache does)."""
        if not service:
            raise BadRequest("Missing service name")
        key_name = LEAF_PREFIX + service
        kv = await self.store.get(key_name)
        signer_key, signer = await self._active_signer()
        if kv is not None:
            held = LeafCert(**orjson.loads(kv.value))
            if self._still_good(held, signer):
                return LeafCert(**{**orjson.loads(kv.value), "create_index": kv.create_revision,
                                   "modify_index": kv.mod_revision})
        leaf = await self._sign_leaf(service, signer_key, signer)
        fields = {k: getattr(leaf, k) for k in LeafCert.__slots__ if k not in ("create_index", "modify_index")}
        revision = await self.store.put(key_name, orjson.dumps(fields))
        stored = await self.store.get(key_name)
        create = stored.create_revision if stored is not None else revision
        return LeafCert(**fields, create_index=create, modify_index=revision)

    @staticmethod
    def _still_good(leaf: LeafCert, signer: x509.Certificate) -> bool:
        cert = x509.load_pem_x509_certificate(leaf.cert_pem.encode())
        if cert.issuer != signer.subject:
            return False
        life = cert.not_valid_after_utc - cert.not_valid_before_utc
        return _now() < cert.not_valid_before_utc + life / 2

    async def _sign_leaf(self, service: str, signer_key: Any, signer: x509.Certificate) -> LeafCert:
        cluster = await self.cluster_id()
        config = (await self.configuration())["Config"]
        ttl = parse_duration(config.get("LeafCertTTL") or "72h", "LeafCertTTL")
        uri = f"spiffe://{trust_domain(cluster)}/ns/default/dc/{self.node.datacenter}/svc/{service}"
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
            .issuer_name(signer.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(seconds=ttl))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, True, True, True, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                                  x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),  # type: ignore[arg-type]
                           critical=False)
            .sign(signer_key, hashes.SHA256())
        )
        serial = _colon_hex(cert.serial_number.to_bytes((cert.serial_number.bit_length() + 7) // 8, "big"))
        return LeafCert(service, uri, cert.public_bytes(serialization.Encoding.PEM).decode(), _key_pem(key), serial,
                        _iso(cert.not_valid_before_utc), _iso(cert.not_valid_after_utc))



def parse_duration(value: Any, field: str) -> float:
    """Seconds from a Go duration string, or Consul's 400 naming the field."""
    try:
        return _parse_go_duration(str(value))
    except ValueError as exc:
        raise BadRequest(f"Request decode failed: {field}: {exc}") from None
