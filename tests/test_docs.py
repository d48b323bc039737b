"""The README and docs/: the generated docs are fresh, every relative link leads to a file (and heading) that exists,
and the README's first screen keeps its two commands, the second being what CI runs."""

import re
import subprocess
import sys
from pathlib import Path

from markdown_it import MarkdownIt

from loraflow import docs

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PARSER = MarkdownIt("commonmark").enable("table")


def test_the_generated_docs_are_fresh():
    for path, text in docs.generated().items():
        assert path.read_text() == text, f"{path.relative_to(REPO)} is stale: run .venv/bin/python -m loraflow.docs"


def test_the_check_command_tells_stale_from_fresh(monkeypatch):
    assert subprocess.run([sys.executable, "-m", "loraflow.docs", "--check"], cwd=REPO).returncode == 0
    reference = REPO / "docs" / "configuration.md"
    stale = {**docs.generated(), reference: "# an old reference\n"}
    monkeypatch.setattr(docs, "generated", lambda: stale)
    assert docs.main(["--check"]) == 1


def test_the_configuration_reference_has_every_field_of_every_objective():
    text = (REPO / "docs" / "configuration.md").read_text()
    for config in docs.objective_configs():
        objective = config.model_fields["objective"].default
        assert f"## objective: {objective}" in text
        for section, field in config.model_fields.items():
            annotation = field.annotation
            members = getattr(annotation, "__args__", (annotation,))
            for member in members:
                for name in getattr(member, "model_fields", {}):
                    if objective == "sft":  # (later objectives show only what differs from SFT's)
                        assert f"| `{section}.{name}` |" in text, f"{section}.{name}"


def _slug(heading: str, seen: dict[str, int]) -> str:
    """GitHub's anchor for a heading (lowercased, punctuation but - and _ dropped, spaces as -; repeats get -1, -2 …).
    Hand-written: markdown-it-py's anchors plugin (mdit-py-plugins) is not a dependency, and its slugs differ."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
    count = seen.get(slug, 0)
    seen[slug] = count + 1
    return f"{slug}-{count}" if count else slug


def _headings_and_links(page: Path) -> tuple[set[str], list[str]]:
    tokens = PARSER.parse(page.read_text())
    anchors, seen, links = set(), {}, []
    for index, token in enumerate(tokens):
        if token.type == "heading_open":
            text = "".join(child.content for child in tokens[index + 1].children or [])
            anchors.add(_slug(text, seen))
        for child in token.children or []:
            if child.type == "link_open":
                links.append(child.attrs["href"])
    return anchors, links


def test_every_relative_link_leads_to_a_file_and_heading_that_exist():
    anchors = {page: _headings_and_links(page)[0] for page in PAGES}
    broken, checked = [], 0
    for page in PAGES:
        for href in _headings_and_links(page)[1]:
            if re.match(r"^[a-z][a-z0-9+.-]*:", href):  # http:, https:, mailto: …: not ours to check
                continue
            checked += 1
            path, _, anchor = href.partition("#")
            target = (page.parent / path).resolve() if path else page
            if not target.exists():
                broken.append(f"{page.relative_to(REPO)}: {href} (no such file)")
            elif anchor and target.suffix == ".md":
                known = anchors.get(target) or _headings_and_links(target)[0]
                if anchor not in known:
                    broken.append(f"{page.relative_to(REPO)}: {href} (no heading #{anchor} in {target.relative_to(REPO)})")
    assert checked > 40 and not broken, "\n".join(broken)


def test_the_readme_is_a_front_page_with_the_two_commands_ci_runs():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in first_block.splitlines() if line.strip() and not line.startswith("#")]
    assert commands == ["bash scripts/setup && .venv/bin/loraflow demo",
                        "bash scripts/setup --test && .venv/bin/python -m pytest -q"]
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci == [commands[1]]


def test_every_guide_is_linked_from_the_readme():
    linked = {(REPO / href.partition("#")[0]).resolve() for href in _headings_and_links(REPO / "README.md")[1]}
    assert [page.name for page in PAGES[1:] if page not in linked] == []
