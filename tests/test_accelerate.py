"""`accelerate launch` with the shipped configs: two CPU processes train the tiny model through the real CLI, rank 0
alone writes each adapter, manifests are valid, and a second launch skips the finished stages on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib import resources
from pathlib import Path

import pytest

from conftest import MINIMAL_YAML, free_port, write_project
from persllm.dist import ACCELERATE_CONFIGS, accelerate_config
from persllm.workspace import Workspace, file_sha256

CONFIGS = ACCELERATE_CONFIGS

# Loaded by every Python process started with this folder on PYTHONPATH: records each final save with its rank.
SPY = '''
import os
import persllm.train._trainer as trainer

_save_final = trainer.save_final

def save_final(model, tokenizer, target, *args, **kwargs):
    with open(os.environ["PERSLLM_SAVE_LOG"], "a", encoding="utf-8") as log:
        log.write(f"{os.environ.get('RANK', '-')} {target}\\n")
    return _save_final(model, tokenizer, target, *args, **kwargs)

trainer.save_final = save_final  # finish_run, which both SFT and DPO call, looks it up there
'''


def config_path(name: str) -> Path:
    path = accelerate_config(name)
    assert path == Path(str(resources.files("persllm"))) / "configs" / "accelerate" / f"{name}.yaml"
    return path


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_load_in_accelerate(name: str) -> None:
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(config_path(name)))
    if name == "multi_cpu":
        # MULTI_GPU picks the torchrun launcher (several local processes); use_cpu keeps them on CPU with gloo
        assert config.distributed_type == DistributedType.MULTI_GPU and config.use_cpu
        assert config.num_processes == 2 and config.mixed_precision == "no"
    elif name.startswith("deepspeed"):
        assert config.distributed_type == DistributedType.DEEPSPEED
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
        assert config.deepspeed_config["zero3_init_flag"] is False  # persllm prepares the model before sharding
        assert "gradient_accumulation_steps" not in config.deepspeed_config  # "auto": from persona.yaml
    else:
        assert config.distributed_type == DistributedType.FSDP
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
        assert config.fsdp_config["fsdp_cpu_ram_efficient_loading"] is False


# Kills every rank right after the first checkpoint at step >= 2 is written, once (like a preempted job).
CRASH = '''
import os
import transformers.trainer as trainer

_save_checkpoint = trainer.Trainer._save_checkpoint

def save_checkpoint(self, model, trial):
    _save_checkpoint(self, model, trial)
    flag = os.environ.get("PERSLLM_CRASH_FLAG")
    if flag and self.state.global_step >= 2 and not os.path.exists(flag):
        self.accelerator.wait_for_everyone()
        if self.args.process_index == 0:
            open(flag, "w").close()
        os._exit(3)

trainer.Trainer._save_checkpoint = save_checkpoint
'''
SETTINGS = ("teacher: fake\nbase_model: hf:{model}\nconstruct:\n  mode: grounded\n"
            "sft:\n  batch_size: 2\n  max_steps: 4\n  save_steps: 2\n  temporal_labels: tokens\n"
            "dpo:\n  batch_size: 2\n  max_steps: 2\n  save_steps: 1\n")


def launch(project_dir: Path, site: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The documented command: accelerate launch --config_file multi_cpu.yaml -m persllm train PROJECT."""
    env = dict(os.environ, COLUMNS="200", OMP_NUM_THREADS="1", **env,
               PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path("multi_cpu")),
               "--main_process_port", str(free_port()), "-m", "persllm", "train", str(project_dir), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)


def site_dir(root: Path, code: str) -> Path:
    """A folder whose sitecustomize.py every launched Python process runs first."""
    root.mkdir()
    (root / "sitecustomize.py").write_text(textwrap.dedent(code))
    return root


def test_two_cpu_processes_train_and_rank0_writes_once(tmp_path: Path, tiny_model: Path) -> None:
    project_dir = write_project(tmp_path / "person", MINIMAL_YAML + SETTINGS.format(model=tiny_model))
    spy_dir = site_dir(tmp_path / "spy", SPY)
    log = tmp_path / "saves.log"

    result = launch(project_dir, spy_dir, PERSLLM_SAVE_LOG=str(log))
    assert result.returncode == 0, result.stderr[-4000:]
    out = project_dir / "out"
    saves = log.read_text().splitlines()
    assert saves == [f"0 {out / 'sft' / 'adapter'}", f"0 {out / 'dpo' / 'adapter'}"]  # once each, by rank 0
    ws = Workspace(out)
    for stage in ("ingest", "construct", "sft", "dpo"):
        manifest = ws.manifest(stage)
        assert manifest is not None, stage
        for rel, digest in manifest.outputs.items():  # every output is the one the manifest describes
            assert file_sha256(out / stage / rel) == digest, f"{stage}/{rel}"
    for stage, steps in (("sft", 4), ("dpo", 2)):
        stats = json.loads((out / stage / "stats.json").read_text())
        assert stats["steps"] == steps and stats["tokens"] > 0 and not stats["smoke"].get("skipped")
        assert len((out / stage / "metrics.jsonl").read_text().splitlines()) == steps
        assert (out / stage / "adapter" / "adapter_model.safetensors").is_file()
        assert not (out / stage / "checkpoints").exists()
        assert not [p for p in (out / stage).iterdir() if p.name.startswith(".")]  # no temp or scratch leftovers
    assert result.stderr.count("Summary") == 1  # rank 1 trains silently; rank 0 reports

    again = launch(project_dir, spy_dir, PERSLLM_SAVE_LOG=str(log))
    assert again.returncode == 0, again.stderr[-4000:]
    assert log.read_text().splitlines() == saves  # nothing retrained on any rank
    assert again.stderr.count("skipped (up to date)") == 4


def test_interrupted_two_process_run_resumes_from_its_checkpoint(tmp_path: Path, tiny_model: Path) -> None:
    project_dir = write_project(tmp_path / "person", MINIMAL_YAML + SETTINGS.format(model=tiny_model))
    crash_dir = site_dir(tmp_path / "crash", CRASH)
    flag = tmp_path / "crashed"
    killed = launch(project_dir, crash_dir, "--only", "sft", PERSLLM_CRASH_FLAG=str(flag))
    sft = project_dir / "out" / "sft"
    assert killed.returncode != 0 and flag.exists()
    assert (sft / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()
    assert {p.name for p in (sft / "checkpoints" / "checkpoint-2").glob("rng_state_*.pth")} == {
        "rng_state_0.pth", "rng_state_1.pth"}
    assert not (sft / "adapter").exists() and not (sft / "manifest.json").exists()

    resumed = launch(project_dir, crash_dir, "--only", "sft", PERSLLM_CRASH_FLAG=str(flag))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming from checkpoint-2" in resumed.stderr
    stats = json.loads((sft / "stats.json").read_text())
    assert stats["resumed_from_step"] == 2 and stats["steps"] == 4
    assert [json.loads(line)["step"] for line in (sft / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert Workspace(project_dir / "out").manifest("sft") is not None and not (sft / "checkpoints").exists()
