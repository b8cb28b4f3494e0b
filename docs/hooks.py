"""MkDocs hook: numbers on the docs pages are read from benchmarks/results/*.json at build time.

Two forms are replaced in each page's Markdown before it is rendered:

- an inline reference ``{{ tfft.json : table/base/samples/mean | .2f }}`` — file, a path of keys
  separated by ``/`` (a key that itself contains ``/`` is matched as a whole; list items by index)
  and an optional format spec (Python's, default ``.3g``);
- a fenced block with the info string ``results-table`` holding YAML: ``columns`` (the header),
  ``file`` (the default file of the references in its cells), ``rows`` (lists of cells) and/or
  ``foreach`` (a list of mappings) with ``row`` (a list of cell templates in which ``${name}`` is
  replaced by each mapping's value; ``file`` may use them too). Inside a block a reference may
  omit the file: ``{{ table/base/samples/mean | .2f }}``. A path that starts with ``-`` gives the
  negated number; a list of numbers prints as a comma-separated list.

Figures: every PNG in benchmarks/results/ is added to the site as ``results/<name>.png``, so a page
shows one next to its numbers with ``![…](results/<name>.png)`` (a missing file is a broken link,
which the strict build refuses).

A JSON null prints as "—" (not measured for that row). A missing file, a missing key or a value
that cannot be formatted raises, so ``mkdocs build`` fails instead of printing a number that no
longer matches its file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path


RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"

REF = re.compile(r"\{\{\s*(?:(?P<file>[\w.\-/]+\.json)\s*:\s*)?(?P<path>[^|{}]+?)\s*(?:\|\s*(?P<fmt>[^{}]*?)\s*)?\}\}")
BLOCK = re.compile(r"^```results-table[ \t]*\n(?P<body>.*?)^```[ \t]*$", re.S | re.M)
VAR = re.compile(r"\$\{(\w+)\}")

_cache: dict[Path, object] = {}   # one build's parsed files; cleared before each (mkdocs serve rebuilds)


def on_pre_build(config) -> None:
    _cache.clear()


def on_files(files, config):
    """Add benchmarks/results/*.png to the site as results/<name>.png (the JSONs stay out)."""
    from mkdocs.structure.files import File
    for png in sorted(RESULTS.glob("*.png")):
        files.append(File(f"results/{png.name}", src_dir=str(RESULTS.parent), dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    return files


def load(name: str) -> object:
    """The parsed JSON of benchmarks/results/<name>; raises FileNotFoundError naming the file."""
    path = RESULTS / name
    if path not in _cache:
        if not path.is_file():
            raise FileNotFoundError(f"docs: result file {path} does not exist (a table on the docs pages reads it)")
        _cache[path] = json.loads(path.read_text())
    return _cache[path]


def lookup(data: object, path: str, where: str) -> object:
    """Follow a '/'-separated key path; a key containing '/' is matched greedily as a whole."""
    parts = [p.strip() for p in path.split("/")]
    node, i = data, 0
    while i < len(parts):
        if isinstance(node, list):
            try:
                node, i = node[int(parts[i])], i + 1
            except (ValueError, IndexError):
                raise KeyError(f"docs: {where}: no list item {parts[i]!r} in path {path!r}") from None
            continue
        if not isinstance(node, dict):
            raise KeyError(f"docs: {where}: {'/'.join(parts[:i])!r} is a {type(node).__name__}, not a mapping")
        for j in range(len(parts), i, -1):   # longest key first: "copy/all" is one key
            key = "/".join(parts[i:j])
            if key in node:
                node, i = node[key], j
                break
        else:
            raise KeyError(f"docs: {where}: no key {parts[i]!r} in path {path!r}")
    return node


def render(name: str, path: str, fmt: str | None) -> str:
    negate = path.startswith("-")   # "-a/b": the negated value (an energy from a reward −E)
    path = path[1:].strip() if negate else path
    value = lookup(load(name), path, name)
    if negate:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"docs: {name}: cannot negate {path!r} = {value!r}")
        value = -value
    if value is None:   # an explicit null in the file: not measured for this row
        return "—"
    if isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
        return ", ".join(scalar(v, fmt, f"{name}: {path}") for v in value)
    if isinstance(value, (dict, list)):
        raise ValueError(f"docs: {name}: {path!r} is a {type(value).__name__}, not a number or text")
    return scalar(value, fmt, f"{name}: {path}")


def scalar(value: object, fmt: str | None, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    fmt = fmt or ".3g"
    try:
        text = format(value, fmt)
    except (TypeError, ValueError) as e:
        raise ValueError(f"docs: {where}: cannot format {value!r} with {fmt!r}: {e}") from None
    if text.startswith("-"):
        if not any(c in "123456789" for c in text.split("e")[0]):
            return text[1:]   # −0.00 of a value that rounds to zero reads as a sign that is not there
        return "−" + text[1:].replace("e-", "e−")
    return text


def substitute(text: str, default_file: str | None, where: str) -> str:
    def one(m: re.Match) -> str:
        name = m.group("file") or default_file
        if name is None:
            raise ValueError(f"docs: {where}: reference {m.group(0)!r} names no file")
        return render(name, m.group("path"), m.group("fmt"))
    return REF.sub(one, text)


def expand(template: object, variables: dict) -> object:
    if isinstance(template, str):
        def var(m: re.Match) -> str:
            if m.group(1) not in variables:
                raise KeyError(f"docs: results-table: ${{{m.group(1)}}} is not set in {variables}")
            return str(variables[m.group(1)])
        return VAR.sub(var, template)
    if isinstance(template, list):
        return [expand(t, variables) for t in template]
    return template


def table(spec: dict, where: str) -> str:
    """A Markdown table from a results-table block's YAML (see the module docstring)."""
    if not isinstance(spec, dict) or "columns" not in spec:
        raise ValueError(f"docs: {where}: a results-table block needs 'columns'")
    columns = spec["columns"]
    rows: list[tuple[str | None, list]] = [(spec.get("file"), row) for row in spec.get("rows", [])]
    for variables in spec.get("foreach", []):
        if "row" not in spec:
            raise ValueError(f"docs: {where}: 'foreach' needs a 'row' template")
        file = expand(spec.get("file"), variables) if spec.get("file") else variables.get("file")
        rows.append((file, expand(spec["row"], variables)))
    if not rows:
        raise ValueError(f"docs: {where}: a results-table block has no rows")
    lines = ["| " + " | ".join(map(str, columns)) + " |", "|" + "---|" * len(columns)]
    for file, row in rows:
        if len(row) != len(columns):
            raise ValueError(f"docs: {where}: row {row} has {len(row)} cells for {len(columns)} columns")
        cells = [substitute(str(c), file, where) for c in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:
    where = page.file.src_uri

    import yaml   # mkdocs' own dependencies; imported here so tests can use lookup() without them
    from mkdocs.exceptions import PluginError

    def block(m: re.Match) -> str:
        return table(yaml.safe_load(m.group("body")), where)

    try:
        markdown = substitute(BLOCK.sub(block, markdown), None, where)
        left = re.search(r"\{\{[^\n]{0,60}", markdown)
        if left:    # a reference the pattern did not take (a lone closing brace, a bad key path)
            raise ValueError(f"docs: {where}: unrendered reference {left.group(0)!r}")
        return markdown
    except (OSError, KeyError, ValueError, yaml.YAMLError) as e:
        raise PluginError(str(e).strip('"')) from e
