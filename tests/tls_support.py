"""A Kafka broker with a SASL_SSL listener (SCRAM-SHA-512) and a certificate from a CA made
here, for the credentials tests of the worker, the CLI and both clients."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pipeline.tools.local_broker import LocalKafkaBroker

USER, PASSWORD = "aewatch-svc", "Sc3ret-not-for-logs-7f1c"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: x509.Name, key, issuer: x509.Name, signer, extension, critical: bool):
    """A certificate for `key`, valid from five minutes ago for a day, signed by `signer`."""
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(extension, critical=critical)
        .sign(signer, hashes.SHA256())
    )


def _certificate_authority(common_name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    ca = x509.BasicConstraints(ca=True, path_length=None)
    return key, _certificate(_name(common_name), key, _name(common_name), key, ca, True)


def _pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_certificates(root: Path) -> dict[str, Path]:
    """A CA, a broker key and certificate for 127.0.0.1 signed by it, and an unrelated CA."""
    ca_key, ca = _certificate_authority("aewatch test CA")
    _, other_ca = _certificate_authority("some other CA")
    key = ec.generate_private_key(ec.SECP256R1())
    names = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    cert = _certificate(_name("localhost"), key, ca.subject, ca_key, names, False)
    paths = {"ca": root / "ca.pem", "other_ca": root / "other-ca.pem", "broker": root / "b.pem"}
    paths["ca"].write_bytes(_pem(ca))
    paths["other_ca"].write_bytes(_pem(other_ca))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    paths["broker"].write_bytes(key_pem + _pem(cert))
    return paths


@contextlib.contextmanager
def secure_broker(root: Path) -> Iterator[tuple[str, dict[str, Path]]]:
    """A broker whose SASL_SSL listener knows USER with PASSWORD: (its address, the
    certificates of `make_certificates`)."""
    certs = make_certificates(root)
    broker = LocalKafkaBroker(
        listeners={"SASL_SSL": "SASL_SSL"},
        scram_users={USER: PASSWORD},
        extra_properties={
            "sasl.enabled.mechanisms": "SCRAM-SHA-512",
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            ),
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(certs["broker"]),
        },
    ).start()
    try:
        yield broker.address("SASL_SSL"), certs
    finally:
        broker.stop()
