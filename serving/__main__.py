"""`python -m serving`: the development server (use `make serve` for the production server, granian)."""
from __future__ import annotations

import argparse
import logging
import sys

from serving.errors import ConfigError
from serving.settings import load_settings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serving", description="hybridserve development server")
    ap.add_argument("--config", default=None, help="config file (TOML)")
    ap.add_argument("--port", type=int, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 1
    from serving.web.app import create_app
    app = create_app(settings)
    app.run(host=settings["serving.host"], port=args.port or settings["serving.port"], threaded=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
