"""TLS on the gRPC port: the server's certificate and key, and what a client trusts, read from PEM files.

Server: ``SURGE_GRPC_TLS_CERT`` and ``SURGE_GRPC_TLS_KEY`` (paths, both or neither; the certificate file may
hold the chain). Client: ``SURGE_GRPC_TLS_ROOT_CERT`` (a path: the certificate, or the CA, to trust) and
``SURGE_GRPC_TLS_SERVER_NAME`` (the name the certificate was issued to, when it is not the address dialled).
Without them the port speaks plaintext, as before. Errors name the variable and the path at fault.

Only the standard library here, and grpc where credentials are made, so that the client (grpc and numpy
only) and the gateway's settings can import it cheaply.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from services.auth import SecretError

if TYPE_CHECKING:
    import grpc

CERT, KEY = "SURGE_GRPC_TLS_CERT", "SURGE_GRPC_TLS_KEY"
ROOT_CERT, SERVER_NAME = "SURGE_GRPC_TLS_ROOT_CERT", "SURGE_GRPC_TLS_SERVER_NAME"
_CERT_MARK = b"-----BEGIN CERTIFICATE-----"
_KEY_MARK = b"PRIVATE KEY-----"  # PKCS#8 ("BEGIN PRIVATE KEY"), PKCS#1 ("BEGIN RSA ..."), SEC1 ("BEGIN EC ...")


class TLSError(SecretError):
    """A TLS setting that is half given, or a PEM file that cannot be read or used.

    A ``SecretError`` (the key is a secret named in the environment), so that the command line reports it
    as it reports an unreadable token file: one line, no traceback."""


def read_pem(path: str | os.PathLike[str], what: str, mark: bytes, label: str) -> bytes:
    """The bytes of a PEM file holding ``mark``; else ``TLSError`` as ``label=path: ...`` saying what is wrong."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TLSError(f"{label}={path}: cannot read the {what} file: {e.strerror or e}") from None
    if mark not in data:
        raise TLSError(f"{label}={path}: not a PEM {what} (no '{mark.decode()}' line)")
    return data


def require_pair(cert: object, key: object) -> None:
    """The server's certificate and key come together; one without the other is a ``TLSError`` naming both."""
    if bool(cert) != bool(key):
        given, missing = (CERT, KEY) if cert else (KEY, CERT)
        raise TLSError(
            f"{given} is set but {missing} is not: TLS on the gRPC port needs both {CERT} (certificate) "
            f"and {KEY} (private key), PEM files; set both, or neither for plaintext"
        )


@dataclass(frozen=True)
class ServerTLS:
    """The server's certificate (chain) and private key, PEM, checked to belong together.

    Equal when the PEM content is: servers sharing a port compare what they were started with."""

    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    cert_path: str = field(compare=False)
    key_path: str = field(compare=False)

    @classmethod
    def load(cls, cert: str | os.PathLike[str], key: str | os.PathLike[str]) -> ServerTLS:
        """Read and check the pair; ``TLSError`` naming the file that cannot be read or used."""
        cert_pem = read_pem(cert, "certificate", _CERT_MARK, CERT)
        key_pem = read_pem(key, "private key", _KEY_MARK, KEY)
        # grpc reports a bad pair only as "failed to bind" when the port is added; ssl says which it is.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(cert, key, password=lambda: b"")  # an encrypted key fails here, never prompts
        except ssl.SSLError as e:
            if "KEY_VALUES_MISMATCH" in str(e):
                raise TLSError(
                    f"{KEY}={key}: the private key does not belong to the certificate {CERT}={cert}"
                ) from None
            raise TLSError(
                f"{CERT}={cert}, {KEY}={key}: cannot use them (an encrypted key is not supported): {e.reason or e}"
            ) from None
        return cls(cert_pem, key_pem, str(cert), str(key))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServerTLS | None:
        """The pair named by ``SURGE_GRPC_TLS_CERT`` / ``SURGE_GRPC_TLS_KEY``, or None when neither is set."""
        env = os.environ if environ is None else environ
        cert, key = env.get(CERT, "").strip(), env.get(KEY, "").strip()
        require_pair(cert, key)
        return cls.load(cert, key) if cert else None

    def credentials(self) -> grpc.ServerCredentials:
        import grpc

        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)])


def root_cert(given: bytes | str | os.PathLike[str] | None = None) -> bytes | None:
    """What a client trusts: ``given`` (PEM bytes, or a path), else the file ``$SURGE_GRPC_TLS_ROOT_CERT``, or None."""
    if isinstance(given, bytes):
        if _CERT_MARK not in given:
            raise TLSError(f"root_cert: not a PEM certificate (no '{_CERT_MARK.decode()}' line)")
        return given
    if given is not None:
        return read_pem(given, "root certificate", _CERT_MARK, "root_cert")
    path = os.environ.get(ROOT_CERT, "").strip()
    return read_pem(path, "root certificate", _CERT_MARK, ROOT_CERT) if path else None


def server_name(given: str | None = None) -> str | None:
    """The name to check the server's certificate against: ``given``, else ``$SURGE_GRPC_TLS_SERVER_NAME``."""
    return given or os.environ.get(SERVER_NAME, "").strip() or None


__all__ = [
    "CERT",
    "KEY",
    "ROOT_CERT",
    "SERVER_NAME",
    "ServerTLS",
    "TLSError",
    "read_pem",
    "require_pair",
    "root_cert",
    "server_name",
]
