"""The atlas (`bnkit report`): which directories it indexes and how (grouping, order, checks, thumbnails,
links), damaged and unfinished directories, self-containment, and the CLI's one-line errors. The pages are
parsed with the standard library's HTMLParser; tests/test_browser.py loads them in a real browser."""
from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bnkit import cli
from bnkit.experiments import atlas
from bnkit.experiments.registry import EXPERIMENTS

ERR = re.compile(r"^bnkit report: error: ", re.M)


def _png(w=800, h=300, color=(30, 120, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def _checks(*passes):
    return {f"check_{i}": {"pass": p, "value": 0.25 * i, "per_seed": [p, True]} for i, p in enumerate(passes)}


def _fake_run(d: Path, name: str, finished: str = "2026-01-02 03:04:05 UTC", checks=None, *, figure=True,
              report=True, wall=12.5, metrics=None) -> Path:
    """An experiment directory as run_experiment leaves it (only the files the atlas reads)."""
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"data": "mnist5k", "steps": 20}))
    m = {"experiment": name, "out_dir": str(d), "config": {"steps": 20},
         "dataset": {"name": "mnist5k", "train": 4000, "test": 1000},
         "summary": {"checks": _checks(True, False) if checks is None else checks},
         "runs": {"bn-s0": {}, "baseline-s0": {}}, "finished": finished, "wall_seconds_this_call": wall}
    (d / "metrics.json").write_text(json.dumps(m if metrics is None else metrics))
    exp = EXPERIMENTS.get(name)
    if figure:
        (d / (exp.figure if exp else "figure.png")).write_bytes(_png())
    if report:
        (d / "report.html").write_text("<!DOCTYPE html><title>r</title>")
    return d


class _Page(HTMLParser):
    """The atlas page's structure: the run cards (heading, links, images, checks rows), the other tables."""

    VOID = ("meta", "img", "br", "hr", "link", "input")

    def __init__(self, text: str):
        super().__init__()
        self.stack, self.errors, self.urls, self.imgs, self.h2 = [], [], [], [], []
        self.cards, self.others, self.metas = [], [], []
        self._text = None
        self._table = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "meta" and "http-equiv" in a:
            self.metas.append((a["http-equiv"], a.get("content")))
        for k in ("src", "href"):
            if k in a:
                self.urls.append(a[k])
        if tag == "section" and "run" in a.get("class", ""):
            self.cards.append({"head": "", "links": [], "imgs": [], "checks": [], "text": ""})
        card = self.cards[-1] if self.cards and "section" in self.stack + [tag] else None
        if tag == "img":
            self.imgs.append(a.get("src", ""))
            if card is not None:
                card["imgs"].append(a.get("src", ""))
        if tag == "a" and card is not None:
            card["links"].append(a.get("href"))
        if tag == "table":
            self._table = a.get("class", "")
        if tag == "tr" and self._table in ("checks", "others"):
            row = []
            (card["checks"] if self._table == "checks" and card is not None else self.others).append(row)
        if tag == "td" and self._table in ("checks", "others"):
            tgt = card["checks"] if self._table == "checks" and card is not None else self.others
            tgt[-1].append({"class": a.get("class", ""), "text": ""})
        if tag in ("h2", "h3"):
            self._text = ""
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unbalanced </{tag}> (open: {self.stack[-3:]})")
            return
        self.stack.pop()
        if tag == "h2":
            self.h2.append(self._text.strip())
            self._text = None
        if tag == "h3" and self.cards:
            self.cards[-1]["head"] = self._text.strip()
            self._text = None
        if tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._text is not None:
            self._text += data
        if self.cards and "section" in self.stack:
            self.cards[-1]["text"] += data
        if self._table in ("checks", "others") and "td" in self.stack:
            rows = self.cards[-1]["checks"] if self._table == "checks" and self.cards and "section" in self.stack \
                else self.others
            rows[-1][-1]["text"] += data


def _tree(tmp_path):
    root = tmp_path / "runs"
    _fake_run(root / "fig1-old", "fig1", "2026-01-01 00:00:00 UTC", _checks(True, True, True))
    _fake_run(root / "fig1-new", "fig1", "2026-03-01 00:00:00 UTC", _checks(False, True))
    _fake_run(root / "all-x" / "lr", "lr", "2026-02-01 00:00:00 UTC", _checks(True))
    _fake_run(root / "all-x" / "fig1", "fig1", "2026-02-01 00:00:00 UTC", _checks(True, False, True, True))
    _fake_run(root / "gone-1", "gone", "2026-01-05 00:00:00 UTC")  # an experiment no longer registered
    return root


def test_groups_order_checks_and_links(tmp_path, capfd):
    root = _tree(tmp_path)
    assert cli.main(["report", str(root)]) == 0
    out = capfd.readouterr().out
    assert out.startswith(f"wrote {root / 'index.html'}: 5 finished experiment runs of 3 experiment(s)")
    text = (root / "index.html").read_text()
    page = _Page(text)
    assert text.startswith("<!DOCTYPE html>") and not page.errors and page.stack == []
    # grouped in the registry's order (unknown names last), newest first inside a group
    assert [h.split(" (")[0] for h in page.h2] == [EXPERIMENTS["fig1"].title, EXPERIMENTS["lr"].title, "gone"]
    heads = [c["head"].split(" ")[0] for c in page.cards]
    assert heads == ["fig1-new", "all-x/fig1", "fig1-old", "all-x/lr", "gone-1"]
    for card, head in zip(page.cards, heads):
        d = root / head
        m = json.loads((d / "metrics.json").read_text())
        # the checks table: one row per check of metrics.json, PASS/FAIL as recorded, with its numbers
        rows = card["checks"][1:]  # the header row has no <td>
        assert [r[0]["text"] for r in rows] == list(m["summary"]["checks"])
        for r, c in zip(rows, m["summary"]["checks"].values()):
            assert (r[1]["class"], r[1]["text"]) == (("pass", "PASS") if c["pass"] else ("fail", "FAIL"))
            assert f"value: {c['value']:.3g}" in r[2]["text"]
        n_pass = sum(c["pass"] for c in m["summary"]["checks"].values())
        assert f"{n_pass}/{len(rows)} checks pass" in card["head"]
        assert "mnist5k (4000 train, 1000 test)" in card["text"] and "12.5 s" in card["text"]
        assert m["finished"] in card["text"]
        # every link of the card leads to this run's report.html
        assert card["links"] and {(root / unquote(h)).resolve() for h in card["links"]} == {(d / "report.html").resolve()}
        # the figure, embedded and scaled down to the thumbnail width with its aspect ratio
        (src,) = card["imgs"]
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            assert im.size == (atlas.THUMB_WIDTH, round(300 * atlas.THUMB_WIDTH / 800))
    assert not page.others  # nothing unfinished or skipped


def test_self_contained(tmp_path):
    root = _tree(tmp_path)
    out, _ = atlas.write_atlas(root)
    text = out.read_text()
    page = _Page(text)
    assert all(u.startswith("data:image/png;base64,") for u in page.imgs) and len(page.imgs) == 5
    # only in-page anchors and relative links to files that exist; nothing with a scheme or a host
    for u in page.urls:
        assert not re.match(r"^[a-z][a-z0-9+.-]*:|^//", u, re.I) or u.startswith("data:image/png;base64,"), u
        if not u.startswith(("#", "data:")):
            assert (out.parent / unquote(u)).is_file(), u
    assert "<script" not in text and "<link" not in text and "@import" not in text and "url(" not in text
    csp = dict(page.metas)["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "img-src data:" in csp


def test_damaged_and_unfinished_are_listed_with_a_reason(tmp_path, capfd):
    root = tmp_path / "runs"
    _fake_run(root / "fig1-ok", "fig1")
    (root / "fig1-unfinished").mkdir()
    (root / "fig1-unfinished" / "config.json").write_text("{}")
    bad = _fake_run(root / "lr-bad-json", "lr")
    (bad / "metrics.json").write_text('{"experiment": "lr", ')
    _fake_run(root / "lr-list", "lr", metrics=[1, 2])
    _fake_run(root / "lr-noname", "lr", metrics={"summary": {}})
    (root / "orphan").mkdir()
    (root / "orphan" / "metrics.json").write_text("{}")
    nofig = _fake_run(root / "lr-badfig", "lr", report=False)
    (nofig / "lr.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    _fake_run(root / "lr-nofig", "lr", figure=False, metrics={"experiment": "lr", "summary": {"checks": "?"}})
    (root / ".hidden" / "fig1-x").mkdir(parents=True)  # hidden directories are not searched
    (root / ".hidden" / "fig1-x" / "config.json").write_text("{}")
    deep = root / "a" / "b" / "c" / "d" / "e"
    _fake_run(deep / "fig1-deep", "fig1")  # below MAX_DEPTH

    assert cli.main(["report", str(root)]) == 0
    cap = capfd.readouterr()
    assert "Traceback" not in cap.out + cap.err and cap.err == ""
    page = _Page((root / "index.html").read_text())
    assert not page.errors
    others = {r[0]["text"]: (r[1]["text"], r[2]["text"], r[3]["text"]) for r in page.others[1:]}
    assert set(others) == {str(root / n) for n in ("fig1-unfinished", "lr-bad-json", "lr-list", "lr-noname", "orphan")}
    assert others[str(root / "fig1-unfinished")][:2] == ("fig1", "unfinished")
    assert f"bnkit run fig1 --resume --out {root / 'fig1-unfinished'}" in others[str(root / "fig1-unfinished")][2]
    assert others[str(root / "lr-bad-json")][1:] == ("skipped", others[str(root / "lr-bad-json")][2])
    assert "metrics.json is unreadable (JSONDecodeError" in others[str(root / "lr-bad-json")][2]
    assert "holds a list" in others[str(root / "lr-list")][2]
    assert "names no experiment" in others[str(root / "lr-noname")][2]
    assert "without config.json" in others[str(root / "orphan")][2]
    for line in others:  # the terminal lists them too
        assert line in cap.out
    cards = {c["head"].split(" ")[0]: c for c in page.cards}
    assert set(cards) == {"fig1-ok", "lr-badfig", "lr-nofig"}
    assert not cards["lr-badfig"]["imgs"] and "lr.png does not decode" in cards["lr-badfig"]["text"]
    assert not cards["lr-badfig"]["links"] and "no report.html" in cards["lr-badfig"]["text"]
    assert "no figure (lr.png is missing)" in cards["lr-nofig"]["text"]
    assert "no checks in metrics.json" in cards["lr-nofig"]["text"]
    assert len(page.imgs) == 1


def test_linked_run_directories_are_followed(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    _fake_run(tmp_path / "elsewhere" / "fig1-far", "fig1")
    (root / "fig1-linked").symlink_to(tmp_path / "elsewhere" / "fig1-far", target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)  # a cycle: bounded by the depth limit
    out, entries = atlas.write_atlas(root)
    assert [(e.path, e.status) for e in entries] == [(root / "fig1-linked", "finished")]  # once, not per loop
    page = _Page(out.read_text())
    assert all((out.parent / unquote(h)).is_file() for c in page.cards for h in c["links"])


def test_out_elsewhere_links_stay_relative(tmp_path):
    root = _tree(tmp_path)
    (tmp_path / "site" / "deep").mkdir(parents=True)
    out, _ = atlas.write_atlas(root, tmp_path / "site" / "deep" / "atlas.html")
    assert not (root / "index.html").exists()
    page = _Page(out.read_text())
    hrefs = [h for c in page.cards for h in c["links"]]
    assert hrefs and all(h.startswith("../../runs/") for h in hrefs)
    assert all((out.parent / unquote(h)).is_file() for h in hrefs)


def test_rebuild_ignores_its_own_page_and_writes_atomically(tmp_path):
    root = _tree(tmp_path)
    before = sorted(p.name for p in root.iterdir())
    atlas.write_atlas(root)
    first = _Page((root / "index.html").read_text())
    atlas.write_atlas(root)
    second = _Page((root / "index.html").read_text())
    assert [c["head"] for c in first.cards] == [c["head"] for c in second.cards]
    assert sorted(p.name for p in root.iterdir()) == sorted(before + ["index.html"])  # no temporary files


def test_markup_in_names_is_escaped(tmp_path):
    root = tmp_path / "runs"
    _fake_run(root / "fig1 <b>&\"x'#?%", "fig1", checks={"<i>x</i>": {"pass": True, "note": "<script>"}})
    _fake_run(root / "odd", "<img src=x>", checks=_checks(True))
    out, _ = atlas.write_atlas(root)
    text = out.read_text()
    page = _Page(text)
    assert not page.errors and "<script>" not in text and "<img src=x>" not in text and "<i>x</i>" not in text
    assert len(page.imgs) == 2 and all(s.startswith("data:") for s in page.imgs)
    heads = sorted(c["head"] for c in page.cards)
    assert heads[0].startswith("fig1 <b>&\"x'#?%")
    link = next(c["links"][0] for c in page.cards if c["head"].startswith("fig1"))
    assert (out.parent / unquote(link)).resolve() == (root / "fig1 <b>&\"x'#?%" / "report.html").resolve()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\"),
                    min_size=1, max_size=12).filter(lambda s: s.strip(".") and len(s.encode()) < 200),
       depth=st.integers(0, 2))
def test_href_reaches_the_file(tmp_path, name, depth):
    """Property: whatever the directory is called, the relative link, decoded, leads to the file."""
    base = tmp_path / f"h{abs(hash((name, depth)))}"
    target = base / "runs" / name / "report.html"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # a name this file system refuses
    target.write_text("x")
    page_dir = base.joinpath(*(["p"] * depth))
    page_dir.mkdir(parents=True, exist_ok=True)
    href = atlas._href(target, page_dir / "index.html")
    assert not re.search(r"[\s\"'<>#?]", href)
    assert (page_dir / unquote(href)).resolve() == target.resolve()


# ------------------------------------------------------------------------------------------------ CLI errors

@pytest.mark.parametrize("case", ["missing", "file", "empty", "only-unfinished", "out-is-dir", "out-parent-missing"])
def test_cli_errors_are_one_line_and_write_nothing(tmp_path, capfd, case):
    root = tmp_path / "runs"
    args = ["report", str(root)]
    if case == "file":
        root.write_text("x")
    elif case == "empty":
        (root / "sub").mkdir(parents=True)
    elif case == "only-unfinished":
        (root / "fig1-a").mkdir(parents=True)
        (root / "fig1-a" / "config.json").write_text("{}")
    elif case.startswith("out"):
        _fake_run(root / "fig1-a", "fig1")
        args += ["--out", str(tmp_path / "site") if case == "out-is-dir" else str(tmp_path / "no" / "a.html")]
        (tmp_path / "site").mkdir()
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    rc = cli.main(args)
    cap = capfd.readouterr()
    assert rc == 2 and cap.out == "" and "Traceback" not in cap.err
    assert len(ERR.findall(cap.err)) == 1 and len(cap.err.strip().splitlines()) == 1, cap.err
    msg = cap.err.strip()
    expected = {"missing": "does not exist", "file": "is not a directory", "empty": "no finished experiment runs",
                "only-unfinished": "(1 unfinished or skipped)", "out-is-dir": "is a directory",
                "out-parent-missing": "does not exist"}[case]
    assert expected in msg
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written


def test_cli_default_dir_and_help(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fake_run(tmp_path / "runs" / "fig1-a", "fig1")
    assert cli.main(["report"]) == 0
    assert (tmp_path / "runs" / "index.html").is_file()
    capfd.readouterr()
    assert cli.main(["--help"]) == 0
    assert re.search(r"^\s+report\s", capfd.readouterr().out, re.M)
    assert cli.main(["report", "--help"]) == 0
    assert "RUNS_DIR" in capfd.readouterr().out


def test_a_failed_write_is_one_line(tmp_path, capfd, monkeypatch):
    import errno

    from bnkit.experiments import train

    def full_disk(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    root = tmp_path / "runs"
    _fake_run(root / "fig1-a", "fig1")
    monkeypatch.setattr(train, "atomic_write_text", full_disk)
    assert cli.main(["report", str(root)]) == 2
    err = capfd.readouterr().err
    assert err.strip() == f"bnkit report: error: cannot write {root / 'index.html'} (No space left on device)"
    assert not (root / "index.html").exists()
