"""SFT training throughput on the embedded Gemma 3 270M (262k vocabulary), CPU: persllm's train_sft vs a plain TRL
SFTTrainer script with the same records, model, LoRA, batch, max_length, seed and steps (and TRL with packing).

Each trainer runs in its own subprocess (persllm's CPU patch is process-wide and must not leak into the baseline);
1 warm-up step is excluded, then MEASURED optimizer steps are timed with a callback and the real (non-padding)
tokens they saw are counted.

    python -m benchmarks training
    python -m benchmarks.training --worker trl      # one side alone, prints its JSON
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WARMUP = 1
MEASURED = 6
BATCH = 4
MAX_LENGTH = 256
THREADS = 2
WORKERS = ("persllm", "trl", "trl-packing")

PERSONA_YAML = """\
name: Marie Curie
language: en
stages:
  - id: paris
    label: "1898"
    description: A physicist in Paris, working on radioactivity with Pierre.
    knowledge: knowledge.txt
    style: style.txt
sft:
  batch_size: {batch}
  max_length: {max_length}
  max_steps: {steps}
  repeat: 1
  general_ratio: 0.25
  save_steps: 100000
"""
TOPICS = ["radium", "polonium", "the shed on rue Lhomond", "pitchblende", "Pierre", "the Sorbonne", "Warsaw",
          "my daughters", "the Nobel committee", "electrometers"]


def samples() -> list[Any]:
    """40 persona samples of ~100-200 tokens after templating (the reference measurement's range)."""
    from persllm.types import Sample

    out = []
    for i in range(40):
        topic = TOPICS[i % len(TOPICS)]
        out.append(Sample(
            id=f"s{i}", persona="marie-curie", stage="paris", time_label="1898", kind="ordinary",
            question=f"What do you remember about {topic}, and why did it matter to you in those years?",
            analysis=(f"The question is about {topic}. I answer from what I know in 1898, in my own voice, "
                      "without claiming later discoveries. " * (1 + i % 3)).strip(),
            response=(f"{topic.capitalize()} was part of every day of my work: we measured, we failed, and we "
                      "measured again until the numbers agreed. " * (1 + i % 2)).strip(),
            seed_id=f"p{i}", split="train"))
    return out


def general() -> list[list[Any]]:
    """A few general conversations (persllm mixes them in; both trainers get the same mixed records)."""
    from persllm.types import Message

    return [[Message("user", f"Give me {n} tips for a quiet evening."),
             Message("assistant", " ".join(f"Tip {k}: put the work away and read." for k in range(1, n + 1)))]
            for n in range(2, 6)]


def project(root: Path) -> Any:
    """The benchmark persona project on the embedded default model."""
    from persllm.config import load_project

    root.mkdir(parents=True, exist_ok=True)
    (root / "persona.yaml").write_text(PERSONA_YAML.format(batch=BATCH, max_length=MAX_LENGTH,
                                                           steps=WARMUP + MEASURED), encoding="utf-8")
    (root / "knowledge.txt").write_text("Marie Curie discovered polonium and radium with Pierre Curie.\n")
    (root / "style.txt").write_text("We must believe that we are gifted for something.\n")
    return load_project(root)


def records(proj: Any, tokenizer: Any) -> list[dict[str, Any]]:
    """Exactly the records persllm trains on (same mix, shuffle and length filter)."""
    from persllm.train.data import build_sft_records
    from persllm.train.sft import drop_too_long

    built, _ = build_sft_records(proj, samples(), general())
    return drop_too_long(built, tokenizer, MAX_LENGTH)[0]


def step_timer() -> Any:
    """A TrainerCallback recording each optimizer step's wall time and the input tokens seen so far."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[tuple[float, float, int]] = []  # (start, end, tokens seen at end)
            self._start = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.steps.append((self._start, time.perf_counter(), int(state.num_input_tokens_seen)))

    return Timer()


def summarize(timer: Any) -> dict[str, Any]:
    """Tokens/s over the measured steps (warm-up excluded), and each measured step's seconds."""
    steps = timer.steps
    measured = steps[WARMUP:]
    durations = [end - start for start, end, _ in measured]
    tokens = measured[-1][2] - steps[WARMUP - 1][2] if WARMUP else measured[-1][2]
    return {"steps": len(measured), "seconds": sum(durations), "tokens": tokens,
            "tokens_per_second": tokens / sum(durations), "seconds_per_step": sum(durations) / len(measured),
            "step_seconds": [round(d, 3) for d in durations]}


def median_step_speedup(ours: dict[str, Any], other: dict[str, Any]) -> float:
    """Median over steps of the baseline's step time over persllm's: both see the same batch at each step, and on a
    shared machine the median of paired ratios shrugs off a few steps slowed by other jobs."""
    import statistics

    return statistics.median(b / a for a, b in zip(ours["step_seconds"], other["step_seconds"], strict=False))


# -- workers (one per subprocess) ---------------------------------------------------------------------------------
def run_persllm(workdir: Path) -> dict[str, Any]:
    """persllm's train_sft: CPU fast-loss patch, assistant-only loss, denormals flushed."""
    from persllm.train.sft import train_sft

    proj = project(workdir / "persona")
    timer = step_timer()
    stats = train_sft(proj, samples(), general(), workdir / "sft", callbacks=[timer])
    return summarize(timer) | {"fast_cpu_loss": stats["fast_cpu_loss"]}


def run_trl(workdir: Path, packing: bool) -> dict[str, Any]:
    """What a user would write with TRL alone: same records, LoRA, batch, max_length, seeds, assistant-only loss."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from persllm.models import embedded_hf_dir

    base = str(embedded_hf_dir())
    tokenizer = AutoTokenizer.from_pretrained(base)  # carries persllm's chat template, like persllm's own run
    proj = project(workdir / "persona")
    data = records(proj, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    args = SFTConfig(output_dir=str(workdir / "trl"), per_device_train_batch_size=BATCH, max_length=MAX_LENGTH,
                     max_steps=WARMUP + MEASURED, learning_rate=2e-4, seed=proj.seed, data_seed=proj.seed, bf16=False,
                     use_cpu=True, gradient_checkpointing=False, assistant_only_loss=True,
                     eos_token="<end_of_turn>", packing=packing, save_strategy="no", report_to="none",
                     logging_steps=1, disable_tqdm=True, include_num_input_tokens_seen="non_padding")
    timer = step_timer()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(data), processing_class=tokenizer,
                         peft_config=lora, callbacks=[timer])
    trainer.train()
    return summarize(timer) | {"records": len(data)}


def worker(name: str) -> dict[str, Any]:
    """Run one side in this process."""
    import torch

    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        if name == "persllm":
            return run_persllm(Path(tmp))
        return run_trl(Path(tmp), packing=name == "trl-packing")


def measure(name: str) -> dict[str, Any]:
    """One side in a fresh subprocess; {"error": ...} if it failed."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(THREADS))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.training", "--worker", name], capture_output=True,
                          text=True, env=env, cwd=Path(__file__).resolve().parent.parent)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1]) | {"wall_seconds": round(time.monotonic() - started, 1)}


def run() -> list[dict[str, Any]]:
    results = {name: measure(name) for name in WORKERS}
    for name, result in results.items():
        print(f"  {name}: {json.dumps(result)}", flush=True)
    ours, rows = results["persllm"], []
    if "error" in ours:
        raise RuntimeError(f"persllm training failed: {ours['error']}")
    for name, label in (("trl", "plain TRL SFTTrainer"), ("trl-packing", "TRL SFTTrainer, packing=True")):
        other = results[name]
        if "error" in other:
            rows.append({"benchmark": f"SFT tokens/s, 270M CPU, vs {name}", "persllm": ours["tokens_per_second"],
                         "baseline": float("nan"), "unit": "t/s", "ratio": float("nan"), "higher_is_better": True,
                         "baseline_name": label, "note": f"baseline failed: {other['error']}"})
            continue
        note = (f"{MEASURED} steps after {WARMUP} warm-up, batch {BATCH}, max_length {MAX_LENGTH}, LoRA r16 "
                f"all-linear; {ours['seconds_per_step']:.1f} vs {other['seconds_per_step']:.1f} s/step; tokens "
                f"{ours['tokens']} vs {other['tokens']}")
        if name == "trl":
            note += f"; median same-batch step speedup {median_step_speedup(ours, other):.2f}x"
        else:
            note += "; TRL packs the same records into fewer, fuller rows; persllm does not pack"
        kind = "vs TRL packing" if name == "trl-packing" else "same data"
        rows.append({"benchmark": f"SFT tokens/s, 270M CPU, {kind}",
                     "persllm": ours["tokens_per_second"], "baseline": other["tokens_per_second"], "unit": "t/s",
                     "ratio": ours["tokens_per_second"] / other["tokens_per_second"], "higher_is_better": True,
                     "baseline_name": label, "note": note})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", choices=WORKERS, required=True)
    print(json.dumps(worker(parser.parse_args().worker)), flush=True)


if __name__ == "__main__":
    main()
