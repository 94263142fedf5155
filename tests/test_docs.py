"""The documentation site: a strict build, every public name in the reference, the home page's picture.

The browser half of the check (headless Chromium loading the served site) is
``.ci/docs_check.py``, which ``.ci/run`` runs after installing Debian's chromium; its
verdict logic is tested here with a stand-in browser, so a broken picture or a missing
name is known to fail it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = ("Matcher", "ThresholdPolicy", "PairCache", "MergeConfig")


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = _load(ROOT / "docs" / "_hooks" / "public_names.py", "docs_public_names_hook")
docs_check = _load(ROOT / ".ci" / "docs_check.py", "ci_docs_check")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site built with ``mkdocs build --strict`` (any warning fails the build)."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def _ids(site: Path) -> dict[str, str]:
    """Every element id of the site -> the page it is on."""
    found: dict[str, str] = {}
    for page in site.rglob("*.html"):
        for anchor in re.findall(r'id="([^"]+)"', page.read_text(encoding="utf-8")):
            found.setdefault(anchor, str(page.relative_to(site)))
    return found


def test_every_public_name_has_a_reference_entry(site: Path) -> None:
    ids = _ids(site)
    documented = hooks.documented_modules(ROOT / "docs" / "reference")
    documented_paths = [module for module, _, _ in documented]
    missing = []
    for module_path in hooks.public_modules(ROOT):
        module = importlib.import_module(module_path)
        for name in getattr(module, "__all__", []):
            if name.startswith("_"):
                continue
            obj = getattr(module, name)
            entries = [
                f"{other}.{name}"
                for other in [module_path, *documented_paths]
                if f"{other}.{name}" in ids and getattr(importlib.import_module(other), name, None) is obj
            ]
            if not entries:
                missing.append(f"{module_path}.{name}")
    assert not missing, f"public names without a reference entry: {missing}"


def test_every_public_module_is_documented() -> None:
    documented = {module for module, _, _ in hooks.documented_modules(ROOT / "docs" / "reference")}
    skipped = set(hooks.public_modules(ROOT)) - documented
    # Those left out are covered by re-exports (e.g. tokenmerge.policies.base through tokenmerge.policies).
    for module_path in skipped:
        module = importlib.import_module(module_path)
        assert getattr(module, "__all__", None), f"{module_path} is neither documented nor re-exported"


def test_reference_index_lists_the_interfaces(site: Path) -> None:
    index = (site / "reference" / "index.html").read_text(encoding="utf-8")
    for name in REQUIRED:
        assert f"<code>{name}</code>" in index
    policies = (site / "reference" / "policies" / "index.html").read_text(encoding="utf-8")
    for name in REQUIRED[:3]:
        assert f'id="tokenmerge.policies.{name}"' in policies
    assert 'id="tokenmerge.MergeConfig"' in (site / "reference" / "tokenmerge" / "index.html").read_text("utf-8")


def test_home_page_shows_a_picture_that_exists(site: Path) -> None:
    home = (site / "index.html").read_text(encoding="utf-8")
    sources = re.findall(r'<img[^>]+src="([^"]+)"', home)
    assert sources, "the home page has no picture"
    for source in sources:
        with Image.open(site / source) as picture:
            width, height = picture.size
            assert width > 100 and height > 100
            assert len(picture.convert("RGB").getcolors(maxcolors=1 << 20) or ()) > 64  # not blank


def test_every_nav_page_and_link_target_exists(site: Path) -> None:
    for page in ("tutorials", "how-to", "reference", "explanation"):
        assert (site / page / "index.html").is_file()
    for page in site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r'<img[^>]+src="([^"]+)"', text):
            if "://" not in target:
                assert (page.parent / target).resolve().is_file(), f"{page}: missing {target}"


def test_custom_policy_page_shows_the_example_code(site: Path) -> None:
    page = (site / "how-to" / "custom-policy" / "index.html").read_text(encoding="utf-8")
    for name in ("EveryKthDestination", "DepthRamp", "WarmupThenEvery", "make_config"):
        assert name in page
    assert "--8&lt;--" not in page and "--8<--" not in page  # the snippet markers are stripped


# ---------------------------------------------------------------------- the browser check's verdicts
def _fake_chromium(tmp_path: Path, dom: str) -> str:
    """A stand-in for chromium that prints ``dom`` for --dump-dom and writes a tiny PNG for --screenshot."""
    page = tmp_path / "dom.html"
    page.write_text(dom, encoding="utf-8")
    script = tmp_path / "fake-chromium"
    script.write_text(f'#!/bin/sh\ncat "{page}"\n', encoding="utf-8")
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize(
    ("dom", "failure"),
    [
        ('<pre id="result">[]</pre>', "home page has no picture in its content"),
        (
            '<pre id="result">[{&quot;src&quot;: &quot;assets/x.png&quot;, &quot;complete&quot;: true, '
            "&quot;width&quot;: 0, &quot;height&quot;: 0}]</pre>",
            "home page picture did not load: assets/x.png",
        ),
        ('<pre id="result">pending</pre>', "home page: the picture check did not run"),
    ],
)
def test_browser_check_fails_on_a_broken_picture(tmp_path: Path, dom: str, failure: str) -> None:
    chromium = _fake_chromium(tmp_path, dom)
    site = tmp_path / "site"
    site.mkdir()
    failures = docs_check.check_home_pictures(chromium, tmp_path, "http://127.0.0.1:1/", site)
    assert failures == [failure]
    assert not (site / "__docs_check.html").exists()


def test_browser_check_passes_a_loaded_picture(tmp_path: Path) -> None:
    dom = (
        '<pre id="result">[{&quot;src&quot;: &quot;assets/x.png&quot;, &quot;complete&quot;: true, '
        "&quot;width&quot;: 640, &quot;height&quot;: 480}]</pre>"
    )
    site = tmp_path / "site"
    site.mkdir()
    assert docs_check.check_home_pictures(_fake_chromium(tmp_path, dom), tmp_path, "http://x/", site) == []


def test_browser_check_fails_when_a_name_is_missing(tmp_path: Path) -> None:
    dom = "<code>Matcher</code><code>ThresholdPolicy</code><code>MergeConfig</code>" + "".join(
        f'<div id="{anchor}">' for _, anchor in docs_check.REQUIRED.values()
    )
    failures = docs_check.check_reference(_fake_chromium(tmp_path, dom), tmp_path, "http://x/")
    assert failures == ["reference index does not list PairCache"]


# ---------------------------------------------------------------------- BENCHMARKS.md in the site
bench_hook = _load(ROOT / "docs" / "_hooks" / "benchmarks.py", "docs_benchmarks_hook")


def test_benchmarks_stay_open_until_a_table_exists(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    assert bench_hook.benchmarks_markdown(path) is None
    path.write_text("# Benchmarks\n\nFigures not yet measured are marked *open*.\n", encoding="utf-8")
    assert bench_hook.benchmarks_markdown(path) is None


def test_benchmarks_table_replaces_the_open_block(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "BENCHMARKS.md").write_text(
        "# Benchmarks\n\n## SD 1.5, H100\n\nRun [the script](benchmarks/gpu.sh), ![plot](out/p.png), "
        "[torch](https://pytorch.org).\n\n| method | ms |\n| --- | --- |\n| plain | 30.0 |\n",
        encoding="utf-8",
    )
    page = "before\n<!-- benchmarks -->\nopen: not measured yet\n<!-- /benchmarks -->\nafter\n"
    out = bench_hook.on_page_markdown(page, None, {"docs_dir": str(tmp_path / "docs")}, None)
    assert "not measured yet" not in out and out.startswith("before\n") and out.endswith("after\n")
    assert "#### SD 1.5, H100" in out and "| plain | 30.0 |" in out
    assert "the script (`benchmarks/gpu.sh`)" in out and "plot (`out/p.png`)" in out  # no dead links
    assert "[torch](https://pytorch.org)" in out
    assert "# Benchmarks" not in out


def test_home_shows_the_speed_section_only_once_measured(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    targets = (
        "# Benchmarks\n\n## Speed\n\n| target | status |\n| --- | --- |\n| ToMeSD >= 1.25x | *open* |\n\n"
        "## Fidelity\n\n| method | PSNR |\n| --- | --- |\n| ToMeSD | 30.1 dB |\n"
    )
    path.write_text(targets, encoding="utf-8")
    assert bench_hook.benchmarks_markdown(path, "Speed") is None  # only targets, all open
    assert bench_hook.benchmarks_markdown(path) is not None  # the full file has tables
    path.write_text(targets.replace("| ToMeSD >= 1.25x | *open* |", "| ToMeSD r=0.5, H100 | 1.31x |"), "utf-8")
    speed = bench_hook.benchmarks_markdown(path, "Speed")
    assert speed is not None and "1.31x" in speed and "Fidelity" not in speed
    assert "Speed" not in speed  # the page that includes a section gives it its own heading


def test_current_benchmarks_file_renders(site: Path) -> None:
    """Whatever BENCHMARKS.md holds now, the pages that include it were built (strictly) with it."""
    included = bench_hook.benchmarks_markdown(ROOT / "BENCHMARKS.md")
    page = (site / "performance" / "index.html").read_text(encoding="utf-8")
    if included is None:
        assert "The measured figures are in" in page
    else:
        assert "From <code>BENCHMARKS.md</code> in the repository" in page


def _text(html: str) -> str:
    return re.sub(r"<[^>]+>", " ", html)


def test_home_page_is_for_users(site: Path) -> None:
    """What tokenmerge does, install (with the CPU-only torch), one example per family, the models
    table from models.md, a short speed table linking to the performance page; nothing else first."""
    home = (site / "index.html").read_text(encoding="utf-8")
    text = _text(home)
    headings = re.findall(r"<h2[^>]*>(.*?)<", home)
    assert headings[:5] == ["Install", "In five lines", "Supported models", "Measured speed", "Where to go next"]
    assert "download.pytorch.org/whl/cpu" in text
    code = re.sub(r"<[^>]+>", "", home)  # highlighted code without its spans
    for call in ("ToMeSD(ratio=0.5", "CAToMe(threshold=0.7", "ToMe(r=13)"):
        assert call in code
    models = (ROOT / "docs" / "models.md").read_text(encoding="utf-8")
    first_row = next(line for line in models.splitlines() if line.startswith("| Stable Diffusion"))
    assert first_row.split("|")[1].strip() in text  # the table is included, not copied
    assert 'href="performance/"' in home
    measured = home[home.index('id="measured-speed"') : home.index('id="where-to-go-next"')]
    assert measured.count("<tr>") <= 12  # one short table, not the benchmark log
    table = _text(home[home.index('id="supported-models"') : home.index('id="measured-speed"')])
    assert len(text.split()) - len(table.split()) < 1200  # the prose; the models table grows with the families


PROCESS_WORDS = re.compile(
    r"\bissue \d|\(issue|\b(?:first|second|third|this|development|GPU) sessions?\b|\bworkplace\b"
    r"|\bANCHORS\b|next (GPU )?run|the lead\b|device time",
    re.IGNORECASE,
)


def test_no_process_words_in_user_facing_text(site: Path) -> None:
    """The docs, the README and benchmarks/README.md speak of the project, not of how it was made."""
    pages = {str(page.relative_to(site)): _text(page.read_text(encoding="utf-8")) for page in site.rglob("*.html")}
    for name in ("README.md", "benchmarks/README.md"):
        pages[name] = (ROOT / name).read_text(encoding="utf-8")
    found = {name: PROCESS_WORDS.findall(text) for name, text in pages.items() if PROCESS_WORDS.search(text)}
    assert not found, found


def _entries_without_text(html: str) -> list[str]:
    """Ids of reference entries whose contents hold no text (a name listed with nothing said)."""
    parts = re.split(r'(<h[2-5] id="[^"]+" class="doc doc-heading)', html)
    empty = []
    for head, body in zip(parts[1::2], parts[2::2]):
        own = body.split('class="doc doc-heading')[0]
        contents = re.search(r'<div class="doc doc-contents[^"]*">(.*)', own, re.S)
        if not re.sub(r"<[^>]+>", "", contents.group(1) if contents else "").strip():
            empty.append(re.search(r'id="([^"]+)"', head).group(1))
    return empty


def test_reference_pages_lead_with_the_verb(site: Path) -> None:
    page = (site / "reference" / "tokenmerge" / "index.html").read_text(encoding="utf-8")
    order = re.findall(r'<h2 id="(tokenmerge\.[A-Za-z_]+)"', page)
    assert order[:6] == [f"tokenmerge.{n}" for n in ("apply", "remove", "ToMe", "ToMeSD", "CAToMe", "ToDo")]
    assert 'id="tokenmerge.MergeState"' in page and "merged_tokens" in page
    # Dataclass fields and attributes are described once, on themselves (docs/_hooks/field_docs.py).
    assert not _entries_without_text(page), _entries_without_text(page)
    merged_tokens = page[page.index('id="tokenmerge.MergeState.merged_tokens"') :][:3000]
    assert "of the last plan of each layer" in merged_tokens
    policies = (site / "reference" / "policies" / "index.html").read_text(encoding="utf-8")
    assert len(_entries_without_text(policies)) <= 10
    for html_page in (site / "reference").rglob("*.html"):
        assert "::</p>" not in html_page.read_text(encoding="utf-8"), html_page  # reST's literal marker
    assert (site / "assets" / "extra.css").is_file()  # long code lines wrap instead of being cut off
