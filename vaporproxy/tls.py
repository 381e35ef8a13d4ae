"""
TLS towards VMs, from the configuration: L{VncTLS} holds one hypervisor's
C{vnc_tls} or C{spice_tls} section with its files read once (at start-up
and on SIGHUP), and gives per host the connection creator
(L{VeNCryptTLS}); L{tls_by_uri} loads them for every hypervisor;
L{describe_connection_lost} turns a failed TLS handshake into a log reason.

A value on the ground floor: the VeNCrypt guard
(L{vaporproxy.guards.vencrypt}) and the dialler of SPICE C{tlsPort}s
(L{vaporproxy.relay.dial}, given the settings L{vaporproxy.vm.dial}
loads) both take it, so none of them imports another.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet.error import VerifyError
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    KeyPair,
    PrivateCertificate,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from vaporproxy.config import ConfigError, HypervisorConfig, VncTLSConfig


@dataclass(frozen=True)
class VeNCryptTLS:
    """
    What the guard needs for VeNCrypt with one VM connection.

    @ivar creator: the connection creator for the X.509 sub-types (checks
        the VM's certificate unless verification is off); the guard hands it
        out in L{StartTLS}.
    @ivar anonymous: the creator for the anonymous-TLS sub-types (TLSVnc,
        TLSNone), or C{None} when they are refused.
    """

    creator: Any
    anonymous: Any = None


def describe_connection_lost(reason: object) -> str:
    """
    A one-line log description of why a connection closed: OpenSSL's
    reasons for a TLS error (e.g. C{certificate verify failed}), the
    message of a hostname mismatch, or the exception's name.
    """
    value = reason.value if isinstance(reason, Failure) else reason
    if value is None:
        return "connection closed"
    if isinstance(value, SSL.Error):
        parts = []
        for item in value.args[0] if value.args and isinstance(value.args[0], list) else ():
            if isinstance(item, tuple) and item:
                parts.append(str(item[-1]))
        if parts:
            return "; ".join(parts)[:300]
    text = str(value).strip().splitlines()[0] if str(value).strip() else ""
    name = type(value).__name__
    return ("%s: %s" % (name, text) if text else name)[:300]


@implementer(IOpenSSLClientConnectionCreator)
class AnonymousTLSCreator:
    """
    TLS 1.2 with anonymous Diffie-Hellman only (what VeNCrypt's TLSNone and
    TLSVnc use): encrypted but unauthenticated, so only used when
    C{allow_anonymous} is set.
    """

    def __init__(self) -> None:
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_max_proto_version(SSL.TLS1_2_VERSION)
        context.set_cipher_list(b"aNULL:!eNULL:@SECLEVEL=0")
        self._context = context

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self._context, None)


def _read(key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{key}: {path!r} cannot be read ({e.strerror or e})") from None


def _load_certificates(key: str, path: str) -> List[Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(_read(key, path))
    except ValueError:
        raise ConfigError(
            f"{key}: {path!r} is not a PEM certificate file (expected one or more CERTIFICATE blocks)"
        ) from None
    return [Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM)) for c in certificates]


def _client_certificate(config: VncTLSConfig, key: str) -> Optional[PrivateCertificate]:
    """
    The proxy's own certificate and key from C{cert_file}/C{key_file}, or
    C{None} when none is configured.
    """
    if config.cert_file is None:
        return None
    certificates = _load_certificates(f"{key}.cert_file", config.cert_file)
    key_file = config.key_file or config.cert_file
    try:
        pair = KeyPair.load(_read(f"{key}.key_file", key_file), 1)  # FILETYPE_PEM
    except Exception:
        raise ConfigError(f"{key}.key_file: {key_file!r} is not a PEM private key") from None
    try:
        return PrivateCertificate.fromCertificateAndKeyPair(certificates[0], pair)
    except VerifyError:
        raise ConfigError(
            f"{key}.key_file: {key_file!r} is not the key of {config.cert_file!r} (expected the matching key)"
        ) from None


class VncTLS:
    """
    The VeNCrypt TLS settings of one hypervisor's VMs, with the files read
    once.  L{for_host} gives what the guard needs for one connection.

    @param config: the hypervisor's C{vnc_tls} section.
    @param key: the dotted config key, for error messages.
    @raise ConfigError: when a file cannot be read or parsed.
    """

    #: How many per-host connection creators are kept.
    CACHE_SIZE = 256

    def __init__(self, config: VncTLSConfig, key: str = "vnc_tls"):
        self.config = config
        self._trust: Any = None
        if config.verify:
            if config.ca_file is None:
                self._trust = platformTrust()
            else:
                self._trust = trustRootFromCertificates(_load_certificates(f"{key}.ca_file", config.ca_file))
        self._client = _client_certificate(config, key)
        self._anonymous = AnonymousTLSCreator() if config.allow_anonymous else None
        self._unverified: Any = None
        self._creators: "OrderedDict[str, Any]" = OrderedDict()

    def for_host(self, host: str) -> VeNCryptTLS:
        """
        The TLS settings for a connection to C{host} (the host name or
        address dialled; the certificate must name it unless C{server_name}
        is configured, or verification is off).
        """
        return VeNCryptTLS(creator=self._creator(self.config.server_name or host), anonymous=self._anonymous)

    def _creator(self, name: str) -> Any:
        if not self.config.verify:
            if self._unverified is None:
                extra: Dict[str, Any] = {}
                if self._client is not None:
                    extra = {"privateKey": self._client.privateKey.original, "certificate": self._client.original}
                self._unverified = CertificateOptions(verify=False, **extra)
            return self._unverified
        creator = self._creators.get(name)
        if creator is None:
            creator = optionsForClientTLS(name, trustRoot=self._trust, clientCertificate=self._client)
            self._creators[name] = creator
            while len(self._creators) > self.CACHE_SIZE:
                self._creators.popitem(last=False)
        else:
            self._creators.move_to_end(name)
        return creator


def tls_by_uri(hypervisors: Iterable[HypervisorConfig], section: str = "vnc_tls") -> Dict[str, VncTLS]:
    """
    The loaded TLS settings of every hypervisor that has the section
    C{section} (C{vnc_tls} or C{spice_tls}), by hypervisor URI (what
    L{VMConsoles.hypervisor} holds): the CA, client certificate and key are
    read once here (at start-up and on SIGHUP).

    @raise ConfigError: naming the key of the first unusable file.
    """
    found: Dict[str, VncTLS] = {}
    for i, hypervisor in enumerate(hypervisors):
        config = getattr(hypervisor, section)
        if config is not None:
            found[hypervisor.uri] = VncTLS(config, f"hypervisors[{i}].{section}")
    return found
