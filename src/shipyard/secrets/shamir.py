"""Shamir's secret sharing over GF(2^8) as Vault does it (shamir/shamir.go): share = y bytes + x tag byte.

Pure arithmetic on bytes; it never stores, logs or prints a share or a secret.
"""

from __future__ import annotations

import secrets as _random

from shipyard.errors import BadRequest

# Log/exp tables for GF(2^8) with AES's reduction polynomial x^8+x^4+x^3+x+1 and generator 3 (Vault's field).
_EXP = [0] * 512
_LOG = [0] * 256


def _build_tables() -> None:
    value = 1
    for power in range(255):
        _EXP[power] = value
        _LOG[value] = power
        doubled = (value << 1) ^ (0x11B if value & 0x80 else 0)
        value = doubled ^ value  # times 3 = times 2 xor itself
    for power in range(255, 512):
        _EXP[power] = _EXP[power - 255]


_build_tables()


def gf_mul(a: int, b: int) -> int:
    if a == 0 or b == 0:
        return 0
    return _EXP[_LOG[a] + _LOG[b]]


def gf_div(a: int, b: int) -> int:
    if b == 0:
        raise ZeroDivisionError("division by zero in GF(256)")
    if a == 0:
        return 0
    return _EXP[(_LOG[a] - _LOG[b]) % 255]


def _evaluate(coefficients: list[int], x: int) -> int:
    """Horner's rule; coefficients[0] is the intercept (the secret byte)."""
    result = 0
    for coefficient in reversed(coefficients):
        result = gf_mul(result, x) ^ coefficient
    return result


def split(secret: bytes, parts: int, threshold: int) -> list[bytes]:
    """`parts` shares, any `threshold` of which rebuild `secret` (Vault's limits: 2 <= threshold <= parts <= 255)."""
    if parts < threshold:
        raise BadRequest("parts cannot be less than threshold")
    if parts > 255:
        raise BadRequest("parts cannot exceed 255")
    if threshold < 2:
        raise BadRequest("threshold must be at least 2")
    if not secret:
        raise BadRequest("cannot split an empty secret")
    # Distinct, non-zero, random x coordinates (x = 0 would reveal the secret).
    xs = list(range(1, 256))
    _random.SystemRandom().shuffle(xs)
    xs = xs[:parts]
    shares = [bytearray(len(secret) + 1) for _ in range(parts)]
    for index, x in enumerate(xs):
        shares[index][-1] = x
    for position, byte in enumerate(secret):
        coefficients = [byte, *(_random.randbelow(256) for _ in range(threshold - 1))]
        for index, x in enumerate(xs):
            shares[index][position] = _evaluate(coefficients, x)
    return [bytes(share) for share in shares]


def combine(shares: list[bytes]) -> bytes:
    """Lagrange interpolation at x = 0. With fewer shares than the threshold the result is unrelated noise:
    the caller must verify it (the barrier does, by decrypting its keyring)."""
    if len(shares) < 2:
        raise BadRequest("less than two parts cannot be used to reconstruct the secret")
    length = len(shares[0])
    if length < 2 or any(len(share) != length for share in shares):
        raise BadRequest("all parts must be the same length")
    xs = [share[-1] for share in shares]
    if len(set(xs)) != len(xs):
        raise BadRequest("duplicate part detected")
    secret = bytearray(length - 1)
    for position in range(length - 1):
        value = 0
        for i, xi in enumerate(xs):
            basis = 1
            for j, xj in enumerate(xs):
                if i != j:
                    basis = gf_mul(basis, gf_div(xj, xj ^ xi))
            value ^= gf_mul(shares[i][position], basis)
        secret[position] = value
    return bytes(secret)
