"""The GPU setting as far as a CPU machine can check it: the preset validates, the launchers parse."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tcrlsd.params import SECTIONS, from_mapping, section_class
from tcrlsd.presets import apply_preset

ROOT = Path(__file__).resolve().parents[1]
GPU_PRESET = ROOT / "configs" / "gpu" / "llama3b_qwen3_4b_math.yaml"


def _validate_all(params: dict) -> dict:
    assert set(params) == set(SECTIONS), sorted(params)
    return {section: from_mapping(section_class(section), params[section], section) for section in SECTIONS}


def test_shipped_params_validate_section_by_section():
    _validate_all(yaml.safe_load((ROOT / "params.yaml").read_text()))


@pytest.mark.parametrize("run", ["grpo", "tc_rlsd_hybrid"])
def test_gpu_preset_applies_and_validates(tmp_path, run):
    params = tmp_path / "params.yaml"
    shutil.copy2(ROOT / "params.yaml", params)
    apply_preset(params, GPU_PRESET)
    apply_preset(params, ROOT / "configs" / "presets" / f"{run}.yaml")
    p = _validate_all(yaml.safe_load(params.read_text()))
    # the method note's numbers
    assert (p["generate"].samples_per_prompt, p["generate"].prompts_per_step) == (8, 1024)
    assert p["generate"].sampling.max_new_tokens == p["evaluate"].sampling.max_new_tokens == 3072
    assert p["generate"].engine.dtype == p["evaluate"].engine.dtype == "bfloat16"
    assert p["critique"].sampling.max_new_tokens == 1024
    assert (p["update"].lr, p["update"].entropy_coef, p["update"].kl_coef) == (1e-6, 1e-3, 0.0)
    assert p["update"].mini_batch_prompts == 256 and p["update"].max_tokens_per_micro_batch == 24000
    assert (p["evaluate"].samples, p["evaluate"].sampling.temperature) == (32, 0.6)
    assert p["critique"].critic == "openai" and p["critique"].chat_template_kwargs == {"enable_thinking": False}
    assert [s.name for s in p["prepare"].sources] == ["math", "math500"]
    for s in p["prepare"].sources:
        assert (ROOT / s.path).exists()


def test_launch_scripts_parse():
    for script in sorted((ROOT / "configs" / "gpu").glob("*.sh")):
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_fanout_runs_n_shards_then_the_plain_command(tmp_path):
    log = tmp_path / "calls.txt"
    stub = tmp_path / "stage.py"
    stub.write_text("import os, sys\n"
                    f"open({str(log)!r}, 'a').write(os.environ.get('CUDA_VISIBLE_DEVICES', '-') + ' ' + "
                    "' '.join(sys.argv[1:]) + '\\n')\n")
    env = dict(os.environ, GPU_LIST="4,5,6")
    subprocess.run(["bash", str(ROOT / "configs" / "gpu" / "fanout.sh"), "3", sys.executable, str(stub), "--x", "1"],
                   check=True, env=env)
    calls = log.read_text().splitlines()
    assert sorted(calls[:3]) == ["4 --x 1 --shard 0/3", "5 --x 1 --shard 1/3", "6 --x 1 --shard 2/3"]
    assert calls[3].endswith(" --x 1") and "--shard" not in calls[3]
    # a failing worker fails the whole stage
    stub.write_text("import sys\nsys.exit(3 if '--shard' in sys.argv and sys.argv[-1] == '1/2' else 0)\n")
    r = subprocess.run(["bash", str(ROOT / "configs" / "gpu" / "fanout.sh"), "2", sys.executable, str(stub)],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "a worker failed" in r.stderr


def test_deepspeed_and_torchrun_know_the_documented_flags():
    bindir = Path(sys.executable).parent
    ds = bindir / "deepspeed"
    if not ds.exists():
        pytest.skip("deepspeed launcher not installed")
    text = subprocess.run([str(ds), "--help"], capture_output=True, text=True).stdout
    for flag in ("--hostfile", "--num_nodes", "--num_gpus", "--master_addr", "--master_port"):
        assert flag in text
    text = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--help"], capture_output=True,
                          text=True).stdout
    for flag in ("--nnodes", "--nproc_per_node", "--rdzv_backend", "--rdzv_endpoint", "--standalone"):
        assert flag in text


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_cpu_twin_changes_only_sizes_and_devices_of_the_gpu_preset(tmp_path):
    """configs/cpu-twin/twin.yaml (scripts/cpu_twin.py, docs/GPU.md "CPU twin") over the GPU preset:
    it sets no key the GPU preset leaves alone, and besides numbers it changes only the devices; so
    every other flag of the GPU preset is in force in the twin."""
    gpu = _leaves(yaml.safe_load(GPU_PRESET.read_text()))
    twin = _leaves(yaml.safe_load((ROOT / "configs" / "cpu-twin" / "twin.yaml").read_text()))
    assert set(twin) <= set(gpu), sorted(set(twin) - set(gpu))
    not_sizes = {k for k, v in twin.items() if not isinstance(v, (int, list)) or isinstance(v, bool)}
    assert not_sizes == {"generate.engine.device", "evaluate.engine.device", "score.device", "update.device"}, not_sizes
    assert {twin[k] for k in not_sizes} == {"cpu"}
    # same files, fewer rows
    assert [(s["name"], s["path"]) for s in twin["prepare.sources"]] == [(s["name"], s["path"]) for s in gpu["prepare.sources"]]
    params = tmp_path / "params.yaml"
    shutil.copy2(ROOT / "params.yaml", params)
    apply_preset(params, GPU_PRESET)
    apply_preset(params, ROOT / "configs" / "cpu-twin" / "twin.yaml")
    p = _validate_all(yaml.safe_load(params.read_text()))
    assert (p["generate"].backend, p["evaluate"].backend, p["critique"].critic) == ("vllm", "vllm", "openai")
    assert p["generate"].engine.dtype == p["score"].dtype == p["update"].dtype == "bfloat16"  # kept
    assert (p["update"].rollout_is, p["update"].zero_stage, p["update"].lr) == ("token", 2, 1e-6)
