"""`python -m batch`: the batch CLI. Parses, calls the library; serving.cli turns domain errors into
one line and an exit code an operator can act on: 0 ok, 1 failed, 3 refused by validation, 75 locked.
A run whose snapshot was published exits 0 even when the catalog update after it failed (a warning
line says so; the record is added by the next run)."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from serving.cli import CONTEXT_SETTINGS, config_line, config_option, run_cli
from serving.errors import HybridServeError
from serving.settings import load_settings

LOG = logging.getLogger("batch")


class _Ctx:
    def __init__(self, config: str | None):
        self.config = config
        self._settings = None

    @property
    def settings(self):
        if self._settings is None:
            self._settings = load_settings(self.config)
        return self._settings


@click.group(context_settings=CONTEXT_SETTINGS)
@config_option
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.pass_context
def cli(ctx: click.Context, config: str | None, verbose: int) -> None:
    """hybridserve batch: precompute what is popular into a versioned snapshot."""
    logging.basicConfig(level=logging.WARNING - 10 * min(verbose, 2),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    ctx.obj = _Ctx(config)


@cli.command("generate-sample")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Folder (default: paths.inputs).")
@click.option("--if-missing", is_flag=True, help="Do nothing when the sample exists already.")
@click.pass_obj
def generate_sample_cmd(obj: _Ctx, out: str | None, if_missing: bool) -> None:
    """Write the seeded sample (users, items, interactions) as Parquet, and its demand model."""
    from batch.inputs import INTERACTIONS, ITEMS, generate_sample, load_inputs, write_inputs
    from batch.sample_models import DEMAND_FILE, ensure_sample_models, write_demand_model
    s = obj.settings
    folder = Path(out or s["paths.inputs"])
    if if_missing and (folder / INTERACTIONS).is_file() and (folder / ITEMS).is_file():
        click.echo(f"sample exists in {folder}")
        inputs = load_inputs(folder, s["train.rating_min"], s["train.rating_max"])
        for path in ensure_sample_models(s, inputs.interactions, inputs.items, s["sample.seed"]):
            click.echo(f"wrote the demand model to {path}")
        return
    inter, items = generate_sample(s["sample.users"], s["sample.items"], s["sample.interactions"],
                                   s["sample.genres"], s["sample.days"], s["sample.seed"])
    write_inputs(folder, inter, items)
    click.echo(f"wrote {len(inter):,} interactions, {len(items):,} items, "
               f"{inter['user_id'].nunique():,} users to {folder}")
    written = ensure_sample_models(s, inter, items, s["sample.seed"])
    if not (folder / DEMAND_FILE).is_file():  # beside the sample even when no config registers it
        written.append(write_demand_model(folder, inter, items, s["sample.seed"]))
    for path in written:
        click.echo(f"wrote the demand model (registered in config/default.toml) to {path}")


@cli.command("import-movielens")
@click.argument("path", type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), default="data/movielens", show_default=True)
def import_movielens_cmd(path: str, out: str) -> None:
    """Convert a MovieLens folder (100K layout or CSV layout, detected) into input Parquet."""
    from batch.inputs import detect_movielens, read_movielens, write_inputs
    layout = detect_movielens(Path(path))
    inter, items = read_movielens(Path(path))
    write_inputs(Path(out), inter, items)
    click.echo(f"{layout} layout: {len(inter):,} ratings, {inter['user_id'].nunique():,} users, "
               f"{len(items):,} items -> {out} (set paths.inputs = \"{out}\")")


@cli.command()
@click.pass_obj
def train(obj: _Ctx) -> None:
    """Train and evaluate the model; cache it in the store for the next run."""
    from batch.inputs import load_inputs
    from batch.job import obtain_model
    from serving.store import Store
    s = obj.settings
    store = Store(s["paths.store"])
    store.ensure_layout()
    inputs = load_inputs(Path(s["paths.inputs"]), s["train.rating_min"], s["train.rating_max"])
    lock = store.lock()
    try:
        trained = obtain_model(store, inputs, s, retrain=True)
    finally:
        lock.release()
    bundle = trained.bundle
    click.echo(f"model {bundle.model_version}: {bundle.n_users:,} users, {bundle.n_items:,} items, "
               f"index {bundle.meta['index']}")
    _print_evaluation(trained.evaluation)


def _print_evaluation(ev: dict) -> None:
    if not ev or ev.get("recall_at_10") is None:
        return
    rmse = (f"RMSE model {ev['rmse_model']:.4f} vs item-mean {ev['rmse_item_mean']:.4f}; "
            if ev.get("rmse_model") is not None else "")
    click.echo(f"hold-out ({ev['test_rows_scored']:,} of {ev['test_rows']:,} ratings scored): {rmse}"
               f"recall@10 model {ev['recall_at_10']:.4f} vs most-popular {ev['recall_at_10_popular']:.4f}, "
               f"NDCG@10 {ev['ndcg_at_10']:.4f} vs {ev['ndcg_at_10_popular']:.4f} ({ev['eval_users']} users)")


@cli.command()
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write the report as JSON here (default: <paths.store>/evaluation.json).")
@click.option("--folds", default=5, show_default=True, type=click.IntRange(2, 20), help="Folds of the RMSE protocol.")
@click.pass_obj
def evaluate(obj: _Ctx, out: str | None, folds: int) -> None:
    """Score the recommender and the rating model on paths.inputs against baselines (both protocols)."""
    from batch.catalog import format_table
    from batch.evaluate import evaluate as run_evaluation
    from batch.evaluate import table_rows
    from batch.inputs import load_inputs
    from batch.job import supplied_vectors
    s = obj.settings
    inputs = load_inputs(Path(s["paths.inputs"]), s["train.rating_min"], s["train.rating_max"])
    report = run_evaluation(inputs.interactions, inputs.items, s, supplied_vectors(inputs, s), folds)
    report["inputs"] = str(inputs.folder)
    path = Path(out) if out else Path(s["paths.store"]) / "evaluation.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(path)
    rk = report["ranking"]
    click.echo(f"{report['interactions']:,} interactions, {report['users']:,} users, {report['items']:,} items "
               f"({inputs.folder})")
    click.echo(f"ranking: {rk['protocol']}; {rk['users']:,} users scored")
    click.echo(f"rating: {report['rating']['protocol']}")
    click.echo(format_table(*table_rows(report)))
    sim = report["similar_items"]
    click.echo(f"similar items: {sim['rare_neighbours']} of {sim['neighbours']} top-{10} neighbours of "
               + ", ".join(r["title"] for r in sim["items"]) + f" have fewer than {sim['rare_below']} ratings")
    click.echo(f"report: {path}")


@cli.command()
@click.option("--retrain", is_flag=True, help="Train even if the inputs are unchanged, and choose the method (train.method auto) again.")
@click.option("--force", is_flag=True, help="Publish even if row counts fell past batch.max_row_drop, or the "
              "config does not register a model the live snapshot serves (it is dropped).")
@click.option("--progress/--no-progress", default=None,
              help="A line per stage and bars on stderr [default: when stderr is a terminal].")
@click.pass_obj
def run(obj: _Ctx, retrain: bool, force: bool, progress: bool | None) -> None:
    """The whole job: inputs -> model -> popular keys -> precompute -> validate -> publish."""
    from batch.job import run as run_job
    settings = obj.settings
    click.echo(config_line(obj.config, settings))
    if progress is None:
        progress = sys.stderr.isatty()
    result = run_job(settings, retrain=retrain, force=force,
                     progress=(lambda line: click.echo(line, err=True)) if progress else None)
    m = result.manifest
    click.echo(f"published snapshot {result.snapshot_id} (model {m['model_version']}, "
               f"{'retrained' if m['retrained'] else 'model reused'})")
    click.echo("rows: " + ", ".join(f"{k} {v:,}" for k, v in m["row_counts"].items()))
    method = (m.get("evaluation") or {}).get("method") or {}
    if method.get("method"):
        how = {"setting": "pinned by train.method", "default": "the default (nothing to validate on)"}.get(
            method.get("chosen_by"), "the earlier choice on validation, reused" if method.get("reused")
            else "chosen on validation in this training")
        click.echo(f"method: {method['method']} ({how})")
    registered = _model_rows(m)
    if registered:
        click.echo("registered models: " + ", ".join(f"{k} {v:,} rows" for k, v in registered.items()))
    click.echo(f"expected hit rate on the selection window: {m['popularity']['expected_hit_rate']:.3f}")
    damaged = m.get("request_log", {}).get("damaged")
    if damaged:
        click.echo(f"request log: {m['request_log']['segments']:,} segments read; {len(damaged)} damaged segment"
                   f"{'s' if len(damaged) > 1 else ''} skipped (moved to requests/quarantine/): {', '.join(damaged)}")
    _print_evaluation(m.get("evaluation"))
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if not result.catalog_updated:
        # Exit 0 all the same: the snapshot is live; only the record of it is late.
        click.echo(f"warning: catalog not updated ({result.catalog_error}): the snapshot is published; "
                   f"the next run adds its record to the catalog", err=True)


def _model_rows(manifest: dict) -> dict[str, int]:
    """Rows precomputed per registered model (the rating model's are ``predictions`` in row_counts)."""
    from serving.store import layout
    return {name: int(entry.get("rows") or 0) for name, entry in (manifest.get("models") or {}).items()
            if name != layout.RATING and isinstance(entry, dict)}


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def snapshots(obj: _Ctx, as_json: bool) -> None:
    """List retained snapshots (* marks CURRENT)."""
    from serving.store import Store
    rows = Store(obj.settings["paths.store"]).list_snapshots()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no snapshots")
    for r in rows:
        counts = ", ".join(f"{k}={v}" for k, v in {**r.get("rows", {}), **r.get("models", {})}.items())
        click.echo(f"{'*' if r['current'] else ' '} {r['id']}  model {r.get('model_version')}  {counts}"
                   + (f"  ERROR {r['error']}" if "error" in r else ""))


@cli.command()
@click.argument("snapshot_id", required=False)
@click.pass_obj
def rollback(obj: _Ctx, snapshot_id: str | None) -> None:
    """Move CURRENT to SNAPSHOT_ID (default: the snapshot before CURRENT)."""
    from batch.catalog import refresh_views
    from serving.store import Store
    store = Store(obj.settings["paths.store"])
    lock = store.lock()
    try:
        target = store.rollback(snapshot_id)
    finally:
        lock.release()
    refresh_views(store)
    click.echo(f"CURRENT -> {target}")


@cli.command()
@click.argument("query")
@click.option("--max-rows", type=click.IntRange(min=1), default=None,
              help="Rows printed at most [default: batch.sql_max_rows].")
@click.option("--time-limit-ms", type=click.IntRange(min=1), default=None,
              help="Interrupt the query after this long [default: batch.sql_time_limit_ms].")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True,
              help="A text table, CSV with a header row, or a JSON array of objects (both written as the rows "
                   "stream in).")
@click.option("--max-width", type=click.IntRange(min=0), default=None,
              help="Cut table cells longer than this (0: never) [default: 80 in a terminal, never otherwise].")
@click.pass_obj
def sql(obj: _Ctx, query: str, max_rows: int | None, time_limit_ms: int | None, fmt: str,
        max_width: int | None) -> None:
    """Run one reading SQL statement against the store's DuckDB catalog and print it.

    Read-only at the engine level: no COPY, ATTACH, EXPORT, INSTALL/LOAD or SET, and no file outside
    the store's snapshots/ and requests/ folders; a refused statement is one line and exit 1."""
    from batch.catalog import format_table
    from batch.catalog import query as run_query
    from batch.sqlout import StreamWriter
    from serving.store import Store
    s = obj.settings
    max_rows = max_rows or s["batch.sql_max_rows"]
    store = Store(s["paths.store"])
    out = sys.stdout
    writer = StreamWriter(fmt, out) if fmt != "table" else None
    try:
        cols, rows, truncated = run_query(store, query, max_rows, time_limit_ms or s["batch.sql_time_limit_ms"],
                                          sink=writer.rows if writer else None)
    except FileNotFoundError:
        raise HybridServeError(f"{store.catalog_path}: no catalog yet (run `python -m batch run` first)") from None
    if writer is not None:
        writer.close(cols)
    else:
        width = max_width if max_width is not None else (80 if out.isatty() else 0)
        click.echo(format_table(cols, rows, width or None))
    if truncated:
        click.echo(f"(truncated: the first {max_rows} rows are shown; --max-rows for more)",
                   err=writer is not None)


@cli.command()
@click.pass_obj
def schedule(obj: _Ctx) -> None:
    """Run the job on batch.schedule until SIGTERM/SIGINT (APScheduler; one run at a time)."""
    from batch.schedule import Daemon
    logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    settings = obj.settings
    LOG.info("%s", config_line(obj.config, settings))
    Daemon(settings).serve()


@cli.command()
@click.option("--requests", default=3000, show_default=True, help="GET requests per replay.")
@click.option("--concurrency", default=6, show_default=True,
              help="Requests in flight at once (the default, serving.live_max_waiting, keeps any live miss from being "
                   "refused as busy whichever worker its connection lands on).")
@click.pass_obj
def demo(obj: _Ctx, requests: int, concurrency: int) -> None:
    """The whole loop on the sample: batch, the API server, replay, batch again, replay, SQL."""
    from batch.tools.demo import demo as run_demo
    run_demo(obj.settings, Path(obj.config) if obj.config else None, requests, concurrency)


def main(argv: list[str] | None = None) -> int:
    return run_cli(cli, argv, prog_name="python -m batch")


if __name__ == "__main__":
    sys.exit(main())
