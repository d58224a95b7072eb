"""`python -m dnnpipe service`: a partitioned model served over OIP v2 by the single-device backend, and the
--http/--grpc arguments `serve --http`/`serve --grpc` share."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..console import positive_float, positive_int
from .options import ServiceOptions


def http_address(text: str) -> tuple[str, int]:
    """argparse type: HOST:PORT, [IPv6]:PORT; port 0 takes any free port."""
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:([0-9]{1,5})|([A-Za-z0-9.-]+):([0-9]{1,5})", text.strip())
    if not match or int(match[2] or match[4]) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, e.g. 127.0.0.1:8000, got {text!r}")
    return (match[1] or match[3]), int(match[2] or match[4])


def add_http_arguments(parser: argparse.ArgumentParser, default: str | None = "127.0.0.1:8000") -> None:
    """The service's flags; `default` is --http's address when neither --http nor --grpc is given."""
    parser.set_defaults(http_default=http_address(default) if default else None)
    parser.add_argument("--http", type=http_address, metavar="HOST:PORT", help="serve the Open Inference Protocol "
                        "(REST) here " + (f"(default {default} unless --grpc is given)" if default else
                                          "(the inference service: requests instead of files)"))
    parser.add_argument("--grpc", type=http_address, metavar="HOST:PORT",
                        help="serve the Open Inference Protocol's gRPC side here (with or without --http; the same "
                             "token, TLS, queue and limits)")
    parser.add_argument("--request-timeout", type=positive_float, default=30.0,
                        help="a request not answered this long gets a 504, s (default 30)")
    parser.add_argument("--http-token-file", type=Path,
                        help="file holding the bearer token every request but health checks must carry")
    parser.add_argument("--http-insecure", action="store_true",
                        help="allow a non-loopback --http address without a token")
    parser.add_argument("--http-tls-cert", type=Path, help="PEM certificate: serve HTTPS")
    parser.add_argument("--http-tls-key", type=Path, help="PEM private key of --http-tls-cert")
    parser.add_argument("--queue-size", type=positive_int, default=64,
                        help="inputs accepted and not yet answered, at most; beyond: 503 (default 64)")
    parser.add_argument("--max-batch", type=positive_int, default=32, help="largest batch per request (default 32)")


def live(args: argparse.Namespace) -> bool:
    """Whether the service is asked for: an address for either front door, or --http's default."""
    return args.http is not None or args.grpc is not None or args.http_default is not None


def http_options(args: argparse.Namespace, model_name: str) -> ServiceOptions:
    address = args.http or (args.http_default if args.grpc is None else None)
    host, port = address or ("127.0.0.1", 0)
    grpc_host, grpc_port = args.grpc or (None, 0)
    return ServiceOptions(model_name=model_name, host=host, port=port, http=address is not None,
                          grpc_host=grpc_host, grpc_port=grpc_port, request_timeout=args.request_timeout,
                          token_file=args.http_token_file, insecure=args.http_insecure, tls_cert=args.http_tls_cert,
                          tls_key=args.http_tls_key, queue_size=args.queue_size, max_batch=args.max_batch)


def add_service_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model-path", type=Path, required=True, help="folder holding NAME/manifest.json")
    parser.add_argument("--model-name", required=True, help="model name (sub-folder of --model-path)")
    parser.add_argument("--num-threads", type=positive_int, help="interpreter threads (default: its own)")
    add_http_arguments(parser)
    return parser


def service_command(args: argparse.Namespace) -> int:
    from .backend import SingleDevice  # the interpreter and prometheus_client only when serving
    from .service import run_service

    backend = SingleDevice(args.model_path / args.model_name, args.num_threads)
    manifest = backend.manifest
    return run_service(http_options(args, args.model_name), backend, manifest.inputs, manifest.outputs,
                       echo=lambda text: print(text, flush=True))
