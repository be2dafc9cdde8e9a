"""Unit tests of the secrets engine's pure parts: Shamir over GF(256) and the ACL policy language."""

from __future__ import annotations

import itertools
import os

import pytest

from shipyard.errors import BadRequest
from shipyard.secrets import shamir
from shipyard.secrets.policy import ACL, DEFAULT_POLICY, parse_policy


def test_gf256_is_aes_field() -> None:
    # FIPS-197 section 4.2: {57} x {83} = {c1}; {53} and {ca} are inverses.
    assert shamir.gf_mul(0x57, 0x83) == 0xC1
    assert shamir.gf_mul(0x53, 0xCA) == 0x01
    assert all(shamir.gf_mul(a, shamir.gf_div(1, a)) == 1 for a in range(1, 256))


def test_any_threshold_subset_reconstructs_and_fewer_do_not() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, 5, 3)
    # Vault's share format: the y bytes, then one byte of x coordinate (distinct, non-zero).
    assert all(len(share) == 33 for share in shares)
    assert len({share[-1] for share in shares}) == 5 and all(share[-1] for share in shares)
    for subset in itertools.combinations(shares, 3):
        assert shamir.combine(list(subset)) == secret
    assert shamir.combine(shares) == secret
    for subset in itertools.combinations(shares, 2):
        assert shamir.combine(list(subset)) != secret


def test_split_limits_as_vault() -> None:
    with pytest.raises(BadRequest):
        shamir.split(b"k", 2, 3)
    with pytest.raises(BadRequest):
        shamir.split(b"k", 256, 3)
    with pytest.raises(BadRequest):
        shamir.split(b"k", 3, 1)
    shares = shamir.split(b"k", 3, 2)
    with pytest.raises(BadRequest, match="duplicate"):
        shamir.combine([shares[0], shares[0]])


def test_policy_priority_exact_glob_and_plus() -> None:
    acl = ACL([parse_policy("p", '''
path "secret/*" { capabilities = ["list"] }
path "secret/data/app/*" { capabilities = ["read"] }
path "secret/data/app/admin" { capabilities = ["deny"] }
path "secret/+/team/*" { capabilities = ["update"] }
path "other/+/x" { capabilities = ["patch"] }
path "secret/data/team/x" { capabilities = ["create", "read"] }
''')])
    assert acl.capabilities("secret/data/app/db") == {"read"}
    assert acl.capabilities("secret/data/app/admin") == {"deny"}
    assert acl.capabilities("secret/other") == {"list"}
    # Vault's rule 3: at the same first-wildcard position, the pattern with more `+` segments loses.
    assert acl.capabilities("secret/metadata/team/y") == {"list"}
    assert acl.capabilities("other/a/x") == {"patch"}
    assert acl.capabilities("other/a/b/x") == frozenset()
    assert acl.capabilities("secret/data/team/x") == {"create", "read"}
    assert acl.capabilities("other/x") == frozenset()
    assert not acl.allows("secret/data/app/db", "update")


def test_policies_merge_and_default_policy() -> None:
    acl = ACL([parse_policy("a", 'path "kv/x" { capabilities = ["read"] }'),
               parse_policy("b", 'path "kv/x" { capabilities = ["update"] }'),
               parse_policy("default", DEFAULT_POLICY)])
    assert acl.capabilities("kv/x") == {"read", "update"}
    assert acl.allows("auth/token/lookup-self", "read")
    assert acl.allows("auth/token/renew-self", "update")
    assert not acl.allows("auth/token/create", "update")


def test_malformed_policy_names_the_line() -> None:
    with pytest.raises(BadRequest, match="Line 3"):
        parse_policy("bad", 'path "x" {\n  capabilities = ["read"\n}\n')
    with pytest.raises(BadRequest, match="invalid capability 'fly'"):
        parse_policy("bad", 'path "x" { capabilities = ["fly"] }')
    with pytest.raises(BadRequest, match="only at the end"):
        parse_policy("bad", 'path "a/*/b" { capabilities = ["read"] }')
