"""`dvc plots show` writes a page that renders offline: the vendored vega libraries
inline (plots/html/template.html, named in .dvc/config), no network URL, a charset."""

from __future__ import annotations

import hashlib
import json
import re
from html.parser import HTMLParser

import pytest

from tests.conftest import REPO, copy_repo, run

HTML_DIR = REPO / "plots" / "html"
VENDOR = json.loads((HTML_DIR / "vendor.json").read_text())["packages"]


class _Page(HTMLParser):
    """Every tag's attributes, and the text of each vendored <script>."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.attrs: list[tuple[str, dict[str, str | None]]] = []
        self.vendored: dict[str, str] = {}
        self._current: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.attrs.append((tag, dict(attrs)))
        if tag == "script":
            self._current = dict(attrs).get("data-vendored")
            self._text = []

    def handle_data(self, data):
        if self._current:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "script" and self._current:
            self.vendored[self._current] = "".join(self._text)
            self._current = None


def check_offline_page(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    for tag, attrs in page.attrs:
        for key in ("src", "href"):
            value = (attrs.get(key) or "").strip()
            assert not re.match(r"(https?:)?//", value), f"<{tag} {key}={value!r}> loads a URL"
    assert not [a for t, a in page.attrs if t == "script" and "src" in a]
    assert ("meta", {"charset": "utf-8"}) in page.attrs
    for pkg in VENDOR:
        code = page.vendored.get(f"{pkg['name']}@{pkg['version']}")
        assert code is not None, f"{pkg['name']} not inlined"
        # refresh.py writes "<script ...>\n" + the file + "\n    </script>"
        code = code.removeprefix("\n").removesuffix("\n    ")
        digest = hashlib.sha256(code.encode("utf-8")).hexdigest()
        assert digest == pkg["sha256"], f"{pkg['name']}: not the npm package's file"
    return page


def test_template_is_dvcs_page_without_the_cdn_scripts():
    template = (HTML_DIR / "template.html").read_text("utf-8")
    assert "{plot_divs}" in template and "{refresh_tag}" in template
    assert "{scripts}" not in template  # where DVC would put its CDN <script src> tags
    check_offline_page(template)
    for pkg in VENDOR:
        assert (HTML_DIR / f"LICENSE-{pkg['name']}").read_text().startswith("Copyright")
    config = (REPO / ".dvc" / "config").read_text()
    assert re.search(r"\[plots\]\s+html_template = \.\./plots/html/template\.html", config)


def test_the_check_fails_on_dvcs_default_page():
    from dvc_render.html import PAGE_HTML
    from dvc_render.vega import VegaRenderer

    default = PAGE_HTML.replace("{scripts}", VegaRenderer.SCRIPTS)
    with pytest.raises(AssertionError, match="loads a URL"):
        check_offline_page(default)


@pytest.mark.slow
def test_dvc_plots_show_writes_an_offline_page(tmp_path):
    """Plain `dvc plots show` in a repo copy (the committed metrics/ plot files; no
    repro needed) uses the template from .dvc/config."""
    repo = copy_repo(tmp_path / "repo")
    run(["dvc", "plots", "show", "pareto_kld", "pareto_top1", "metrics/quant_error.csv"], repo)
    html = (repo / "dvc_plots" / "index.html").read_text("utf-8")
    check_offline_page(html)
    assert html.count("vegaEmbed('#") == 3
    assert "cdn.jsdelivr.net" not in html


@pytest.mark.slow
def test_no_plot_is_drawn_against_step(tmp_path):
    """`dvc plots show` with no targets draws every declared plot: metrics/pareto.json is
    drawn by pareto_kld/pareto_top1 (against bits per weight) only, never against DVC's
    default `step` (it is the pareto stage's out, not a plot of its own)."""
    repo = copy_repo(tmp_path / "repo")
    run(["dvc", "plots", "show"], repo)
    html = (repo / "dvc_plots" / "index.html").read_text("utf-8")
    check_offline_page(html)
    axes = set(re.findall(r'"title": *"([^"]*)"', html))  # the charts' axis titles
    assert "bits_per_weight" in axes and "step" not in axes, axes
    assert "metrics/pareto.json" not in html
