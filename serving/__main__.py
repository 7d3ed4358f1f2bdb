"""`python -m serving`: the development server (use `make serve` for the production server, granian)."""
from __future__ import annotations

import logging
import sys

import click

from serving.cli import CONTEXT_SETTINGS, config_line, config_option, run_cli
from serving.settings import load_settings

LOG = logging.getLogger("serving")


@click.command(context_settings=CONTEXT_SETTINGS)
@config_option
@click.option("--port", type=int, default=None, help="Overrides serving.port.")
def cli(config: str | None, port: int | None) -> int:
    """hybridserve development server"""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    settings = load_settings(config)
    LOG.info("%s", config_line(config, settings))
    from serving.web.app import create_app
    app = create_app(settings)
    app.run(host=settings["serving.host"], port=port or settings["serving.port"], threaded=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(cli, argv, prog_name="python -m serving")


if __name__ == "__main__":
    sys.exit(main())
