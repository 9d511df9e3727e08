"""Presets: params.yaml-shaped files in ``configs/presets/`` merged INTO params.yaml.

A preset is not a second config system: applying one rewrites the listed keys of params.yaml, so
DVC sees ordinary param changes and re-runs exactly the stages that read them.

The edit is surgical: only the text of each changed value is replaced, in place, on its own line
(the comment after it keeps its column when the new value fits); every other byte of the file
stays as it was, so ``git diff params.yaml`` shows exactly the keys the preset set. A YAML
round-trip dumper would re-wrap long lines, drop ``null``, re-indent lists and strip trailing
spaces. Line and column positions come from ruamel's round-trip loader; the result is parsed again
and must equal the old params with the preset merged in, or nothing is written.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from tcrlsd.params import ParamsError, load_yaml, merge

__all__ = ["list_presets", "apply_preset", "preset_path", "set_keys"]


def list_presets(presets_dir: str | os.PathLike) -> list[str]:
    return sorted(p.stem for p in Path(presets_dir).glob("*.yaml"))


def preset_path(name_or_path: str, presets_dir: str | os.PathLike) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    q = Path(presets_dir) / f"{name_or_path}.yaml"
    if not q.exists():
        known = ", ".join(list_presets(presets_dir)) or "(none)"
        raise ParamsError(f"no preset {name_or_path!r} in {presets_dir}; known presets: {known}")
    return q


def _flow(value) -> str:
    """One-line YAML for a value (flow style for lists and mappings)."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, sort_keys=False, allow_unicode=True)
    text = text.strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    if text.endswith("..."):
        text = text[:-3].rstrip()
    if "\n" in text:
        raise ParamsError(f"cannot write {value!r} on one line of params.yaml")
    return text


def _scalar_end(line: str, start: int) -> int:
    """Index just past the scalar that starts at ``start`` (quotes respected, comment excluded)."""
    rest = line[start:]
    if rest[:1] in ("'", '"'):
        q = rest[0]
        i = 1
        while i < len(rest):
            if rest[i] == q:
                if q == "'" and rest[i + 1:i + 2] == "'":  # '' escapes a quote in single quotes
                    i += 2
                    continue
                return start + i + 1
            if q == '"' and rest[i] == "\\":
                i += 1
            i += 1
        return len(line.rstrip("\n"))
    m = re.search(r"\s#", rest)
    end = start + (m.start() if m else len(rest.rstrip("\n")))
    while end > start and line[end - 1] in " \t":
        end -= 1
    return end


def _replace_inline(line: str, start: int, end: int, new: str) -> str:
    """Put ``new`` in place of line[start:end], keeping a following comment's column when possible."""
    tail = line[end:]
    stripped = tail.lstrip(" \t")
    if stripped.startswith("#"):
        pad = len(tail) - len(stripped)
        room = pad + (end - start) - len(new)
        tail = " " * max(room, 1) + stripped
    return line[:start] + new + tail


def _block_end(lines: list[str], first: int, indent: int) -> int:
    """One past the last line of the block value of the key on line ``first`` (at column ``indent``).

    The block holds the lines indented deeper than the key, and "- " items at the key's own column
    (YAML allows both); comment and blank lines after its last such line belong to what follows.
    """
    last = first
    for i in range(first + 1, len(lines)):
        body = lines[i].strip()
        if not body or body.startswith("#"):
            continue
        col = len(lines[i]) - len(lines[i].lstrip(" "))
        if col > indent or (col == indent and body.startswith("- ")):
            last = i
        else:
            break
    return last + 1


def set_keys(node, override: dict, lines: list[str], where: str, changes: list) -> None:
    """Edit ``lines`` (params.yaml, ruamel-loaded as ``node``) so that ``override``'s keys hold."""
    for key, value in override.items():
        if key not in node:
            raise ParamsError(f"preset sets {where}{key}, which params.yaml does not have")
        old = node[key]
        if isinstance(value, dict) and isinstance(old, dict) and old:
            # a section or a mapping with known keys: set key by key; an empty mapping (a free-form
            # option such as chat_template_kwargs: {}) is replaced as a whole below
            set_keys(old, value, lines, f"{where}{key}.", changes)
            continue
        if _plain(old) == value:
            continue
        changes.append((f"{where}{key}", _plain(old), value))
        key_line, key_col = node.lc.key(key)
        val_line, val_col = node.lc.value(key)
        if val_line == key_line and not isinstance(old, (dict, list)) or \
                (val_line == key_line and getattr(getattr(old, "fa", None), "flow_style", lambda: False)()):
            line = lines[key_line]
            end = _scalar_end(line, val_col) if not isinstance(old, (dict, list)) else _flow_end(line, val_col)
            lines[key_line] = _replace_inline(line, val_col, end, _flow(value))
        else:
            # A block value (a list of items, a nested mapping): the key line gets the new value in
            # flow style, or -- for a list -- one "- item" line per element at the old indentation.
            stop = _block_end(lines, key_line, key_col)
            key_text = lines[key_line]
            colon = key_text.index(":", key_col) + 1
            comment = key_text[colon:].strip()
            head = key_text[:colon] + ((" " + comment) if comment.startswith("#") else "")
            if isinstance(value, list) and value and isinstance(old, list) and val_line > key_line:
                item_indent = len(lines[val_line]) - len(lines[val_line].lstrip(" "))
                body = [" " * item_indent + "- " + _flow(v) + "\n" for v in value]
                lines[key_line:stop] = [head.rstrip("\n") + "\n"] + body
            else:
                lines[key_line:stop] = [key_text[:colon] + " " + _flow(value)
                                        + ((" " + comment) if comment.startswith("#") else "") + "\n"]


def _flow_end(line: str, start: int) -> int:
    """Index just past a flow collection ([...] or {...}) starting at ``start``."""
    depth, quote = 0, None
    for i in range(start, len(line)):
        ch = line[i]
        if quote:
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(line.rstrip("\n"))


def _plain(value):
    """ruamel round-trip objects -> plain Python (for comparison and messages)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    return value


def _one_key_each(override: dict, params: dict):
    """``override`` split into mappings of one key each, descending where ``set_keys`` would (into
    a mapping that params.yaml holds with keys); an empty mapping there is replaced as a whole."""
    for key, value in override.items():
        old = params.get(key) if isinstance(params, dict) else None
        if isinstance(value, dict) and value and isinstance(old, dict) and old:
            for inner in _one_key_each(value, old):
                yield {key: inner}
        else:
            yield {key: value}


def apply_preset(params_path: str | os.PathLike, preset: str | os.PathLike) -> list[tuple[str, object, object]]:
    """Write the preset's keys into ``params_path``; returns (key, old, new) for each change.

    Only keys that already exist in params.yaml may be set (a typo in a preset is an error, not a
    silently added key). Only the changed values' text is edited; the file is replaced atomically.
    """
    import yaml
    from ruamel.yaml import YAML

    params_path = Path(params_path)
    override = load_yaml(preset)
    text = params_path.read_text()
    changes: list[tuple[str, object, object]] = []
    new_text = text
    # One key at a time, re-reading the positions after each edit: an edit that changes the number of
    # lines (a list rewritten item by item) would otherwise shift every position read before it.
    for one in _one_key_each(override, yaml.safe_load(text) or {}):
        lines = new_text.splitlines(keepends=True)
        set_keys(YAML().load(new_text), one, lines, "", changes)
        new_text = "".join(lines)
    if not changes:
        return changes
    want = merge(yaml.safe_load(text) or {}, override)
    got = yaml.safe_load(new_text)
    if got != want:
        raise ParamsError(f"{params_path}: could not edit the preset's keys in place (the result would not "
                          f"parse to the merged params); edit the file by hand: {[c[0] for c in changes]}")
    fd, tmp = tempfile.mkstemp(prefix=".params.", suffix=".tmp", dir=params_path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(new_text)
        os.replace(tmp, params_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return changes
