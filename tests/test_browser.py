"""Every HTML page bnkit writes, loaded in a real headless browser (Debian's chromium through
chromium-driver, driven by Selenium): the atlas (`bnkit report`), each experiment's report.html (tiny real
runs of fig1 and of a claims experiment), the suite's index (`bnkit run all`) and the BN doctor's page.
Each page must load without console errors and without any request but its own file and data: URIs;
every image must decode (complete, naturalWidth > 0); its tables must be there, with one checks row per
check of metrics.json. A full-page screenshot of each is kept in ``$BNKIT_TEST_ARTIFACTS`` (default
``.artifacts/``)/browser. A deliberately leaky page checks that the checker itself catches each fault.

Without chromium, chromedriver or selenium these tests skip (``make browser`` installs the first two),
except under CI (``$CI`` set), where they fail, so a missing install step cannot pass unnoticed."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("BNKIT_TEST_ARTIFACTS") or ROOT / ".artifacts") / "browser"
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--disable-extensions", "--hide-scrollbars", "--window-size=1280,1000")
WIDTH = 1280
MAX_SHOT_HEIGHT = 12000  # pixels: long pages are cut there


def _find(env: str, *names: str):
    if os.environ.get(env):
        return os.environ[env] if Path(os.environ[env]).is_file() else None
    return next((p for p in map(shutil.which, names) if p), None)


def _need_browser():
    """(chromium, chromedriver); skips (fails under CI) when either, or selenium, is missing."""
    browser = _find("BNKIT_CHROMIUM", "chromium", "chromium-browser")
    driver = _find("BNKIT_CHROMEDRIVER", "chromedriver")
    missing = [n for n, p in (("chromium", browser), ("chromedriver", driver)) if p is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (the dev extra)")
    if missing:
        msg = (f"browser tests need {', '.join(missing)}: `make browser` installs Debian's chromium and "
               f"chromium-driver (or set BNKIT_CHROMIUM / BNKIT_CHROMEDRIVER)")
        if os.environ.get("CI"):
            pytest.fail(msg + "; under CI they must run", pytrace=False)
        pytest.skip(msg)
    return browser, driver


@pytest.fixture(scope="module")
def driver():
    browser, chromedriver = _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="bnkit-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for f in FLAGS + (f"--user-data-dir={profile}",):
        opts.add_argument(f)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    # an explicit driver path: Selenium Manager (which may download drivers) is never consulted
    d = webdriver.Chrome(service=Service(chromedriver), options=opts)
    d.set_page_load_timeout(60)
    try:
        yield d
    finally:
        d.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A runs directory as a user has it: two tiny real experiments (one nested like `bnkit run all`), an
    unfinished and a damaged directory, and the atlas over them."""
    from bnkit import cli
    from bnkit.experiments.registry import run_experiment

    runs = tmp_path_factory.mktemp("site") / "runs"
    run_experiment("fig1", dict(steps=20, eval_every=10, seeds=[0], probe_size=100), out=runs / "fig1-tiny",
                   quiet=True)
    run_experiment("lr", dict(steps=12, eval_every=6, lrs=[0.1, 1.0], seeds=[0]), out=runs / "all-tiny" / "lr",
                   quiet=True)
    (runs / "fig1-cut").mkdir()
    (runs / "fig1-cut" / "config.json").write_text("{}")
    (runs / "lr-damaged").mkdir()
    (runs / "lr-damaged" / "config.json").write_text("{}")
    (runs / "lr-damaged" / "metrics.json").write_text("{\"experiment\": ")
    assert cli.main(["report", str(runs)]) == 0
    return runs


def _drain(d) -> None:
    d.get("about:blank")
    d.get_log("browser")
    d.get_log("performance")


def _load(d, path: Path, shot: str):
    """Load ``path``; returns (problems, the page's URL). Checks the console, the requests, the images;
    saves a full-page screenshot to ARTIFACTS/shot."""
    from selenium.webdriver.support.ui import WebDriverWait

    _drain(d)
    url = Path(path).resolve().as_uri()
    d.get(url)
    WebDriverWait(d, 30).until(lambda d: d.execute_script(
        "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"))
    problems = []
    for e in d.get_log("browser"):
        if e.get("level") == "SEVERE" or "Content Security Policy" in e.get("message", ""):
            problems.append(f"console {e.get('level')}: {e.get('message')}")
    ours, failed = [], []
    for e in d.get_log("performance"):
        m = json.loads(e["message"])["message"]
        p = m.get("params", {})
        if m.get("method") == "Network.requestWillBeSent":
            req = p.get("request", {}).get("url", "")
            if p.get("documentURL", "").startswith("file:") or req.startswith("file:"):
                ours.append(req)
        elif m.get("method") == "Network.loadingFailed" and not p.get("canceled"):
            failed.append(p.get("errorText"))
    if url not in ours:  # the log must see the page itself, or "no other request" would prove nothing
        problems.append(f"the performance log did not record the page's own request ({ours[:3]})")
    problems += [f"request: {u[:100]}" for u in ours if u != url and not u.startswith("data:")]
    problems += [f"failed load: {t}" for t in failed if t]
    for src, complete, w in d.execute_script(
            "return Array.from(document.images).map(i => [i.src.slice(0, 60), i.complete, i.naturalWidth])"):
        if not complete or w <= 0:
            problems.append(f"image does not decode: {src}")
    # a full-page screenshot, kept as a test artifact
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    height = d.execute_script("return document.documentElement.scrollHeight")
    d.set_window_size(WIDTH, min(max(int(height), 600), MAX_SHOT_HEIGHT))
    try:
        assert d.save_screenshot(str(ARTIFACTS / f"{shot}.png"))
    finally:
        d.set_window_size(WIDTH, 1000)
    return problems, url


def _tables(d):
    """Per table: its class and the number of body rows (rows with a <td>)."""
    return d.execute_script(
        "return Array.from(document.querySelectorAll('table')).map(t => [t.className, "
        "Array.from(t.querySelectorAll('tr')).filter(r => r.querySelector('td')).length])")


def _shot_ok(name: str) -> None:
    from PIL import Image
    with Image.open(ARTIFACTS / f"{name}.png") as im:
        assert im.width >= WIDTH // 2 and im.height >= 300  # the whole page, not an empty capture


def test_atlas_page(driver, site):
    problems, _ = _load(driver, site / "index.html", "atlas")
    assert problems == []
    _shot_ok("atlas")
    cards = driver.execute_script(
        "return Array.from(document.querySelectorAll('section.run')).map(s => ["
        "s.querySelector('h3 a').getAttribute('href'), "
        "s.querySelectorAll('table.checks tbody tr').length, s.querySelectorAll('img').length, "
        "Array.from(s.querySelectorAll('table.checks tbody tr td:nth-child(2)')).map(td => td.textContent)])")
    assert len(cards) == 2
    for href, n_rows, n_img, results in cards:
        d = (site / unquote(href)).parent
        checks = json.loads((d / "metrics.json").read_text())["summary"]["checks"]
        assert n_rows == len(checks) and n_img == 1
        assert results == ["PASS" if c["pass"] else "FAIL" for c in checks.values()]
    tables = _tables(driver)
    assert ["toc", 2] in tables and ["others", 2] in tables and sum(t[0] == "meta" for t in tables) == 2

    # the links work in the browser: following one opens that run's report
    href = cards[0][0]
    driver.find_element("css selector", f"section.run h3 a[href='{href}']").click()
    assert unquote(urlparse(driver.current_url).path) == str((site / unquote(href)).resolve())
    from bnkit.experiments.registry import EXPERIMENTS
    exp = json.loads(((site / unquote(href)).parent / "metrics.json").read_text())["experiment"]
    assert driver.title == EXPERIMENTS[exp].title


@pytest.mark.parametrize("run", ["fig1-tiny", "all-tiny/lr"])
def test_experiment_report_page(driver, site, run):
    problems, _ = _load(driver, site / run / "report.html", f"report-{run.replace('/', '-')}")
    assert problems == []
    _shot_ok(f"report-{run.replace('/', '-')}")
    m = json.loads((site / run / "metrics.json").read_text())
    n_img = driver.execute_script("return document.images.length")
    assert n_img == 1
    rows = dict((c, n) for c, n in _tables(driver) if c)
    assert rows["checks"] == len(m["summary"]["checks"])
    assert len(_tables(driver)) >= 4  # checks, summary or runs, settings, dataset, environment
    heads = driver.execute_script("return Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
    assert {"Figure", "Checks", "Settings", "Dataset provenance"} <= set(heads)


def test_suite_index_page(driver, site, tmp_path):
    """`bnkit run all`'s index.html (rendered here over the tiny runs, as run_all does)."""
    from bnkit.experiments.suite import render_index

    entries = []
    for run in ("fig1-tiny", "all-tiny/lr"):
        m = json.loads((site / run / "metrics.json").read_text())
        entries.append({"experiment": m["experiment"], "title": m["experiment"], "report": f"{run}/report.html",
                        "checks": {k: bool(c["pass"]) for k, c in m["summary"]["checks"].items()},
                        "wall_seconds": m["wall_seconds_this_call"]})
    page = site / "suite-index.html"
    page.write_text(render_index({"out_dir": str(site), "experiments": entries, "written": "now"}))
    problems, _ = _load(driver, page, "suite-index")
    assert problems == []
    assert _tables(driver) == [["", 2]]
    hrefs = driver.execute_script("return Array.from(document.links).map(a => a.href)")
    assert len(hrefs) == 2 and all(Path(unquote(urlparse(h).path)).is_file() for h in hrefs)


def test_doctor_page(driver, tmp_path):
    """`bnkit inspect --html`: the BN doctor's page (inline SVG, tables)."""
    import torch
    from torch import nn

    import bnkit

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4), nn.BatchNorm1d(4))
    model.train()
    for _ in range(3):
        model(torch.randn(16, 6))
    model.eval()
    page = bnkit.inspect(model, [torch.randn(16, 6) * 3 + 1]).write_html(tmp_path / "doctor.html")
    problems, _ = _load(driver, page, "doctor")
    assert problems == []
    assert driver.execute_script("return document.querySelectorAll('svg').length") >= 1
    assert any(n > 0 for _, n in _tables(driver))


def test_the_checker_catches_a_leaky_page(driver, tmp_path):
    """The checks above can fail: a page with a network image, an undecodable image and a console error
    yields one problem for each."""
    page = tmp_path / "leaky.html"
    page.write_text("<!DOCTYPE html><html><head><title>leaky</title></head><body>"
                    "<img src=\"http://127.0.0.1:9/nothing.png\">"  # the discard port: refused, never sent out
                    "<img src=\"data:image/png;base64,iVBORw0KGgoAAAAN\">"
                    "<script>console.error('boom')</script></body></html>")
    problems, _ = _load(driver, page, "leaky")
    assert any(p.startswith("request: http://127.0.0.1:9/nothing.png") for p in problems), problems
    assert sum(p.startswith("image does not decode") for p in problems) == 2, problems
    assert any("boom" in p for p in problems), problems
