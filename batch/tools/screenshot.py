"""`make screenshot`: the page at / in Debian's chromium (Playwright, as tests/test_page.py drives it),
written to a PNG for the README. Runs the batch job first when the store has no snapshot yet.

    python -m batch.tools.screenshot [--config FILE] [--out docs/page.png]
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import click

from batch.tools.demo import ApiServer
from serving.cli import CONTEXT_SETTINGS, config_line, config_option, run_cli
from serving.errors import ConfigError
from serving.settings import load_settings
from serving.store import Store


def shoot(base: str, store: Store, out: Path, width: int = 1280) -> None:
    """Open the page on a popular item, a user, a two-item session and the first model's form."""
    from playwright.sync_api import sync_playwright  # a dev dependency: only this tool needs it

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise ConfigError("no chromium on PATH: make test-tools installs Debian's")
    sid = store.current_id()
    sim = store.read_table(sid, "similar_items").to_pandas()
    recs = store.read_table(sid, "user_recs").to_pandas()
    item = int(sim.item_id.iloc[0])
    a, b = (int(x) for x in sim.neighbor_ids.iloc[0][:2])
    word = str(store.read_table(sid, "items").to_pandas().set_index("item_id").loc[item, "title"]).split()[0]
    url = f"{base}/?q={word.lower()}&item={item}&user={int(recs.user_id.iloc[0])}&session={a},{b}"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.goto(url)
            for list_id in ("similar", "recs", "session-recs", "search-results"):
                page.locator(f"#{list_id} li").first.wait_for()
            page.locator("#model-inputs > div").first.wait_for()
            # a valid input for the form: each empty required number at its minimum (or 1)
            page.evaluate("""() => { for (const f of document.querySelectorAll('#model-inputs input[type=number]'))
                if (f.value === '' && !f.placeholder) f.value = f.min || '1'; }""")
            page.locator("#model-form button").click()
            page.wait_for_function("document.querySelector('#model-answer').textContent !== ''"
                                   " || document.querySelector('#model-meta .error') !== null")
            page.locator("#live-table tbody tr").first.wait_for()
            page.wait_for_timeout(300)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()


@click.command(context_settings=CONTEXT_SETTINGS)
@config_option
@click.option("--out", type=click.Path(dir_okay=False), default="docs/page.png", show_default=True)
def main(config: str | None, out: str) -> None:
    """Write a screenshot of the page at / served from the configured store."""
    settings = load_settings(config)
    click.echo(config_line(config, settings))
    store = Store(settings["paths.store"])
    if store.current_id() is None:
        from batch.job import run
        click.echo(f"no snapshot in {settings['paths.store']}: running the batch job first")
        run(settings)
    with ApiServer(Path(config) if config else None, workers=1) as server:
        shoot(server.base, store, Path(out))
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(run_cli(main, prog_name="python -m batch.tools.screenshot"))
