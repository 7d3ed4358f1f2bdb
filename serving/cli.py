"""What the command lines share (`python -m batch`, `python -m serving.server`, `python -m serving`):
one table from exception to exit code and one-line message, the runner that applies it, and the
line that says which config a command uses.

Which config wins, in every command: an explicit ``--config FILE``, else ``$HYBRIDSERVE_CONFIG``,
else the built-in defaults; ``HYBRIDSERVE_<SECTION>_<NAME>`` variables override single settings of
whichever it is (serving.settings.load_settings).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import click

from serving.errors import (Abandoned, ConfigError, HybridServeError, PortTaken, StoreLockedError,
                            ValidationFailed)
from serving.settings import DEFAULTS_SOURCE, ENV_FILE, ENV_NOT_SETTINGS, ENV_PREFIX, Settings

LOG = logging.getLogger(__name__)

# What every command shares on its command line: -h as well as --help, and one --config option.
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}
config_option = click.option(
    "--config", "config", type=click.Path(dir_okay=False), default=None, metavar="FILE",
    help="Config file (TOML); default $HYBRIDSERVE_CONFIG, else the built-in defaults.")

EXIT_OK = 0
EXIT_FAILED = 1          # one line on stderr says what (the traceback with -v)
EXIT_USAGE = 2           # a bad command line (click's own), or an address the server cannot listen on
EXIT_REFUSED = 3         # a snapshot refused by validation; the live one keeps serving
EXIT_LOCKED = 75         # another run holds the store lock (EX_TEMPFAIL: try again later)

# (exception, exit code, what the one line on stderr starts with). The first row the exception is an
# instance of wins, so a subclass comes before its base. The codes are the documented ones
# (docs/batch.md, docs/server.md).
EXIT_CODES: tuple[tuple[type[BaseException], int, str], ...] = (
    (StoreLockedError, EXIT_LOCKED, "locked"),
    (ValidationFailed, EXIT_REFUSED, "refused"),
    (Abandoned, EXIT_FAILED, "abandoned"),
    (ConfigError, EXIT_FAILED, "config error"),
    (PortTaken, EXIT_USAGE, "hybridserve"),
    (HybridServeError, EXIT_FAILED, "error"),
    (OSError, EXIT_FAILED, "error"),  # a full or read-only disk, a missing permission
)


def exit_code(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, the one line for stderr) for ``exc``, or None when the table does not know it."""
    for kind, code, prefix in EXIT_CODES:
        if isinstance(exc, kind):
            if isinstance(exc, OSError):
                from serving.store import describe_os_error  # the path and the errno's meaning
                return code, f"{prefix}: {describe_os_error(exc)}"
            return code, f"{prefix}: {exc}"
    return None


def run_cli(command: click.Command, argv: Sequence[str] | None = None, prog_name: str | None = None) -> int:
    """Run a click command and return its exit code instead of exiting: click's own errors as click
    shows them, a known exception as one line on stderr (the table above), anything else raised."""
    try:
        result = command.main(args=list(argv) if argv is not None else None, prog_name=prog_name,
                              standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return EXIT_FAILED
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except Exception as exc:
        known = exit_code(exc)
        if known is None:
            raise
        if isinstance(exc, OSError):  # a domain error's line says it all; an OS error's origin may not
            LOG.info("details of the error below", exc_info=exc)  # the traceback, with -v
        click.echo(known[1], err=True)
        return known[0]
    return result if isinstance(result, int) else EXIT_OK


def config_line(flag: str | os.PathLike | None, settings: Settings, env: Mapping[str, str] | None = None) -> str:
    """Which config a command uses and why, in one line ("config: my.toml (--config)")."""
    env = os.environ if env is None else env
    if flag:
        where = f"{flag} (--config)"
    elif settings.source != DEFAULTS_SOURCE:
        where = f"{settings.source} (${ENV_FILE})"
    else:
        where = f"built-in defaults (no --config, ${ENV_FILE} unset)"
    overrides = sorted(v for v in env if v.startswith(ENV_PREFIX) and v not in ENV_NOT_SETTINGS)
    return f"config: {where}" + (f"; overridden by {', '.join(overrides)}" if overrides else "")
