"""The pipeline key: a shared secret beside manifest.json that every stage proves it holds before data flows.

One random 32-byte key per partition output, readable by its owner only. Stages and the controller
authenticate each link with it (dnnpipe.runtime.transport); see docs/security.md for what it protects.
With --tls, links are also encrypted, both ends pinning one certificate beside it (pipeline.crt).
"""

from __future__ import annotations

import os
import secrets
import shutil
import ssl
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from .errors import ConfigError

KEY_FILE = "pipeline.key"
KEY_BYTES = 32
CERT_FILE = "pipeline.crt"  # --tls: self-signed, the same on every device
CERT_KEY_FILE = "pipeline.crt.key"  # its private key, mode 0600


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
    """The pipeline key and, where openssl is installed, the --tls certificate (both kept when re-partitioning;
    without openssl, run-local or the deployer makes the certificate when --tls asks for it)."""
    create_key(folder)
    if shutil.which("openssl") is not None:
        create_certificate(folder)


def read_key(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: pipeline key not found (re-run the partitioner, pass --key-file, or "
                          f"--insecure to run without authentication)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the pipeline key ({e.strerror or e})") from None
    if len(data) != KEY_BYTES:
        raise ConfigError(f"{path}: a pipeline key is {KEY_BYTES} bytes, this file has {len(data)}")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{path}: the pipeline key is readable by others (mode {stat.S_IMODE(mode):o}); "
                          f"run chmod 600 on it")
    return data


def stage_key(folder: Path, key_file: Optional[Path], insecure: bool) -> Optional[bytes]:
    """The key a stage uses: --key-file, else the one beside the manifest; None only with --insecure."""
    if insecure:
        return None
    return read_key(key_file if key_file is not None else folder / KEY_FILE)


def create_certificate(folder: Path) -> Path:
    """Make folder/pipeline.crt (self-signed, EC P-256) and pipeline.crt.key (mode 0600) unless both are there.

    Both ends of every --tls link hold this one pair and pin it (mutual TLS, docs/security.md). The system
    `openssl` makes it, from an argument vector; it writes into a private temporary folder, and the pair is
    renamed into place key first, so a certificate beside the manifest always has its key.
    """
    cert, private = folder / CERT_FILE, folder / CERT_KEY_FILE
    if cert.is_file() and private.is_file():
        return cert
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ConfigError(f"{cert}: cannot make the TLS certificate for --tls: the openssl command is not installed "
                          f"(install openssl, or copy pipeline.crt and pipeline.crt.key from another partition)")
    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".pipeline-crt.", dir=folder))  # mode 0700
    try:
        made_cert, made_key = work / CERT_FILE, work / CERT_KEY_FILE
        result = subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                                 "-nodes", "-days", "3650", "-subj", "/CN=dnnpipe-pipeline", "-keyout", str(made_key),
                                 "-out", str(made_cert)], capture_output=True, text=True, timeout=60)
        if result.returncode != 0 or not made_cert.is_file() or not made_key.is_file():
            why = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise ConfigError(f"{cert}: openssl could not make the TLS certificate ({why})")
        made_key.chmod(0o600)
        os.replace(made_key, private)
        os.replace(made_cert, cert)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return cert


def tls_context(folder: Path, server_side: bool) -> ssl.SSLContext:
    """One end of a --tls link: it presents the pipeline certificate and accepts only a peer presenting it too."""
    cert, private = folder / CERT_FILE, folder / CERT_KEY_FILE
    for path in (cert, private):
        if not path.is_file():
            raise ConfigError(f"{path}: TLS certificate not found for --tls (re-run the partitioner or the "
                              f"deployer with --tls on a machine with openssl)")
    mode = private.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{private}: the TLS key is readable by others (mode {stat.S_IMODE(mode):o}); run chmod "
                          f"600 on it")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # pinned: the one certificate, whatever the address
    context.verify_mode = ssl.CERT_REQUIRED
    if server_side:
        context.num_tickets = 0  # no session resumption, and nothing unread on the connector's socket
    try:
        context.load_verify_locations(cert)
        context.load_cert_chain(cert, private)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"{cert}: not a usable TLS certificate and key ({getattr(e, 'reason', None) or e})") from None
    return context
