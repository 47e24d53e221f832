"""TLS on the gRPC port, without Ray: a self-signed pair made at test time, a real server on a loopback port.

The same predictions as plaintext; a plaintext client, a client trusting another certificate or dialling a
name the certificate does not carry all fail fast; tokens still apply; half a pair or a bad file is an error
that names the variables or the path."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from pydantic import ValidationError

from services.gateway.hub import ModelHub
from services.gateway.settings import GatewaySettings
from services.ingest import tls
from services.ingest.client import IngestError, connect
from services.ingest.server import SurgeServer, release, serve
from services.ingest.tls import ServerTLS, TLSError
from tests.ingest.test_predict_grpc import PARAMS, TIMES, _publish

MAX_ROWS = 64
TIMEOUT = 5.0  # every call here: a TLS mismatch must fail, not hang


def make_pair(where: Path, name: str, dns: str = "localhost") -> tuple[Path, Path]:
    """A self-signed certificate for ``dns`` and 127.0.0.1, and its key: ``(cert.pem, key.pem)`` in ``where``."""
    cert, key = where / f"{name}-cert.pem", where / f"{name}-key.pem"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither the cryptography package nor openssl is here to make a test certificate")
        subj = f"/CN={dns}"
        san = f"subjectAltName=DNS:{dns},IP:127.0.0.1"
        req = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", subj]
        subprocess.run(
            [*req, "-addext", san, "-keyout", str(key), "-out", str(cert)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        return cert, key
    pk = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns)])
    now = datetime.datetime.now(datetime.UTC)
    c = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(pk.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(dns), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(pk, hashes.SHA256())
    )
    cert.write_bytes(c.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        pk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    d = tmp_path_factory.mktemp("pki")
    return {
        "server": make_pair(d, "server"),
        "other": make_pair(d, "other"),  # trusted by nobody here: the wrong root
        "named": make_pair(d, "named", dns="surge.internal"),  # issued to a name that is not the address
    }


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelHub]:
    root = tmp_path_factory.mktemp("store")
    _publish(root)
    h = ModelHub(root, 0.2)
    h.start()
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="module")
def servers(pki, hub) -> Iterator[dict[str, SurgeServer]]:
    """A plaintext and a TLS server lent the same models (no token: predictions need none)."""
    plain = serve("127.0.0.1", 0, token=None)
    secure = serve("127.0.0.1", 0, token=None, tls=ServerTLS.load(*pki["server"]))
    for s in (plain, secure):
        s.serve_predictions(hub, MAX_ROWS)
    try:
        yield {"plain": plain, "tls": secure}
    finally:
        release(plain)
        release(secure)


def test_a_tls_client_gets_the_same_prediction_as_a_plaintext_one(servers, pki) -> None:
    with connect(servers["plain"].address, "") as c:
        want, v = c.predict("heat2d", params=PARAMS, times=TIMES, timeout=TIMEOUT)
    root = pki["server"][0]
    for given in (root, root.read_bytes(), str(root)):  # a path, PEM bytes, a str path
        with connect(servers["tls"].address, "", root_cert=given) as c:
            got, version = c.predict("heat2d", params=PARAMS, times=TIMES, timeout=TIMEOUT)
        assert version == v == 1 and got.shape == (3, 1, 8, 8)
        np.testing.assert_array_equal(got, want)


def test_the_root_certificate_and_server_name_default_to_the_environment(servers, pki, monkeypatch) -> None:
    monkeypatch.setenv(tls.ROOT_CERT, str(pki["server"][0]))
    with connect(servers["tls"].address, "") as c:
        assert c.predict("heat2d", params=PARAMS, times=[0.0], timeout=TIMEOUT)[1] == 1
    monkeypatch.setenv(tls.SERVER_NAME, "localhost")  # a name the certificate carries, dialled by IP
    with connect(servers["tls"].address, "") as c:
        assert c.predict("heat2d", params=PARAMS, times=[0.0], timeout=TIMEOUT)[1] == 1


def test_a_plaintext_client_against_a_tls_server_is_unavailable_at_once(servers) -> None:
    with connect(servers["tls"].address, "") as c, pytest.raises(IngestError) as e:
        c.predict("heat2d", params=PARAMS, times=[0.0], timeout=TIMEOUT)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_a_client_trusting_another_certificate_is_refused(servers, pki) -> None:
    with connect(servers["tls"].address, "", root_cert=pki["other"][0]) as c, pytest.raises(IngestError) as e:
        c.predict("heat2d", params=PARAMS, times=[0.0], timeout=TIMEOUT)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_a_certificate_for_another_name_needs_server_name(pki, hub) -> None:
    srv = SurgeServer("127.0.0.1", 0, None, tls=ServerTLS.load(*pki["named"]))
    srv.serve_predictions(hub, MAX_ROWS)
    root = pki["named"][0]
    try:
        # Dialled as localhost: the certificate names surge.internal (and 127.0.0.1), not localhost.
        address = f"localhost:{srv.port}"
        with connect(address, "", root_cert=root) as c, pytest.raises(IngestError) as e:
            c.predict("heat2d", params=PARAMS, times=[0.0], timeout=TIMEOUT)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        with connect(address, "", root_cert=root, server_name="surge.internal") as c:
            assert c.predict("heat2d", params=PARAMS, times=[0.0], timeout=TIMEOUT)[1] == 1
    finally:
        srv.stop()
    with pytest.raises(TLSError, match="needs a root certificate"):
        connect(address, "", server_name="surge.internal")


def test_tokens_still_apply_over_tls(pki, hub) -> None:
    from services.auth import TOKEN_MISSING

    srv = SurgeServer("127.0.0.1", 0, "ingest-t", tls=ServerTLS.load(*pki["server"]))
    srv.serve_predictions(hub, MAX_ROWS, token="predict-t")
    root = pki["server"][0]
    try:
        for token in ("", "ingest-t"):
            with connect(srv.address, token, root_cert=root) as c, pytest.raises(IngestError) as e:
                c.predict("heat2d", params=PARAMS, times=[0.0], timeout=TIMEOUT)
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and e.value.message == TOKEN_MISSING
        with connect(srv.address, "predict-t", root_cert=root) as c:
            assert c.predict("heat2d", params=PARAMS, times=[0.0], timeout=TIMEOUT)[1] == 1
            with pytest.raises(IngestError) as e:  # the predict token opens no ingest call
                c.next_simulation("any", connect_s=0)
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        with connect(srv.address, "ingest-t", root_cert=root) as c, pytest.raises(IngestError) as e:
            c.next_simulation("any", connect_s=0)
        assert e.value.code == grpc.StatusCode.NOT_FOUND  # past the token check: no such study here
    finally:
        srv.stop()


def test_half_a_pair_is_an_error_naming_both_variables(pki, tmp_path, monkeypatch) -> None:
    cert, key = pki["server"]
    for env in ({tls.CERT: str(cert)}, {tls.KEY: str(key)}):
        with pytest.raises(TLSError) as e:
            ServerTLS.from_env(env)
        assert tls.CERT in str(e.value) and tls.KEY in str(e.value)
    assert ServerTLS.from_env({}) is None
    assert ServerTLS.from_env({tls.CERT: str(cert), tls.KEY: str(key)}) == ServerTLS.load(cert, key)
    # The gateway's settings: from the environment, and built directly.
    monkeypatch.setenv(tls.CERT, str(cert))
    monkeypatch.delenv(tls.KEY, raising=False)
    with pytest.raises(TLSError, match=f"{tls.CERT} is set but {tls.KEY} is not"):
        GatewaySettings.from_env(store=tmp_path)
    from services.cli import _gateway_settings

    with pytest.raises(SystemExit) as ex:  # the command line: one line naming both, no traceback
        _gateway_settings(store=tmp_path)
    assert str(ex.value).startswith("surge: ") and tls.CERT in str(ex.value) and tls.KEY in str(ex.value)
    monkeypatch.setenv(tls.KEY, str(key))
    s = GatewaySettings.from_env(store=tmp_path)
    assert s.grpc_tls_cert == cert and s.grpc_tls() == ServerTLS.load(cert, key)
    with pytest.raises(ValidationError, match=tls.KEY):
        GatewaySettings(store=tmp_path, grpc_tls_cert=cert)
    assert GatewaySettings(store=tmp_path).grpc_tls() is None


def test_an_unreadable_or_invalid_file_is_an_error_naming_its_path(pki, tmp_path) -> None:
    cert, key = pki["server"]
    missing = tmp_path / "nope.pem"
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    cases = [
        ((missing, key), f"{tls.CERT}={missing}: cannot read the certificate file"),
        ((cert, missing), f"{tls.KEY}={missing}: cannot read the private key file"),
        ((junk, key), f"{tls.CERT}={junk}: not a PEM certificate"),
        ((cert, junk), f"{tls.KEY}={junk}: not a PEM private key"),
        ((key, cert), f"{tls.CERT}={key}: not a PEM certificate"),  # swapped
        ((cert, pki["other"][1]), f"{tls.KEY}={pki['other'][1]}: the private key does not belong"),
    ]
    for (c, k), message in cases:
        with pytest.raises(TLSError) as e:
            ServerTLS.load(c, k)
        assert str(e.value).startswith(message), str(e.value)
    with pytest.raises(TLSError, match=f"root_cert={missing}: cannot read"):
        connect("127.0.0.1:1", "", root_cert=missing)
    with pytest.raises(TLSError, match="root_cert: not a PEM certificate"):
        connect("127.0.0.1:1", "", root_cert=b"junk")


def test_a_shared_port_keeps_its_tls_and_says_so(pki, caplog) -> None:
    pair = ServerTLS.load(*pki["server"])
    first = serve("127.0.0.1", 0, token=None, tls=pair)
    try:
        with caplog.at_level(logging.WARNING, logger="surge.ingest"):
            same = serve("127.0.0.1", first.port, token=None, tls=ServerTLS.load(*pki["server"]))
            assert same is first and not caplog.records  # the same pair: shared quietly
            plain = serve("127.0.0.1", first.port, token=None)
        assert plain is first and plain.tls == pair
        assert any("keeps the TLS it was started with" in r.getMessage() for r in caplog.records)
        release(same)
        release(plain)
    finally:
        release(first)
