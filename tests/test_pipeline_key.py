"""The link secrets as a board reads them: the key and the TLS contexts pinning the pipeline certificate."""

import ssl

import pytest

from dnnpipe.errors import ConfigError
from dnnpipe.keygen import create_certificate, create_key
from dnnpipe.pipeline_key import CERT_KEY_FILE, KEY_FILE, link_tls, read_key, stage_key, tls_context


def test_missing_or_shared_certificate_key_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"pipeline.crt: TLS certificate not found .*--no-tls"):
        tls_context(tmp_path, server_side=False)
    create_certificate(tmp_path)
    (tmp_path / CERT_KEY_FILE).chmod(0o644)
    with pytest.raises(ConfigError, match=r"pipeline.crt.key: the TLS key is readable by others \(mode 644\)"):
        tls_context(tmp_path, server_side=False)


def test_link_tls_gives_both_ends_or_none(tmp_path):
    assert link_tls(tmp_path, tls=False) == (None, None)  # --no-tls needs no certificate
    create_certificate(tmp_path)
    listening, connecting = link_tls(tmp_path)
    assert isinstance(listening, ssl.SSLContext) and isinstance(connecting, ssl.SSLContext)
    assert connecting.verify_mode == ssl.CERT_REQUIRED and not connecting.check_hostname  # pinned, any address


def test_the_stage_key_is_read_checked_or_skipped(tmp_path):
    assert stage_key(tmp_path, None, insecure=True) is None
    with pytest.raises(ConfigError, match=r"pipeline.key: pipeline key not found"):
        stage_key(tmp_path, None, insecure=False)
    create_key(tmp_path)
    assert stage_key(tmp_path, None, insecure=False) == read_key(tmp_path / KEY_FILE)
    (tmp_path / KEY_FILE).chmod(0o640)
    with pytest.raises(ConfigError, match=r"readable by others \(mode 640\); run chmod 600"):
        read_key(tmp_path / KEY_FILE)
