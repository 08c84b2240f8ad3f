"""``fssc certs``: a CA and one TLS certificate per party and one for the dealer (cryptography package).

Writes ``ca.pem``, ``party0.pem``/``party0.key`` (common name fssc-party0),
``party1.pem``/``party1.key`` (fssc-party1) and ``dealer.pem``/``dealer.key``
(fssc-dealer), each name also its DNS name. Give each party and the dealer the
CA certificate and its own pair; the CA key (``ca.key``) stays with whoever
issues certificates. Keys are ECDSA P-256, private key files mode 0600.

What each certificate may do (extended key usage): the model owner's is a
server's (it listens for the data owner, and for the dealer with ``fssc keys
receive``); the data owner's a client's (it connects to the model owner) and a
server's (it listens for the dealer with ``fssc keys receive``); the dealer's a
client's only (``fssc deal --to``). Who a peer is comes from its common name,
checked by the other side: a data owner's certificate cannot pose as the model
owner or the dealer, and the dealer sends a party's keys only to that party's
certificate.
"""

from __future__ import annotations

import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fssc.runtime.transport import PARTY_NAMES

from fssc.files import write_atomic

DEALER_NAME = "fssc-dealer"
# identity -> (common name, extended key usages); the files are <identity>.pem and <identity>.key
IDENTITIES = {
    "party0": (PARTY_NAMES[0], (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH)),
    "party1": (PARTY_NAMES[1], (ExtendedKeyUsageOID.SERVER_AUTH,)),
    "dealer": (DEALER_NAME, (ExtendedKeyUsageOID.CLIENT_AUTH,)),
}


def identity_files(certs: str, identity: str) -> tuple[str, str, str]:
    """(CA certificate, certificate, private key) paths of ``identity`` in a folder ``fssc certs`` wrote."""
    return (
        os.path.join(certs, "ca.pem"),
        os.path.join(certs, f"{identity}.pem"),
        os.path.join(certs, f"{identity}.key"),
    )


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: str, data: bytes, private: bool) -> None:
    write_atomic(path, data, private=private)


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_certs(out: str, days: int = 365) -> list[str]:
    os.makedirs(out, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("fssc CA"))
        .issuer_name(_name("fssc CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    written = []
    _write(os.path.join(out, "ca.key"), _key_pem(ca_key), True)
    _write(os.path.join(out, "ca.pem"), ca.public_bytes(serialization.Encoding.PEM), False)
    written += ["ca.pem", "ca.key"]
    for identity, (cn, ekus) in IDENTITIES.items():
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(list(ekus)), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _, pem, key_path = identity_files(out, identity)
        _write(key_path, _key_pem(key), True)
        _write(pem, cert.public_bytes(serialization.Encoding.PEM), False)
        written += [os.path.basename(pem), os.path.basename(key_path)]
    return [os.path.join(out, w) for w in written]
