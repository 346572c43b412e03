"""The documentation and the registry metadata (issue 25 §1, §3), pure Python, no ComfyUI: every relative link and
picture in README.md, CONTRIBUTING.md and docs/*.md resolves (anchors to headings included), the README stays a
front page, and pyproject.toml follows the Comfy registry's rules."""
from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.DOTALL | re.MULTILINE)


def links(text: str) -> list[str]:
    """Markdown link and picture targets outside fenced code blocks."""
    return [m.group(1) for m in LINK.finditer(FENCE.sub("", text))]


def github_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: the heading's text without markup, lower case, characters other
    than letters, digits, '_', '-' and spaces dropped, spaces -> '-'; repeats get -1, -2, ..."""
    seen: dict[str, int] = {}
    anchors = set()
    for line in FENCE.sub("", text).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # links -> their text
        heading = heading.replace("`", "").replace("*", "")
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def broken_links(page: Path) -> list[str]:
    problems = []
    for target in links(page.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not checked here
            continue
        path_part, _, anchor = target.partition("#")
        file = page if not path_part else (page.parent / path_part).resolve()
        if not file.exists():
            problems.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in github_anchors(file.read_text()):
            problems.append(f"{target}: no heading with that anchor in {file.name}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_and_picture_resolves(page):
    assert links(page.read_text()), "a page without links is not linked into the docs"
    assert broken_links(page) == []


def test_the_link_check_catches_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## Some `code` heading\n\n## Title\n\n```\n[not](a link.md)\n```\n"
                                   "[ok](#title) [ok](#title-1) [ok](#some-code-heading) ![pic](b.png)\n"
                                   "[bad](#nothing) [bad](c.md) [web](https://example.com/x.md)\n")
    (tmp_path / "b.png").write_bytes(b"")
    assert broken_links(tmp_path / "a.md") == ["#nothing: no heading with that anchor in a.md", "c.md: no such file"]


USER_PAGES = ["nodes.md", "how-it-works.md", "batch.md", "speed.md", "file-format.md", "limits.md", "toy-world.md"]


def test_the_readme_links_every_user_page():
    readme_targets = {(ROOT / t.partition("#")[0]).resolve() for t in links((ROOT / "README.md").read_text())}
    assert [name for name in USER_PAGES if (ROOT / "docs" / name).resolve() not in readme_targets] == []


def test_the_readme_is_a_front_page():
    """Under ~10 KB, in the order a newcomer asks: what it does (with a picture), how it compares, what is measured of
    its quality, install, the first run, the test command, where to go next."""
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) < 10 * 1024
    sections = re.findall(r"^## (.*)$", text, re.MULTILINE)
    assert sections == ["How it compares", "Measured: likeness and prompt fidelity, in a toy world", "Install",
                        "First run", "Tests", "More"]
    toy = text.split("\n## ")[2]  # the measured quality, under a picture labelled as the toy model's
    assert "docs/toy-prompts.png" in toy and "Toy model, not Stable Diffusion" in toy
    intro = text.split("\n## ")[0]
    assert "![" in intro and "docs/workflow.png" in intro
    assert "bash .ci/run" in text and "bash .ci/test" in text
    assert "Tested on ComfyUI 0.3.52 – 0.33.0; 0.38 read, not run" in text
    assert "Tested on ComfyUI 0.3.52 – 0.33.0; 0.38 read, not run" in (ROOT / "docs" / "limits.md").read_text()


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_pyproject_follows_the_comfy_registry_specification():
    """docs.comfy.org/registry/specifications: [project] name (the node id: < 100 characters, letters, digits, '-',
    '_', '.', no two special characters in a row, starting with a letter; best practice: no "ComfyUI" in it),
    version X.Y.Z, repository URL; [tool.comfy] PublisherId, Icon (SVG/PNG/JPG/GIF, square, at most 400 x 400)."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project, comfy = meta["project"], meta["tool"]["comfy"]
    name = project["name"]
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*", name), name
    assert name == name.lower() and "comfyui" not in name.lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert (ROOT / project["license"]["file"]).is_file()
    assert project["urls"]["Repository"].startswith("https://github.com/")
    assert "Operating System :: OS Independent" in project["classifiers"]
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", comfy["PublisherId"])
    assert comfy["requires-comfyui"] == ">=0.3.52"
    icon = comfy["Icon"]
    assert icon.endswith("/main/docs/icon.png")
    width, height = _png_size(ROOT / "docs" / "icon.png")
    assert width == height <= 400
    # the README's install line names the registry id
    assert f"comfy node install {name}`" in (ROOT / "README.md").read_text()
