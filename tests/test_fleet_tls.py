"""TLS on the collector: a self-signed certificate made here with ``cryptography``; real HTTPS requests that
verify it (``requests``), and client-certificate auth (``--tls-client-ca``) refusing a client without one."""
from __future__ import annotations

import datetime as dt
import ipaddress
import ssl

import pytest
import requests

from edge_runtime.errors import ConfigError
from fleet.collector import CollectorThread
from fleet.settings import CollectorSettings


def _cert(path_base, common_name, issuer=None, ca=False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_cert.subject if issuer_cert else name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
    cert = b.sign(issuer_key, hashes.SHA256())
    cert_path, key_path = path_base.with_suffix(".crt"), path_base.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert, key, cert_path, key_path


def test_https_with_a_self_signed_certificate(tmp_path):
    _, _, crt, key = _cert(tmp_path / "server", "127.0.0.1")
    c = CollectorThread(CollectorSettings(db=tmp_path / "c.db", port=0, tls_cert=crt, tls_key=key)).start()
    try:
        assert c.url.startswith("https://127.0.0.1:")
        r = requests.get(f"{c.url}/healthz", verify=str(crt), timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        with pytest.raises(requests.exceptions.SSLError):  # a client that does not trust the cert is refused
            requests.get(f"{c.url}/healthz", timeout=10)
        with pytest.raises(requests.exceptions.ConnectionError):  # plain HTTP is not served
            requests.get(c.url.replace("https://", "http://") + "/healthz", timeout=10)
        # no --targets-key: the update channel says why it cannot answer
        r = requests.get(f"{c.url}/api/v1/devices/x/target", verify=str(crt), timeout=10)
        assert r.status_code == 503 and "without --targets-key" in r.json()["detail"]
    finally:
        c.stop()


def test_client_certificates_required_with_a_client_ca(tmp_path):
    _, _, crt, key = _cert(tmp_path / "server", "127.0.0.1")
    ca_cert, ca_key, ca_crt, _ = _cert(tmp_path / "ca", "defectkit test CA", ca=True)
    _, _, box_crt, box_key = _cert(tmp_path / "box", "press-01", issuer=(ca_cert, ca_key))
    _, _, rogue_crt, rogue_key = _cert(tmp_path / "rogue", "rogue")  # self-signed, not by the CA
    c = CollectorThread(CollectorSettings(db=tmp_path / "c.db", port=0, tls_cert=crt, tls_key=key,
                                          tls_client_ca=ca_crt)).start()
    try:
        r = requests.get(f"{c.url}/healthz", verify=str(crt), cert=(str(box_crt), str(box_key)), timeout=10)
        assert r.status_code == 200
        for cert in (None, (str(rogue_crt), str(rogue_key))):
            with pytest.raises((requests.exceptions.SSLError, requests.exceptions.ConnectionError)):
                requests.get(f"{c.url}/healthz", verify=str(crt), cert=cert, timeout=10)
    finally:
        c.stop()


def test_tls_settings_and_serve_flags(tmp_path):
    from fleet.cli import add_commands
    from fleet.server import tls_options
    import argparse

    _, _, crt, key = _cert(tmp_path / "server", "127.0.0.1")
    with pytest.raises(ConfigError, match="TLS needs both --tls-cert and --tls-key"):
        CollectorSettings(db=tmp_path / "c.db", tls_cert=crt).check()
    with pytest.raises(ConfigError, match="--tls-client-ca .* needs --tls-cert"):
        CollectorSettings(db=tmp_path / "c.db", tls_client_ca=crt).check()
    with pytest.raises(ConfigError, match="--tls-key .*missing.key does not exist"):
        CollectorSettings(db=tmp_path / "c.db", tls_cert=crt, tls_key=tmp_path / "missing.key").check()
    s = CollectorSettings(db=tmp_path / "c.db", tls_cert=crt, tls_key=key, tls_client_ca=crt)
    assert tls_options(s) == {"ssl_certfile": str(crt), "ssl_keyfile": str(key), "ssl_ca_certs": str(crt),
                              "ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert tls_options(CollectorSettings(db=tmp_path / "c.db")) == {}
    parser = argparse.ArgumentParser()
    add_commands(parser)
    a = parser.parse_args(["serve", "--db", "x.db", "--tls-cert", "c", "--tls-key", "k", "--tls-client-ca", "ca",
                           "--targets-key", "t.pem", "--target-expiry", "2h", "--rollout-interval", "30s"])
    assert (str(a.tls_cert), str(a.tls_key), str(a.tls_client_ca), a.target_expiry) == ("c", "k", "ca", "2h")
