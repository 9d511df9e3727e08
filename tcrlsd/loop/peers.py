"""Peers: other trainers run by ``tcrlsd experiment`` beside the presets, from the same warm start.

A name in :data:`PEERS` given to ``--presets`` is a peer, not a preset file. Its workspace
``DIR/runs/<peer>-s<seed>/`` is prepared exactly like a run of the peer's ``preset`` (the same base
params, ``--setting``, that preset and the seed keys), so `dvc repro baseline` there restores the
same prepare and warm start from the shared DVC cache and evaluates the warm start the same way.
Then ``python -m <module> --workspace .`` trains in one process with the budget and schedule that
workspace's params.yaml gives the pipeline, evaluates each iteration's policy with the evaluate
stage and writes the rows where :func:`tcrlsd.loop.results.collect_results` reads them
(``data/summary/iterations.csv``, ``data/metrics/``), so the report treats it as one more run.

A finished peer run leaves :data:`MARKER` (written last, atomically; it records what was trained):
a rerun of the same command skips it. Without the marker -- or with one for other params or
another number of iterations -- the peer trains again from the warm start (it keeps no optimizer
state between invocations).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from tcrlsd.errors import TcrlsdError

__all__ = ["Peer", "PEERS", "MARKER", "PeerError", "params_sha256", "peer_finished", "require_peer", "peer_command"]

MARKER = "peer.json"


class PeerError(TcrlsdError, RuntimeError):
    """A peer cannot run: its package is missing, or the workspace's params ask for what it cannot do."""


@dataclass(frozen=True)
class Peer:
    """A trainer outside the pipeline (one entry of :data:`PEERS`)."""

    preset: str  # the preset its workspace is prepared with: same params, warm start, baseline evaluation
    module: str  # `python -m <module> --workspace WS` trains it and writes its rows (a front end)
    package: str  # the import it needs
    install: str  # how to get that package
    about: str  # one line for --help


# The registry: the one list of peers (the CLI's help and the experiment read it).
PEERS: dict[str, Peer] = {
    "trl_grpo": Peer(preset="grpo", module="tcrlsd.commands.trl_grpo", package="trl",
                     install='pip install -e ".[bench]"',
                     about="TRL's GRPOTrainer on the grpo workspace's budget and schedule"),
}


def params_sha256(ws: Path) -> str:
    """The digest of the workspace's params.yaml (the marker's record of what the peer trained with)."""
    return hashlib.sha256((Path(ws) / "params.yaml").read_bytes()).hexdigest()


def peer_finished(ws: Path, iterations: int) -> bool:
    """True when the workspace holds a finished peer run of ``iterations`` iterations with its params."""
    path = Path(ws) / MARKER
    if not path.is_file():
        return False
    try:
        done = json.loads(path.read_text())
    except ValueError:
        return False
    return done.get("iterations") == iterations and done.get("params_sha256") == params_sha256(ws)


def require_peer(name: str) -> Peer:
    """The peer called ``name``; a :class:`PeerError` in one line when its package is not installed."""
    peer = PEERS[name]
    if importlib.util.find_spec(peer.package) is None:
        raise PeerError(f"{name} needs the {peer.package} package, which is not installed: {peer.install}")
    return peer


def peer_command(name: str) -> list[str]:
    """The peer's command, run with the workspace as working directory."""
    return [sys.executable, "-m", PEERS[name].module, "--workspace", "."]
