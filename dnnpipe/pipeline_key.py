"""The link secrets as a board reads them: the pipeline key and the pipeline certificate beside manifest.json.

One random 32-byte key per partition output, readable by its owner only. Stages and the controller
authenticate each link with it (dnnpipe.runtime.transport); see docs/security.md for what it protects.
Links also run inside mutual TLS by default (--no-tls turns it off), both ends pinning one certificate
beside the key (pipeline.crt). Making them is the workstation's job (dnnpipe.keygen), never shipped to a board.
"""

from __future__ import annotations

import ssl
import stat
from pathlib import Path
from typing import Optional

from .errors import ConfigError

KEY_FILE = "pipeline.key"
KEY_BYTES = 32
CERT_FILE = "pipeline.crt"  # TLS: self-signed, the same on every device
CERT_KEY_FILE = "pipeline.crt.key"  # its private key, mode 0600


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


def tls_context(folder: Path, server_side: bool) -> ssl.SSLContext:
    """One end of a TLS link: it presents the pipeline certificate and accepts only a peer presenting it too.

    Serve's controller and the device agents wrap their links with these contexts too (`link_tls`)."""
    cert, private = folder / CERT_FILE, folder / CERT_KEY_FILE
    for path in (cert, private):
        if not path.is_file():
            raise ConfigError(f"{path}: TLS certificate not found (re-run the partitioner or the deployer on a "
                              f"machine with openssl, or run every stage with --no-tls)")
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


def link_tls(folder: Path, tls: bool = True) -> tuple[Optional[ssl.SSLContext], Optional[ssl.SSLContext]]:
    """Both ends' TLS contexts for the links of the pipeline in folder: (listening, connecting); (None, None)
    with tls=False (--no-tls or --insecure). Read once, used for every link of a process."""
    if not tls:
        return None, None
    return tls_context(folder, server_side=True), tls_context(folder, server_side=False)
