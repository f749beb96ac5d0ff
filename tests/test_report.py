"""The HTML evaluation report: structure parsed with html.parser, and a render in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from vlrm.report import GalleryItem, format_value, write_report

EVIL = "a cat <script>alert(1)</script> & a dog"
ODD_ID = 'odd "id" <b>&'

RESULTS = {
    "baseline": {"clip_recall/r1": 0.41234567, "clip_recall/r5": 0.7, "clip_recall/backbone": "ViT-B-32",
                 "caption/length": 9.5},
    "tuned": {"clip_recall/r1": 0.5, "caption/length": 12.25, "caption/vocab": 1234,
              "clip_recall/backbone": "ViT-B-32"},
}
MISSING = {("baseline", "caption/vocab"), ("tuned", "clip_recall/r5")}


# --- a small DOM built with the standard library -------------------------------------------

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None], parent: Node | None):
        self.tag, self.attrs, self.parent, self.children = tag, attrs, parent, []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self, tag: str | None = None):
        for c in self.children:
            if isinstance(c, Node):
                if tag is None or c.tag == tag:
                    yield c
                yield from c.iter(tag)

    def find(self, tag: str | None = None, **attrs: str) -> list[Node]:
        return [n for n in self.iter(tag)
                if all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())]

    def one(self, tag: str | None = None, **attrs: str) -> Node:
        found = self.find(tag, **attrs)
        assert len(found) == 1, f"expected one <{tag} {attrs}>, found {len(found)}"
        return found[0]


class TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = self.node = Node("#document", {}, None)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs), self.node)
        self.node.children.append(node)
        if tag not in VOID:
            self.node = node

    def handle_startendtag(self, tag, attrs):
        self.node.children.append(Node(tag, dict(attrs), self.node))

    def handle_endtag(self, tag):
        node = self.node
        while node is not None and node.tag != tag:
            node = node.parent
        assert node is not None and node.parent is not None, f"stray </{tag}>"
        self.node = node.parent

    def handle_data(self, data):
        self.node.children.append(data)


def parse(html_text: str) -> Node:
    builder = TreeBuilder()
    builder.feed(html_text)
    builder.close()
    return builder.root


# --- fixtures ------------------------------------------------------------------------------


def _write_metrics_jsonl(path: Path) -> None:
    lines = [json.dumps({"step": s, "reward/total": 0.1 * s, "reward/clip": 0.2 + 0.05 * s,
                         "reward/note": "text is not plotted", "loss/policy": 1 / (s + 1),
                         "loss/value": 0.5 / (s + 1), "loss/total": 1.5 / (s + 1), "lr": 1e-5})
             for s in range(5)]
    lines[2:2] = ["{not json", "", "[1, 2]", json.dumps({"reward/total": 9.0})]  # skipped
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from vlrm_plugins.bundled_photos import bundled_photos

    folder = bundled_photos()
    tmp = tmp_path_factory.mktemp("report")
    items = []
    for i in range(3):
        image = folder.load(folder.paths[i])
        image_id = ODD_ID if i == 1 else folder.paths[i].name
        captions = {"baseline": EVIL if i == 0 else f"baseline caption {i}", "tuned": f"tuned caption {i}"}
        refs = ["a reference", "another <i>reference</i>"] if i != 2 else None
        items.append(GalleryItem(image_id, image, captions, refs))
    _write_metrics_jsonl(tmp / "metrics.jsonl")
    out = write_report(tmp / "out" / "report.html", RESULTS, items, metrics_jsonl=tmp / "metrics.jsonl")
    return out, items


# --- structure -----------------------------------------------------------------------------


def test_metrics_table(report):
    path, _ = report
    table = parse(path.read_text()).one("table", id="metrics")
    header = [th.text() for th in table.one("thead").iter("th")]
    assert header == ["metric", "baseline", "tuned"]

    keys = sorted({k for m in RESULTS.values() for k in m})
    rows = {tr.attrs["data-key"]: tr for tr in table.find("tr") if "data-key" in tr.attrs}
    assert sorted(rows) == keys
    for key, tr in rows.items():
        assert tr.one("th").text() == key
        cells = [td.text() for td in tr.find("td")]
        for policy, cell in zip(RESULTS, cells, strict=True):
            if (policy, key) in MISSING:
                assert cell == "\u2014"
            else:
                assert cell == format_value(RESULTS[policy][key])
    assert [td.text() for td in rows["clip_recall/r1"].find("td")] == ["0.4123", "0.5"]
    assert [td.text() for td in rows["clip_recall/backbone"].find("td")] == ["ViT-B-32", "ViT-B-32"]
    assert [td.text() for td in rows["caption/vocab"].find("td")] == ["\u2014", "1234"]
    groups = [tr.text() for tr in table.find("tr", **{"class": "group"})]
    assert groups == ["caption", "clip_recall"]


def test_gallery_images_captions_and_escaping(report):
    path, items = report
    text = path.read_text()
    doc = parse(text)
    figures = doc.one(id="gallery").find("figure")
    assert len(figures) == len(items)
    for figure, item in zip(figures, items, strict=True):
        assert figure.attrs["data-image-id"] == item.image_id
        assert figure.one(**{"class": "image-id"}).text() == item.image_id
        img = figure.one("img")
        assert img.attrs["alt"] == item.image_id
        src = img.attrs["src"]
        assert src.startswith("data:image/jpeg;base64,")
        thumb = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert thumb.format == "JPEG" and thumb.mode == "RGB"
        assert max(thumb.size) == min(256, max(item.image.size))
        captions = figure.find("div", **{"class": "caption"})
        assert [c.attrs["data-policy"] for c in captions] == ["baseline", "tuned"]
        assert [c.one("p").text() for c in captions] == [item.captions["baseline"], item.captions["tuned"]]
        details = figure.find("details")
        if item.references:
            assert [li.text() for li in details[0].find("li")] == list(item.references)
            assert details[0].one("summary").text() == f"References ({len(item.references)})"
        else:
            assert details == []

    # The hostile caption is text, not markup: the only <script> is the report's own.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<script>alert(1)" not in text
    scripts = doc.find("script")
    assert len(scripts) == 1 and "alert" not in scripts[0].text()
    assert not doc.find("i") and not doc.find("b")  # from a reference and an image id


def test_curves_and_self_contained(report):
    path, _ = report
    text = path.read_text()
    doc = parse(text)
    imgs = doc.one("section", id="curves").find("img")
    assert [i.attrs["alt"] for i in imgs] == ["Reward curves", "Loss curves"]
    for img in imgs:
        assert img.attrs["src"].startswith("data:image/png;base64,")
        png = base64.b64decode(img.attrs["src"].split(",", 1)[1])
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert Image.open(io.BytesIO(png)).size[0] >= 400

    # Nothing is fetched from anywhere: every resource is a data URI, no URL appears at all.
    assert not re.search(r"https?://", text)
    assert "url(" not in text and "@import" not in text
    for node in doc.iter():
        for attr in ("src", "href", "srcset", "poster", "data"):
            if attr in node.attrs:
                assert node.attrs[attr].startswith("data:"), (node.tag, attr)
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # no temp file left behind


def test_no_metrics_file_means_no_curves(tmp_path):
    image = Image.new("RGB", (600, 300), (200, 40, 40))
    out = write_report(tmp_path / "r.html", {"p": {"x": 1.0}}, [GalleryItem("red", image, {"p": "red"})])
    text = out.read_text()
    assert 'id="curves"' not in text and "data:image/png" not in text
    thumb = parse(text).one(id="gallery").one("img").attrs["src"]
    assert Image.open(io.BytesIO(base64.b64decode(thumb.split(",", 1)[1]))).size == (256, 128)
    assert image.size == (600, 300)  # the caller's image is untouched

    missing = tmp_path / "nope" / "metrics.jsonl"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        write_report(tmp_path / "r2.html", {}, [], metrics_jsonl=missing)
    assert not (tmp_path / "r2.html").exists()


def test_format_value():
    assert format_value(0.123456) == "0.1235"
    assert format_value(3) == "3"
    assert format_value(12345.678) == "12346"
    assert format_value(1.5e-6) == "1.500e-06"
    assert format_value(float("nan")) == "NaN"
    assert format_value(0.0) == "0"
    assert format_value(True) == "true"
    assert format_value("ViT-B-32") == "ViT-B-32"
    assert format_value(None) == "\u2014"


# --- headless Chromium -------------------------------------------------------------------

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=10000")


def _chromium() -> str:
    """The chromium binary; skips the test without one, but fails it under CI (CI=true)."""
    binary = shutil.which("chromium")
    if binary is None:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail("chromium is not on PATH, but CI is set: .ci/run should have installed it "
                        "(apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium); the rendering test needs it")
    return binary


def _run_chromium(binary: str, profile: Path, *args: str) -> str:
    """Run headless Chromium once with a fresh profile; its stdout."""
    proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # Chromium's own helper processes share its group
        proc.communicate()
        pytest.fail(f"chromium did not finish within 120 s: {args}")
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {err[-2000:]}"
    return out


def _body(dom: str) -> Node:
    return parse(dom).one("body")


def test_chromium_loads_every_image(report, tmp_path):
    chromium = _chromium()
    path, _ = report
    n_images = len(parse(path.read_text()).find("img"))
    assert n_images == 5  # 3 photos and 2 charts

    dom = _run_chromium(chromium, tmp_path / "profile", "--dump-dom", path.as_uri())
    body = _body(dom)
    assert body.attrs.get("data-images-loaded") == str(n_images), "the load script did not run"
    assert body.attrs.get("data-images-broken") == "0"
    assert "hidden" in body.one(id="image-warning").attrs
    assert len(body.one("table", id="metrics").find("tr")) > 1

    shot = tmp_path / "shot.png"
    _run_chromium(chromium, tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1200,1600",
                  path.as_uri())
    assert shot.stat().st_size > 50_000  # a rendered page with photos, not a blank canvas
    with Image.open(shot) as image:
        assert image.size == (1200, 1600)
        assert len(image.convert("L").getcolors(2**16) or ()) > 100


def test_chromium_sees_a_broken_image(report, tmp_path):
    """The check can fail: one corrupted data URI is counted as broken and warned about."""
    chromium = _chromium()
    path, _ = report
    text = path.read_text()
    first = re.search(r'data:image/jpeg;base64,[^"]+', text).group(0)
    broken = tmp_path / "broken.html"
    broken.write_text(text.replace(first, "data:image/jpeg;base64,AAAAAAAAAAAA", 1))

    body = _body(_run_chromium(chromium, tmp_path / "profile", "--dump-dom", broken.as_uri()))
    assert body.attrs.get("data-images-broken") == "1"
    assert body.attrs.get("data-images-loaded") == "4"
    warning = body.one(id="image-warning")
    assert "hidden" not in warning.attrs and "1 of 5 images failed" in warning.text()
