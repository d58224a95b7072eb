"""Making the link secrets on the workstation: the pipeline key and the pipeline certificate (openssl).

Kept apart from dnnpipe.pipeline_key, which a board runs, so certificate creation (and its subprocess) is never
shipped to a device (dnnpipe.deploy.closure). The partitioner makes both; run-local and the deployer make the
certificate when it is missing.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from .errors import ConfigError
from .pipeline_key import CERT_FILE, CERT_KEY_FILE, KEY_BYTES, KEY_FILE, read_key

OPENSSL_SECONDS = 60.0  # for openssl to make the pair (milliseconds when it works)


def create_key(folder: Path) -> Path:
    """Write a fresh key to folder/pipeline.key (mode 0600, never half-written) unless one is there."""
    path = folder / KEY_FILE
    if path.exists():
        read_key(path)  # an existing key must be a valid one
        return path
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".{KEY_FILE}.{secrets.token_hex(4)}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(KEY_BYTES))
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def create_link_secrets(folder: Path) -> None:
    """The pipeline key and, where openssl is installed, the TLS certificate (both kept when re-partitioning;
    without openssl, run-local or the deployer makes the certificate when the links need it)."""
    create_key(folder)
    if shutil.which("openssl") is not None:
        create_certificate(folder)


def create_certificate(folder: Path) -> Path:
    """Make folder/pipeline.crt (self-signed, EC P-256) and pipeline.crt.key (mode 0600) unless both are there.

    Both ends of every TLS link hold this one pair and pin it (mutual TLS, docs/security.md). The system
    `openssl` makes it, from an argument vector; it writes into a private temporary folder, and the pair is
    renamed into place key first, so a certificate beside the manifest always has its key.
    """
    cert, private = folder / CERT_FILE, folder / CERT_KEY_FILE
    if cert.is_file() and private.is_file():
        return cert
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ConfigError(f"{cert}: cannot make the TLS certificate: the openssl command is not installed (install "
                          f"openssl, copy pipeline.crt and pipeline.crt.key from another partition, or pass --no-tls)")
    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".pipeline-crt.", dir=folder))  # mode 0700
    try:
        made_cert, made_key = work / CERT_FILE, work / CERT_KEY_FILE
        try:
            result = subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                                     "ec_paramgen_curve:prime256v1", "-nodes", "-days", "3650", "-subj",
                                     "/CN=dnnpipe-pipeline", "-keyout", str(made_key), "-out", str(made_cert)],
                                    capture_output=True, text=True, timeout=OPENSSL_SECONDS)
        except subprocess.TimeoutExpired:
            raise ConfigError(f"{cert}: openssl did not make the TLS certificate within {OPENSSL_SECONDS:g} s "
                              f"({openssl} hangs?)") from None
        if result.returncode != 0 or not made_cert.is_file() or not made_key.is_file():
            why = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise ConfigError(f"{cert}: openssl could not make the TLS certificate ({why})")
        made_key.chmod(0o600)
        os.replace(made_key, private)
        os.replace(made_cert, cert)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return cert
