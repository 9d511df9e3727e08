"""The iterations file (``iterations.yaml``, read by dvc.yaml as ``vars``): reading and appending.

Each item is ``"<id>": {k: <step>, policy: <checkpoint in>, next_policy: <checkpoint out>}``; item
i+1's ``policy`` is item i's ``next_policy``, which is what chains the iterations in one acyclic
DVC graph. Appending edits the file as text (one new line per item, the user's comments and
formatting untouched) and the result is checked by parsing it again.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from tcrlsd.errors import TcrlsdError

__all__ = ["Iteration", "IterationsError", "read_iterations", "next_items", "append_iterations", "truncate_iterations"]


class IterationsError(TcrlsdError, ValueError):
    """The iterations file is malformed or cannot be extended (the message names the item)."""


@dataclass(frozen=True)
class Iteration:
    key: str
    k: int
    policy: str
    next_policy: str


def read_iterations(path: str | os.PathLike) -> list[Iteration]:
    """The items of ``path`` in file order, checked: k counts up by 1 and each policy chains."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise IterationsError(f"{path}: not found (dvc.yaml reads the iterations from it)") from None
    items = data.get("iterations") if isinstance(data, dict) else None
    if not isinstance(items, dict) or not items:
        raise IterationsError(f"{path}: expected a mapping `iterations:` with at least one item")
    out: list[Iteration] = []
    for key, item in items.items():
        if not isinstance(item, dict) or set(item) != {"k", "policy", "next_policy"}:
            raise IterationsError(f"{path}: item {key!r} must have exactly the keys k, policy, next_policy; "
                                  f"got {item!r}")
        if not isinstance(item["k"], int):
            raise IterationsError(f"{path}: item {key!r}: k must be an integer, got {item['k']!r}")
        out.append(Iteration(str(key), item["k"], str(item["policy"]), str(item["next_policy"])))
    for prev, cur in zip(out, out[1:]):
        if cur.policy != prev.next_policy:
            raise IterationsError(f"{path}: item {cur.key!r} generates with {cur.policy!r} but the item before it "
                                  f"({prev.key!r}) writes {prev.next_policy!r}; the chain is broken")
        if cur.k != prev.k + 1:
            raise IterationsError(f"{path}: item {cur.key!r} has k = {cur.k} after k = {prev.k}; k must count up by 1")
    return out


def _bump(text: str, what: str) -> str:
    m = re.search(r"(\d+)(\D*)$", text)
    if not m:
        raise IterationsError(f"cannot number the next {what} after {text!r} (it ends without a number); "
                              "append the item by hand")
    n = m.group(1)
    return text[: m.start(1)] + str(int(n) + 1).zfill(len(n)) + m.group(2)


def next_items(items: list[Iteration], n: int) -> list[Iteration]:
    """``n`` items continuing the chain: ids, k and checkpoint names counted up from the last one."""
    if n < 1:
        raise IterationsError(f"the number of iterations to add must be >= 1, got {n}")
    out: list[Iteration] = []
    last = items[-1]
    for _ in range(n):
        nxt = Iteration(_bump(last.key, "iteration id"), last.k + 1, last.next_policy,
                        _bump(last.next_policy, "policy folder"))
        out.append(nxt)
        last = nxt
    return out


def _line(it: Iteration, indent: str) -> str:
    return f'{indent}"{it.key}": {{k: {it.k}, policy: {it.policy}, next_policy: {it.next_policy}}}\n'


def append_iterations(path: str | os.PathLike, n: int) -> list[Iteration]:
    """Append ``n`` items to the iterations file (atomically); returns them."""
    import yaml

    path = Path(path)
    items = read_iterations(path)
    new = next_items(items, n)
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    # the new lines go right after the last item's line, with its indentation
    last_idx = max(i for i, ln in enumerate(lines) if re.match(rf"""\s*["']?{re.escape(items[-1].key)}["']?\s*:""", ln))
    indent = re.match(r"\s*", lines[last_idx]).group(0)
    if not re.sub(r"\s+#.*$", "", lines[last_idx].rstrip()).endswith("}"):
        raise IterationsError(f"{path}: the last item {items[-1].key!r} is not written on one line; "
                              "append new items by hand")
    if not lines[last_idx].endswith("\n"):
        lines[last_idx] += "\n"
    lines[last_idx + 1:last_idx + 1] = [_line(it, indent) for it in new]
    new_text = "".join(lines)
    check = yaml.safe_load(new_text)["iterations"]
    if list(map(str, check))[-n:] != [it.key for it in new]:
        raise IterationsError(f"{path}: appending items did not give the expected file; append them by hand")
    from tcrlsd.artifacts import write_text

    write_text(new_text, path)
    read_iterations(path)
    return new


def truncate_iterations(path: str | os.PathLike, n: int) -> None:
    """Keep only the first ``n`` items of the iterations file (atomically), comments and all.

    Each later item must be written on one line (as ``append_iterations`` writes them)."""
    import yaml

    path = Path(path)
    items = read_iterations(path)
    if len(items) <= n:
        return
    drop = {it.key for it in items[n:]}
    lines = path.read_text().splitlines(keepends=True)
    kept = [ln for ln in lines
            if not any(re.match(rf"""\s*["']?{re.escape(k)}["']?\s*:""", ln) for k in drop)]
    new_text = "".join(kept)
    if [str(k) for k in yaml.safe_load(new_text)["iterations"]] != [it.key for it in items[:n]]:
        raise IterationsError(f"{path}: could not drop the items after the first {n}; edit it by hand")
    from tcrlsd.artifacts import write_text

    write_text(new_text, path)
