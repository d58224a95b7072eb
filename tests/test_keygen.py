"""Making the link secrets on the workstation: the key and the TLS certificate pair, made once, private, never
half-written."""

import shutil
import ssl
import stat

import pytest

from dnnpipe.errors import ConfigError
from dnnpipe.keygen import create_certificate, create_link_secrets
from dnnpipe.pipeline_key import CERT_FILE, CERT_KEY_FILE, KEY_FILE, tls_context


def test_link_secrets_are_made_once_with_private_modes(tmp_path):
    create_link_secrets(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CERT_FILE, CERT_KEY_FILE, KEY_FILE]  # no leftovers
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / CERT_KEY_FILE).stat().st_mode) == 0o600
    assert b"BEGIN CERTIFICATE" in (tmp_path / CERT_FILE).read_bytes()
    before = [(tmp_path / name).read_bytes() for name in (KEY_FILE, CERT_FILE, CERT_KEY_FILE)]
    create_link_secrets(tmp_path)  # re-partitioning keeps them
    assert [(tmp_path / name).read_bytes() for name in (KEY_FILE, CERT_FILE, CERT_KEY_FILE)] == before
    context = tls_context(tmp_path, server_side=True)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.minimum_version == ssl.TLSVersion.TLSv1_3


def test_a_certificate_without_its_key_is_made_again(tmp_path):
    create_certificate(tmp_path)
    old = (tmp_path / CERT_FILE).read_bytes()
    (tmp_path / CERT_KEY_FILE).unlink()
    create_certificate(tmp_path)
    assert (tmp_path / CERT_KEY_FILE).is_file() and (tmp_path / CERT_FILE).read_bytes() != old


def test_without_openssl_tls_says_so_and_partitioning_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"pipeline.crt: cannot make the TLS certificate: the openssl command is "
                                          r"not installed .*or pass --no-tls"):
        create_certificate(tmp_path / "out")
    create_link_secrets(tmp_path / "out")  # the key still; run-local or the deployer make the certificate later
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [KEY_FILE]


def test_an_openssl_that_hangs_is_a_one_line_error(tmp_path, monkeypatch):
    """subprocess.TimeoutExpired escaped as a traceback."""
    import dnnpipe.keygen

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    hung = bin_dir / "openssl"
    hung.write_text(f"#!/bin/sh\nexec {shutil.which('sleep')} 30\n")
    hung.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(dnnpipe.keygen, "OPENSSL_SECONDS", 0.5)
    with pytest.raises(ConfigError, match=r"pipeline.crt: openssl did not make the TLS certificate within 0.5 s"):
        create_certificate(tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []  # the private temporary folder is gone
