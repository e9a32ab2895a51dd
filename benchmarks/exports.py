"""`persllm export` checked by the real tools: LLaMA-Factory and axolotl load the exported files with their own data
code and train one SFT and one DPO step from the exported configs unchanged; their labels are compared with persllm's.

    python -m benchmarks exports        # on demand (not in the default run): a few minutes on 2 CPU cores

On a tiny project (the tests' tiny Gemma3 with a tokenizer that adds <bos> like Gemma's, temporal_labels=tokens,
sft.max_steps=1 and dpo.max_steps=1 so the exported configs train one step) it checks, per tool:

- labels: every exported SFT record, tokenised by the tool's own code (LLaMA-Factory `get_dataset`, axolotl
  `load_datasets`), has the input ids and labels of persllm's own SFT path (the TRL SFTTrainer persllm builds, with
  assistant-only masks from the `{% generation %}` template), end-of-turn marker included, compared exactly (an
  assistant turn ends at its marker with no newline after it, so LLaMA-Factory's parsed assistant slot holds only the
  labelled text);
- stage tokens: every <TIME-...> in a record is one token id in the tool's tokenisation;
- counts: the tool reads as many SFT records as persllm trains on;
- training: `llamafactory-cli train` (SFT, then DPO from the SFT adapter) and `axolotl train` / `axolotl merge-lora` /
  `axolotl train` each reach global step 1.

Each tool needs a venv of its own (they pin other transformers/trl/peft versions than persllm), with the CPU torch
persllm uses pinned so pip does not swap it for a CUDA build:

    python3 -m venv /work/venvs/llamafactory
    /work/venvs/llamafactory/bin/pip install torch==2.13.0 llamafactory==0.9.5
    /work/venvs/llamafactory/bin/pip uninstall -y torchvision torchaudio  # PyPI's builds are CUDA-only, see below
    python3 -m venv /work/venvs/axolotl
    /work/venvs/axolotl/bin/pip install torch==2.13.0 axolotl==0.19.0

Other locations: PERSLLM_LLAMAFACTORY_VENV, PERSLLM_AXOLOTL_VENV. A missing venv is reported as skipped.
LLaMA-Factory imports torchaudio at the top of its multimodal module; PyPI's torchvision/torchaudio wheels are CUDA
builds whose extensions do not load against the CPU torch, so where `import torchaudio` fails the check puts an
empty stand-in module on LLaMA-Factory's path (only audio datasets would use it). PERSLLM_EXPORTS_KEEP=DIR keeps the
project, exports and tool outputs in DIR.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
VENVS = {"llamafactory": os.environ.get("PERSLLM_LLAMAFACTORY_VENV", "/work/venvs/llamafactory"),
         "axolotl": os.environ.get("PERSLLM_AXOLOTL_VENV", "/work/venvs/axolotl")}
TIMEOUT = 900  # seconds per tool command
IGNORE = -100
# No hub, no telemetry, no GPU: the check runs offline on CPU.
TOOL_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1",
            "AXOLOTL_DO_NOT_TRACK": "1", "WANDB_MODE": "disabled", "CUDA_VISIBLE_DEVICES": "",
            "TOKENIZERS_PARALLELISM": "false"}

# Run inside each tool's venv: tokenise the exported SFT data with the tool's own code, write input ids and labels.
LLAMAFACTORY_LABELS = '''
import json, sys, yaml
from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
from llamafactory.hparams import get_train_args
from llamafactory.model import load_tokenizer

def main():
    config, out, tokens = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    args = yaml.safe_load(open(config))
    args["output_dir"] = out + ".run"  # the parser checks it; nothing is trained here
    model_args, data_args, training_args, finetuning_args, _ = get_train_args(args)
    module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(module["tokenizer"], data_args)
    data = get_dataset(template, model_args, data_args, training_args, stage="sft", **module)["train_dataset"]
    ids = {t: module["tokenizer"].convert_tokens_to_ids(t) for t in tokens}
    json.dump({"rows": [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in data], "token_ids": ids},
              open(out, "w"))

if __name__ == "__main__":
    main()
'''
AXOLOTL_LABELS = '''
import json, sys

def main():
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from axolotl.loaders import load_tokenizer
    config, out, tokens = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    cfg = load_cfg(config)
    data = load_datasets(cfg=cfg).train_dataset
    tokenizer = load_tokenizer(cfg)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tokens}
    json.dump({"rows": [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in data], "token_ids": ids},
              open(out, "w"))

if __name__ == "__main__":  # axolotl's dataset code spawns workers, which re-import this file
    main()
'''


def run() -> list[dict[str, Any]]:
    """Export a tiny project, run both tools on it, compare; raise if any check fails."""
    keep = os.environ.get("PERSLLM_EXPORTS_KEEP")
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="persllm-exports-"))
    try:
        bundle, ours, out = prepare(root)
        checks: list[dict[str, Any]] = []
        for tool, runner in (("llamafactory", check_llamafactory), ("axolotl", check_axolotl)):
            python = Path(VENVS[tool]) / "bin" / "python"
            if not python.is_file():
                checks.append({"tool": tool, "check": "skipped", "ok": None,
                               "note": f"no venv at {VENVS[tool]} (see `python -m benchmarks.exports --help`)"})
                continue
            checks += runner(python, bundle, ours, out / tool, root)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    _print_checks(checks)
    failed = [c for c in checks if c["ok"] is False]
    if failed:
        raise RuntimeError("export check failed: " + "; ".join(f"{c['tool']} {c['check']}: {c['note']}"
                                                               for c in failed))
    return [_row(c) for c in checks if c["ok"] is not None]


def prepare(root: Path) -> tuple[Any, list[dict[str, list[int]]], Path]:
    """The tiny project constructed and exported (all formats), and persllm's own SFT rows (input ids, labels)."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import write_project
    from persllm import export as exporter
    from persllm.config import load_project
    from persllm.general import load_general
    from persllm.pipeline import build_dpo_pairs, run
    from persllm.workspace import Workspace
    from tiny import build_tiny_model

    os.environ.setdefault("PERSLLM_HOME", str(root / "home"))
    model = build_tiny_model(root / "tiny", bos_on_encode=True)
    (root / "project").mkdir(parents=True, exist_ok=True)
    write_project(root / "project")
    project = load_project(root / "project", overrides=[
        "teacher=fake", "construct.mode=grounded", f"base_model=hf:{model}", "sft.temporal_labels=tokens",
        "sft.max_steps=1", "dpo.max_steps=1", "dpo.sft_weight=1.0"])  # the demo presets' DPO with its LM loss
    run(project, ["ingest", "construct"])
    ws = Workspace.of(project)
    samples = ws.samples()
    pairs, _ = build_dpo_pairs(project, ws, samples)
    general = [list(r.messages) for r in load_general(project)[0]]
    bundle = exporter.build_bundle(project, samples, pairs, general)
    out = root / "export"
    for fmt in exporter.FORMATS:
        exporter.write(bundle, fmt, out / fmt)
    return bundle, persllm_rows(project, samples, general, root / "persllm-sft"), out


def persllm_rows(project: Any, samples: Any, general: Any, out_dir: Path) -> list[dict[str, list[int]]]:
    """Input ids and labels of persllm's own SFT trainer (its collator's labels), in training-record order."""
    from persllm.train.sft import prepare_sft

    run = prepare_sft(project, samples, general, out_dir, resume=False)
    trainer = run.trainer
    rows = []
    for example in trainer.train_dataset:
        batch = trainer.data_collator([example])
        rows.append({"input_ids": batch["input_ids"][0].tolist(), "labels": batch["labels"][0].tolist()})
    run.tracker.close()
    return rows


def check_llamafactory(python: Path, bundle: Any, ours: list[dict[str, list[int]]], out: Path,
                       root: Path) -> list[dict[str, Any]]:
    """LLaMA-Factory: labels from get_dataset, then `llamafactory-cli train` SFT and DPO."""
    env = _env(python, root)
    labels = _tool_labels(python, LLAMAFACTORY_LABELS, out / "llamafactory_sft.yaml", bundle, env, root)
    checks = compare("llamafactory", ours, labels, bundle)
    cli = python.parent / "llamafactory-cli"
    for stage, config in (("SFT", "llamafactory_sft.yaml"), ("DPO", "llamafactory_dpo.yaml")):
        result = _call([str(cli), "train", str(out / config)], env, out)
        checks.append(_steps("llamafactory", stage, result, out / "saves" / stage.lower()))
    return checks


def check_axolotl(python: Path, bundle: Any, ours: list[dict[str, list[int]]], out: Path,
                  root: Path) -> list[dict[str, Any]]:
    """axolotl: labels from load_datasets, then `axolotl train` SFT, `axolotl merge-lora`, `axolotl train` DPO."""
    env = _env(python, root)
    labels = _tool_labels(python, AXOLOTL_LABELS, out / "axolotl_sft.yaml", bundle, env, root)
    checks = compare("axolotl", ours, labels, bundle)
    cli = str(python.parent / "axolotl")
    sft = _call([cli, "train", str(out / "axolotl_sft.yaml"), "--launcher", "python"], env, out)
    checks.append(_steps("axolotl", "SFT", sft, out / "outputs" / "sft"))
    merge = _call([cli, "merge-lora", str(out / "axolotl_sft.yaml")], env, out)
    checks.append({"tool": "axolotl", "check": "merge-lora", "ok": merge.returncode == 0,
                   "note": "SFT adapter merged" if merge.returncode == 0 else _tail(merge)})
    dpo = _call([cli, "train", str(out / "axolotl_dpo.yaml"), "--launcher", "python"], env, out)
    checks.append(_steps("axolotl", "DPO", dpo, out / "outputs" / "dpo"))
    return checks


def compare(tool: str, ours: list[dict[str, list[int]]], theirs: dict[str, Any], bundle: Any) -> list[dict[str, Any]]:
    """Checks of a tool's SFT rows against persllm's: counts, labels (end marker included), stage tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundle.base_model)
    end = tokenizer.convert_tokens_to_ids(bundle.end_marker)
    rows = theirs["rows"]
    pool: dict[tuple[int, ...], list[dict[str, list[int]]]] = defaultdict(list)
    for row in rows:
        pool[tuple(row["input_ids"])].append(row)
    matched = equal = ended = 0
    for row in ours:
        candidates = pool.get(tuple(row["input_ids"]))
        if not candidates:
            continue
        other = candidates.pop()
        matched += 1
        labels = list(other["labels"])
        equal += labels == row["labels"]
        ended += _every_turn_ends(labels, end)
    total = len(ours)
    note = f"{equal}/{total} records equal persllm's labels, {ended}/{total} with every turn ending in {bundle.end_marker}"
    token_ids = theirs["token_ids"]
    whole = _stage_tokens_whole(rows, token_ids, bundle)
    return [
        {"tool": tool, "check": "SFT record count", "ok": len(rows) == total,
         "value": len(rows), "total": total, "note": f"{len(rows)} read, persllm trains on {total}"},
        {"tool": tool, "check": "SFT input ids", "ok": matched == total, "value": matched, "total": total,
         "note": f"{matched}/{total} records tokenised to persllm's input ids"},
        {"tool": tool, "check": "SFT labels", "ok": equal == total == ended, "value": equal, "total": total,
         "note": note},
        {"tool": tool, "check": "stage tokens whole", "ok": whole[0] == whole[1] and whole[1] > 0,
         "value": whole[0], "total": whole[1],
         "note": f"{whole[0]}/{whole[1]} stage tokens are single ids " + json.dumps(token_ids)},
    ]


def _every_turn_ends(labels: list[int], end: int) -> bool:
    """Every run of labelled tokens ends with the end-of-turn marker (and there is at least one)."""
    runs, current = [], []
    for label in [*labels, IGNORE]:
        if label == IGNORE:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return bool(runs) and all(r[-1] == end for r in runs)


def _stage_tokens_whole(rows: list[dict[str, list[int]]], token_ids: dict[str, int], bundle: Any) -> tuple[int, int]:
    """(stage tokens found as their own id in the tool's input ids, stage tokens in the exported records)."""
    expected = sum(m.content.count(t) for r in bundle.sft_train for m in r.messages for t in bundle.stage_tokens)
    found = sum(row["input_ids"].count(i) for row in rows for i in token_ids.values() if isinstance(i, int))
    return found, expected


def _tool_labels(python: Path, script: str, config: Path, bundle: Any, env: dict[str, str],
                 root: Path) -> dict[str, Any]:
    path = root / f"labels-{python.parent.parent.name}.py"
    path.write_text(textwrap.dedent(script))
    target = root / f"labels-{python.parent.parent.name}.json"
    result = _call([str(python), str(path), str(config), str(target), ",".join(bundle.stage_tokens)], env,
                   config.parent)
    if result.returncode != 0:
        raise RuntimeError(f"{python.parent.parent.name} could not tokenise {config}:\n{_tail(result)}")
    return json.loads(target.read_text())


def _env(python: Path, root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")} | TOOL_ENV
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    probe = subprocess.run([str(python), "-c", "import torchaudio"], capture_output=True, env=env, timeout=120,
                           check=False)
    if probe.returncode != 0:  # see the module docstring: an empty stand-in for LLaMA-Factory's top-level import
        stub = root / "stubs" / "torchaudio"
        stub.mkdir(parents=True, exist_ok=True)
        (stub / "__init__.py").write_text('"""Stand-in for torchaudio (audio datasets only)."""\n')
        env["PYTHONPATH"] = str(stub.parent)
    return env


def _call(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    print("  $ " + " ".join(command), flush=True)
    started = time.monotonic()
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    print(f"    rc={result.returncode} in {time.monotonic() - started:.0f} s", flush=True)
    log = cwd / f"{Path(command[0]).name}-{len(list(cwd.glob('*.log')))}.log"
    log.write_text(result.stdout + result.stderr)
    return result


def _steps(tool: str, stage: str, result: subprocess.CompletedProcess[str], output_dir: Path) -> dict[str, Any]:
    """Whether a training command finished at global step 1 (its trainer_state.json, or a checkpoint's)."""
    states = sorted(output_dir.glob("**/trainer_state.json"))
    step = max((json.loads(p.read_text()).get("global_step", 0) for p in states), default=0)
    ok = result.returncode == 0 and step >= 1
    note = f"global step {step}" if result.returncode == 0 else _tail(result)
    return {"tool": tool, "check": f"{stage} trains", "ok": ok, "value": step, "total": 1, "note": note}


def _tail(result: subprocess.CompletedProcess[str], lines: int = 15) -> str:
    return "\n".join((result.stdout + result.stderr).strip().splitlines()[-lines:])


def _print_checks(checks: list[dict[str, Any]]) -> None:
    print()
    for c in checks:
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[c["ok"]]
        print(f"{verdict}  {c['tool']:<13} {c['check']:<20} {c['note']}")


def _row(check: dict[str, Any]) -> dict[str, Any]:
    total = max(1, check.get("total", 1))
    value = check.get("value", 1 if check["ok"] else 0)
    return {"benchmark": f"export {check['tool']}: {check['check']}", "persllm": float(value),
            "baseline": float(total), "unit": "", "ratio": value / total, "higher_is_better": True,
            "baseline_name": "expected", "note": ("PASS " if check["ok"] else "FAIL ") + check["note"][:120]}


if __name__ == "__main__":
    if "--help" in sys.argv:
        print(__doc__)
    else:
        run()
