"""TLS certificates and SuperNode keys for a deployment (``privlora.flower.certs``)."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from privlora.flower import certs


def test_certificates_chain_to_the_ca_and_name_the_address(tmp_path):
    made = certs.server_certs(tmp_path, "127.0.0.1")
    ca = x509.load_pem_x509_certificate(made.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(made.cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert oct(made.key.stat().st_mode & 0o777) == "0o600"
    private, public = certs.node_keys(tmp_path, "node0")
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode() == \
        public.read_text()
