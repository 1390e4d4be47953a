"""OPC UA security: our client identity, and whether to trust the server we reach.

asyncua accepts any server certificate unless told otherwise; here nothing is accepted by default.
A server certificate is trusted when it equals the pinned `server_certificate`, or when it (or
the CA that issued it) is in the trust directory, and it is within its validity period. A
rejected certificate is saved under `{pki_dir}/rejected/` and named by its thumbprints in the
error, so an operator can check it against the server's own display and move it into the trust
directory: the self-signed-certificate loop of other clients ends with one copy command.

The client certificate and key are generated once, into the PKI directory (key mode 0600), and
reused: servers trust a client by its certificate, so it must not change between runs. RSA key
generation and certificate parsing happen here, at connect, never per reading.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from asyncua import ua
from asyncua.client.client import Client
from asyncua.crypto import cert_gen, security_policies
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from edge_agent.config.opcua import OpcuaAuth, OpcuaSecurity
from edge_agent.errors import EdgeAgentError

POLICIES: dict[str, type[security_policies.SecurityPolicy]] = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128_Sha256_RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256_Sha256_RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}
MODES = {
    "None": ua.MessageSecurityMode.None_,
    "Sign": ua.MessageSecurityMode.Sign,
    "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt,
}
_CERT_SUFFIXES = {".der", ".cer", ".crt", ".pem"}


class SecurityError(EdgeAgentError):
    """The connection is refused on security grounds; the message tells the operator what to do."""


class UntrustedCertificateError(SecurityError):
    """The server's certificate is not trusted; carries its thumbprints."""


def thumbprints(der: bytes) -> str:
    """`sha1=… sha256=…` in upper-case hex, as servers and UaExpert display them."""
    sha1 = hashlib.sha1(der, usedforsecurity=False).hexdigest().upper()
    return f"sha1={sha1} sha256={hashlib.sha256(der).hexdigest().upper()}"


def load_certificate(path: Path) -> x509.Certificate:
    """A certificate from a DER or PEM file, whatever its suffix."""
    data = path.read_bytes()
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def load_private_key(path: Path) -> PrivateKeyTypes:
    """A private key from a PEM or DER file (unencrypted)."""
    data = path.read_bytes()
    if data.lstrip().startswith(b"-----BEGIN"):
        return serialization.load_pem_private_key(data, password=None)
    return serialization.load_der_private_key(data, password=None)


def first_certificate(der: bytes) -> bytes:
    """The leaf of a DER chain: servers may send their certificate followed by its issuers."""
    if len(der) < 4 or der[1] != 0x82:
        return der
    return der[: int.from_bytes(der[2:4], "big") + 4]


@dataclass(frozen=True)
class ClientIdentity:
    """Our application instance certificate, as DER bytes and the key as DER PKCS8."""

    certificate: bytes
    key: bytes
    application_uri: str
    certificate_path: Path


def application_uri_for(host: str) -> str:
    return f"urn:{host}:edge-agent"


def ensure_client_identity(security: OpcuaSecurity) -> ClientIdentity:
    """Load the client certificate and key, generating both when neither exists (blocking I/O)."""
    cert_path, key_path = security.certificate_path, security.key_path
    host = socket.gethostname()
    if not key_path.exists():
        if cert_path.exists():
            raise SecurityError(
                f"client certificate {cert_path} exists but its key {key_path} does not; "
                "remove the certificate to have a new pair generated"
            )
        _generate(cert_path, key_path, application_uri_for(host), host)
    elif not cert_path.exists():
        raise SecurityError(
            f"client key {key_path} exists but its certificate {cert_path} does not"
        )
    cert = load_certificate(cert_path)
    key = load_private_key(key_path)
    uris = _san_uris(cert)
    return ClientIdentity(
        certificate=cert.public_bytes(serialization.Encoding.DER),
        key=key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        application_uri=uris[0] if uris else application_uri_for(host),
        certificate_path=cert_path,
    )


def _generate(cert_path: Path, key_path: Path, uri: str, host: str) -> None:
    """A self-signed OPC UA application certificate (OPC 10000-6 §6.2.2) and its key, 0600."""
    key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = cert_gen.generate_private_key()
    cert = cert_gen.generate_self_signed_app_certificate(
        key,
        f"edge-agent@{host}",
        {"organizationName": "edge-agent"},
        [x509.UniformResourceIdentifier(uri), x509.DNSName(host)],
        extended=[ExtendedKeyUsageOID.CLIENT_AUTH],
        days=5 * 365,
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(cert_gen.dump_private_key_as_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))


def _san_uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(san.value.get_values_for_type(x509.UniformResourceIdentifier))


class ServerTrust:
    """Decides whether a server certificate is trusted: the pin, else the trust directory."""

    def __init__(self, security: OpcuaSecurity) -> None:
        self._pin = security.server_certificate
        self._trust_dir = security.trust_path
        self._rejected_dir = security.rejected_path

    def check(self, der: bytes) -> None:
        """Return when `der` is trusted; raise UntrustedCertificateError saying why otherwise."""
        cert = x509.load_der_x509_certificate(der)
        reason = self._untrusted_reason(cert, der)
        if reason is None:
            return
        saved = self._save_rejected(der)
        subject = cert.subject.rfc4514_string()
        if self._pin is not None:
            advice = f"if the server's certificate was renewed, replace {self._pin} with {saved}"
        else:
            advice = f"to trust it, copy {saved} into {self._trust_dir}/"
        raise UntrustedCertificateError(
            f"server certificate rejected: {reason}; subject={subject} {thumbprints(der)}; {advice}"
        )

    def _untrusted_reason(self, cert: x509.Certificate, der: bytes) -> str | None:
        now = datetime.now(UTC)
        if cert.not_valid_after_utc < now:
            return f"expired on {cert.not_valid_after_utc:%Y-%m-%d}"
        if cert.not_valid_before_utc > now:
            return f"not valid before {cert.not_valid_before_utc:%Y-%m-%d}"
        if self._pin is not None:
            pinned = load_certificate(self._pin).public_bytes(serialization.Encoding.DER)
            if pinned == der:
                return None
            return f"it is not the pinned certificate {self._pin} ({thumbprints(pinned)})"
        trusted = list(self._trusted())
        if not trusted:
            return f"the trust directory {self._trust_dir} is empty or missing"
        for candidate in trusted:
            if candidate.public_bytes(serialization.Encoding.DER) == der:
                return None
            if _issued_by(cert, candidate):
                return None
        return f"it is not in the trust directory {self._trust_dir}, nor issued by a CA there"

    def _trusted(self) -> list[x509.Certificate]:
        """Every certificate in the trust directory; read per connect, so edits apply on retry."""
        if not self._trust_dir.is_dir():
            return []
        found = []
        for path in sorted(self._trust_dir.iterdir()):
            if path.suffix.lower() in _CERT_SUFFIXES and path.is_file():
                try:
                    found.append(load_certificate(path))
                except ValueError:
                    continue  # not a certificate: ignored, as a CRL or a README would be
        return found

    def _save_rejected(self, der: bytes) -> Path:
        sha1 = hashlib.sha1(der, usedforsecurity=False).hexdigest().upper()
        path = self._rejected_dir / f"server-{sha1}.der"
        try:
            self._rejected_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            path.write_bytes(der)
        except OSError:
            pass  # a read-only state dir must not hide the real error
        return path


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """True when the trusted certificate `ca` is a CA that signed `cert`."""
    if cert.issuer != ca.subject or cert == ca:
        return False
    try:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    if not constraints.ca:
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def select_endpoint(
    endpoints: list[ua.EndpointDescription], policy: str, mode: str
) -> ua.EndpointDescription:
    """The server's endpoint for this policy and mode; the error lists what it offers instead."""
    uri = POLICIES[policy].URI if policy != "None" else security_policies.SecurityPolicyNone.URI
    for endpoint in endpoints:
        if endpoint.SecurityPolicyUri == uri and endpoint.SecurityMode == MODES[mode]:
            return endpoint
    offered = sorted(
        {
            f"{ep.SecurityPolicyUri.rsplit('#', 1)[-1]}/{ep.SecurityMode.name.rstrip('_')}"
            for ep in endpoints
        }
    )
    raise SecurityError(
        f"the server offers no endpoint with policy {policy} and mode {mode}; "
        f"it offers {', '.join(offered) or 'none'}"
    )


async def configure_client(client: Client, security: OpcuaSecurity, auth: OpcuaAuth | None) -> None:
    """Set up identity, server trust and user authentication on a client, before connect.

    With a security policy this asks the server for its endpoints (over an unsecured discovery
    channel, as the standard intends), checks the offered certificate and only then opens a
    secure channel encrypted to that certificate; CreateSession checks it again.
    """
    client.name = client.description = "edge-agent"
    client.product_uri = "urn:edge-agent"
    if security.policy != "None":
        identity = await asyncio.to_thread(ensure_client_identity, security)
        client.application_uri = identity.application_uri
        endpoints = await client.connect_and_get_server_endpoints()
        endpoint = select_endpoint(endpoints, security.policy, security.message_mode)
        server_der = first_certificate(bytes(endpoint.ServerCertificate or b""))
        if not server_der:
            raise SecurityError("the server's endpoint carries no certificate")
        trust = ServerTrust(security)
        await asyncio.to_thread(trust.check, server_der)
        await client.set_security(
            POLICIES[security.policy],
            identity.certificate,
            identity.key,
            server_certificate=server_der,
            mode=MODES[security.message_mode],
        )

        async def same_certificate(cert: x509.Certificate, _app: ua.ApplicationDescription) -> None:
            der = cert.public_bytes(serialization.Encoding.DER)
            if der != server_der:
                trust.check(der)

        client.certificate_validator = same_certificate
    if auth is None:
        return
    if auth.username is not None:
        client.set_user(auth.username)
        password = await asyncio.to_thread(auth.password_value)
        if password is not None:
            client.set_password(password)
    if auth.certificate is not None and auth.private_key is not None:
        client.user_private_key = await asyncio.to_thread(load_private_key, auth.private_key)
        client.user_certificate = await asyncio.to_thread(load_certificate, auth.certificate)
