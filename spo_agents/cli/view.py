"""`spo-agent view`: a local web viewer of runs and evaluations (`spo_agents.view`).

spo-agent view RUN_DIR|EVAL_DIR [...] [--port 8765] [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse
import sys


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "view",
        help="browse runs and evaluations in a local web viewer",
        description="Serve a local web viewer of training runs (metric curves, the tracker's problems, saved "
        "training trajectories) and eval dirs (pass@k, maj@k, answer clusters, transcripts). Several runs are "
        "compared on the same axes. Pages refresh while a run trains. Nothing is fetched from the network.",
    )
    p.add_argument("paths", nargs="+", metavar="RUN_DIR|EVAL_DIR")
    p.add_argument("--port", type=int, default=8765, help="port to listen on (default: 8765; 0 picks a free one)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; the data is not protected by a password)",
    )
    p.set_defaults(func=_view)


def _view(args: argparse.Namespace) -> int:
    from spo_agents.errors import ConfigError
    from spo_agents.view import ViewServer

    try:
        server = ViewServer(args.paths, host=args.host, port=args.port)
    except OSError as e:
        raise ConfigError(f"cannot listen on {args.host}:{args.port} ({e}); pick another `--port`") from e
    print(f"spo-agent view: {server.url}  (Ctrl-C stops it)", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return 0
