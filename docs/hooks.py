"""MkDocs hooks of the documentation site (mkdocs.yml `hooks:`): pages from the repository's own files, nothing copied.

- The repository's Markdown files outside docs/ become site pages as they are (`PAGES_FROM_REPOSITORY`): README.md is
  the home page, recipes/README.md and BENCHMARKS.md guides; so the site cannot drift from them.
- Relative links are rewritten for the page's place on the site: a link to one of those files or to a docs/ page
  points at its page; a link to any other repository file (a script, a recipe) becomes its path in code, since the
  site does not serve it; a link to no file stays as it is, and `mkdocs build --strict` fails on it.
- The reference pages hold generated tables at `<!-- generated: NAME -->` placeholders (`GENERATED`): GSPOConfig's
  fields with their defaults and `help=` texts (mkdocstrings does not show `help=` metadata), the training command's
  arguments, and the metric registry (trl_gspo/metrics.py's `markdown_table()`).

The generators are plain functions of trl_gspo, importable without MkDocs (tests/unit/test_metric_registry.py uses
`generated_markdown`).
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# repository file -> its page on the site
PAGES_FROM_REPOSITORY = {
    "README.md": "index.md",
    "recipes/README.md": "recipes.md",
    "BENCHMARKS.md": "benchmarks.md",
}
PLACEHOLDER = re.compile(r"<!-- generated: ([\w ]+) -->")
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s#]+)(#[^)\s]*)?\)")


def _default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return f"`{field.default!r}`"
    if field.default_factory is not dataclasses.MISSING:
        return f"`{field.default_factory()!r}`"
    return "required"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def fields_table(cls: type, names: list[str]) -> str:
    """A Markdown table of a dataclass's fields `names`: name, default, and the field's `help=` metadata."""
    by_name = {field.name: field for field in dataclasses.fields(cls)}
    rows = ["| field | default | what it does |", "|---|---|---|"]
    for name in names:
        field = by_name[name]
        rows.append(f"| `{name}` | {_cell(_default_text(field))} | {_cell(field.metadata.get('help', ''))} |")
    return "\n".join(rows)


def _own_fields(cls: type) -> list[str]:
    """The fields a class declares itself (its annotations), in declaration order."""
    return list(cls.__dict__.get("__annotations__", {}))


def _config_fields() -> str:
    from trl_gspo import GSPOConfig

    return fields_table(GSPOConfig, _own_fields(GSPOConfig))


def _script_arguments() -> str:
    import dataclasses as dc

    from trl_gspo.cli import GSPOScriptArguments

    return fields_table(GSPOScriptArguments, [field.name for field in dc.fields(GSPOScriptArguments)])


def _metrics(origin: str):
    def table() -> str:
        from trl_gspo import metrics

        return metrics.markdown_table(origin)

    return table


GENERATED = {
    "config fields": _config_fields,
    "script arguments": _script_arguments,
    "metrics GSPO": _metrics("GSPO"),
    "metrics TRL": _metrics("TRL"),
    "metrics transformers": _metrics("transformers"),
}


def generated_markdown(markdown: str) -> str:
    """`markdown` with every `<!-- generated: NAME -->` placeholder replaced by its table; an unknown NAME is an error."""

    def replace(match: re.Match) -> str:
        name = match.group(1).strip()
        if name not in GENERATED:
            raise ValueError(f"docs placeholder <!-- generated: {name} -->: expected one of {sorted(GENERATED)}")
        return GENERATED[name]()

    return PLACEHOLDER.sub(replace, markdown)


def _site_path(repository_path: str) -> str | None:
    """The site page (or docs/ asset) a repository path is served as, relative to docs/; None if not served."""
    if repository_path in PAGES_FROM_REPOSITORY:
        return PAGES_FROM_REPOSITORY[repository_path]
    in_docs = repository_path.removeprefix("docs/")
    if repository_path.startswith("docs/") and (
        (ROOT / repository_path).is_file() or in_docs in PAGES_FROM_REPOSITORY.values()
    ):
        return in_docs
    return None


def rewrite_links(markdown: str, repository_path: str, site_path: str) -> str:
    """Relative links of a page read from `repository_path` and served at `site_path` (relative to docs/)."""

    def replace(match: re.Match) -> str:
        bang, text, target, anchor = match.group(1), match.group(2), match.group(3), match.group(4) or ""
        if re.match(r"^[a-z]+:", target) or target.startswith("/"):
            return match.group(0)
        in_repository = posixpath.normpath(posixpath.join(posixpath.dirname(repository_path), target))
        served = _site_path(in_repository)
        if served is None and (ROOT / in_repository).exists():  # a repository file the site does not serve
            return text if text.strip("`") == in_repository else f"{text} (`{in_repository}`)"
        if served is None:  # no such file: left as it is, so that mkdocs --strict reports the broken link
            return match.group(0)
        relative = posixpath.relpath(served, posixpath.dirname(site_path) or ".")
        return f"{bang}[{text}]({relative}{anchor})"

    return LINK.sub(replace, markdown)


# --- MkDocs hooks ------------------------------------------------------------------------------------------------------


def on_files(files, config):
    from mkdocs.structure.files import File

    for repository_path, site_path in PAGES_FROM_REPOSITORY.items():
        content = (ROOT / repository_path).read_text()
        files.append(File.generated(config, site_path, content=content))
    return files


def on_page_markdown(markdown, page, config, files):
    site_path = page.file.src_uri
    repository_path = next((repo for repo, site in PAGES_FROM_REPOSITORY.items() if site == site_path), None)
    markdown = rewrite_links(markdown, repository_path or f"docs/{site_path}", site_path)
    return generated_markdown(markdown)
