"""`make demo` end to end, at a tiny size: the hit rate on a fresh trace rises after the closed loop."""
from batch.demo import demo


def test_demo_closes_the_loop(workspace, tmp_path):
    root, settings, cfg, _ = workspace
    cfg.write_text(cfg.read_text() + "[serving]\nworkers = 1\n")
    lines = []
    result = demo(settings.replace(serving__workers=1), cfg, requests=400, concurrency=4, echo=lines.append)
    text = "\n".join(lines)
    assert result["second"] != result["first"]
    assert result["after"] > result["before"]
    for step in ("1. batch run", "3. replayed 400", "4. batch run again", "5. replayed", "6. SQL", "server stopped"):
        assert step in text
    assert "| similar_items | precomputed |" in text
