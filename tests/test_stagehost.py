"""The warm stage host (tcrlsd/stagehost.py): a served script behaves as its own process would.

Each test starts a real host (preloading only a light tcrlsd module, so it is quick) and runs small
scripts that call ``hand_off()`` first, as the stage scripts do. The byte-identity of a pipeline
iteration through the host is checked in tests/test_pipeline.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tcrlsd.stagehost import ENV, stage_host

LIGHT = ("tcrlsd.artifacts",)

REPORT = """\
import json, os, sys
from tcrlsd.stagehost import hand_off
hand_off()
import tcrlsd.stagehost as host
print(json.dumps({"served": host._served, "argv": sys.argv[1:], "cwd": os.getcwd(), "x": os.environ.get("X"),
                  "path0": sys.path[0], "stdin": sys.stdin.read(), "main": __name__}))
print("on stderr", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""


def _script(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _run(script: Path, env: dict, *args: str, cwd: Path | None = None, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], env=env, cwd=cwd, input=stdin, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture()
def host(tmp_path):
    with stage_host(dict(os.environ), log_path=tmp_path / "host.log", preload=LIGHT) as env:
        assert ENV in env
        yield env


def test_a_served_script_gets_its_callers_argv_cwd_environment_streams_and_status(host, tmp_path):
    script = _script(tmp_path, "report.py", REPORT)
    work = tmp_path / "work"
    work.mkdir()
    for status in (0, 3):
        out = _run(script, dict(host, X="hello"), str(status), "--flag", cwd=work, stdin="piped in")
        assert out.returncode == status, out.stderr
        got = json.loads(out.stdout)
        assert got == {"served": True, "argv": [str(status), "--flag"], "cwd": str(work), "x": "hello",
                       "path0": str(tmp_path), "stdin": "piped in", "main": "__main__"}
        assert "on stderr" in out.stderr
    # without a host in the environment the same script runs in its own process
    own = _run(script, {k: v for k, v in host.items() if k != ENV}, "0")
    assert own.returncode == 0 and json.loads(own.stdout)["served"] is False


def test_an_import_time_variable_that_differs_runs_the_script_in_its_own_process(host, tmp_path):
    script = _script(tmp_path, "report.py", REPORT)
    out = _run(script, dict(host, OMP_NUM_THREADS="7"), "0")
    assert out.returncode == 0 and json.loads(out.stdout)["served"] is False
    assert "environment differs from the host's in OMP_NUM_THREADS" in out.stderr


def test_exceptions_and_exit_values_map_to_statuses_as_the_interpreter_maps_them(host, tmp_path):
    head = "import sys\nfrom tcrlsd.stagehost import hand_off\nhand_off()\n"
    boom = _run(_script(tmp_path, "boom.py", head + "raise ValueError('bad row 7')\n"), host)
    assert boom.returncode == 1 and "Traceback" in boom.stderr and "ValueError: bad row 7" in boom.stderr
    text = _run(_script(tmp_path, "text.py", head + "sys.exit('stopped: reason')\n"), host)
    assert text.returncode == 1 and "stopped: reason" in text.stderr
    none = _run(_script(tmp_path, "none.py", head + "print('fine')\nsys.exit(None)\n"), host)
    assert none.returncode == 0 and none.stdout == "fine\n"
    # atexit functions run and unflushed output arrives (no module teardown, the rest of an exit)
    ae = _run(_script(tmp_path, "ae.py", head + "import atexit\natexit.register(lambda: print('at exit'))\n"
                      "sys.stdout.write('no newline')\n"), host)
    assert ae.returncode == 0 and ae.stdout == "no newlineat exit\n"


def _wait_line(proc, text: str) -> None:
    line = proc.stdout.readline()
    assert text in line, line + proc.stderr.read()


def test_a_signal_to_the_caller_reaches_the_stage_and_the_caller_dies_of_it(host, tmp_path):
    script = _script(tmp_path, "sleep.py", "import sys, time\nfrom tcrlsd.stagehost import hand_off\nhand_off()\n"
                                           "import tcrlsd.stagehost as h\nprint('ready', h._served, flush=True)\n"
                                           "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, str(script)], env=host, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_line(proc, "ready True")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == -signal.SIGTERM
    # Ctrl-C: KeyboardInterrupt in the stage, which dies of SIGINT as a Python process does
    proc = subprocess.Popen([sys.executable, str(script)], env=host, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_line(proc, "ready True")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == -signal.SIGINT


def test_a_caller_killed_outright_takes_its_stage_with_it(host, tmp_path):
    pidfile = tmp_path / "pid"
    script = _script(tmp_path, "sleep.py", "import os, sys, time\nfrom tcrlsd.stagehost import hand_off\nhand_off()\n"
                                           f"open({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
                                           "print('ready', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, str(script)], env=host, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_line(proc, "ready")
    stage = int(pidfile.read_text())
    assert stage != proc.pid  # it ran in the host's child
    proc.kill()
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{stage}").exists():
        status = Path(f"/proc/{stage}/status").read_text() if Path(f"/proc/{stage}/status").exists() else ""
        if "zombie" in status:
            break
        time.sleep(0.1)
    alive = Path(f"/proc/{stage}/status").exists() and "zombie" not in Path(f"/proc/{stage}/status").read_text()
    assert not alive, "the stage outlived its killed caller"


def test_tcrlsd_code_changed_on_disk_is_not_served_from_the_old_imports(tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(Path(__file__).resolve().parents[1] / "tcrlsd", pkg / "tcrlsd",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(pkg))
    script = _script(tmp_path, "report.py", REPORT)
    with stage_host(env, log_path=tmp_path / "host.log", preload=LIGHT) as served:
        assert json.loads(_run(script, served, "0").stdout)["served"] is True
        artifacts = pkg / "tcrlsd" / "artifacts.py"
        artifacts.write_text(artifacts.read_text() + "\n# edited\n")
        out = _run(script, served, "0")
        assert json.loads(out.stdout)["served"] is False
        assert "tcrlsd code changed on disk" in out.stderr


def test_the_host_stops_with_its_context_and_then_scripts_run_alone(tmp_path):
    script = _script(tmp_path, "report.py", REPORT)
    with stage_host(dict(os.environ), preload=LIGHT) as env:
        path = env[ENV]
        assert os.path.exists(path)
    assert not os.path.exists(path)
    out = _run(script, env, "0")  # a stale socket path in the environment: the script runs on its own
    assert out.returncode == 0 and json.loads(out.stdout)["served"] is False
    with stage_host(dict(os.environ), enabled=False) as plain:
        assert ENV not in plain


def test_the_same_interpreter_by_another_name_is_served(host, tmp_path):
    script = _script(tmp_path, "report.py", REPORT)
    here = Path(sys.executable)
    names = [here.parent / n for n in ("python", "python3", f"python3.{sys.version_info.minor}")]
    other = next((p for p in names if p.exists() and p.name != here.name
                  and os.path.realpath(p) == os.path.realpath(here)), None)
    if other is None:
        pytest.skip("the interpreter has no second name in its bin folder")
    # a venv's python and python3.11 are one interpreter
    out = subprocess.run([str(other), str(script), "0"], env=host, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and json.loads(out.stdout)["served"] is True, out.stderr


def test_runs_that_start_vllm_stay_off_the_host(tmp_path):
    from tcrlsd.stagehost import host_blockers

    params = tmp_path / "params.yaml"
    params.write_text("generate: {backend: transformers}\nevaluate: {backend: vllm}\n"
                      "critique: {critic: reference, self_backend: vllm}\n")
    assert host_blockers(params) == ["evaluate.backend=vllm", "critique.self_backend=vllm"]
    params.write_text("generate: {backend: transformers}\ncritique: {critic: openai}\n")
    assert host_blockers(params) == []
    assert host_blockers(tmp_path / "missing.yaml") == []
