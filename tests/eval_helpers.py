"""Builders for eval tests: a workspace with ingest and construct outputs written by hand, and a tiny LoRA adapter."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import MINIMAL_YAML
from persllm.config import Project
from persllm.ingest import ingest
from persllm.types import Passage, Sample, to_record
from persllm.workspace import Workspace, write_jsonl

# The shared two-stage test persona on a local model and a fake teacher, with a small eval section.
TINY_YAML = MINIMAL_YAML.replace("stages:\n", "base_model: hf:{model}\nteacher: fake\noutput_dir: out\nstages:\n", 1) + """\
eval:
  models: [base]
  max_probes: 10
  max_new_tokens: 8
  heldout_questions: 3
  ipip_interview_items: 2
  judge_items: 2
  judge_repeats: 2
  judge_retries: 1
  target_from_teacher: true
"""


def samples_for(passages: list[Passage]) -> list[Sample]:
    """Train and test samples per stage: ordinary (knowledge and style seeds), opinion, and an after_time premise."""
    out = []
    for stage, label in (("early", "1900"), ("late", "1930")):
        know = [p for p in passages if p.stage == stage and p.kind == "knowledge"]
        style = [p for p in passages if p.stage == stage and p.kind == "style"]
        def sample(i: int, kind: str, question: str, seed: Passage, split: str, stage: str = stage, label: str = label,
                   **meta: object) -> Sample:
            response = re.sub(r"\b(She|she)\b", "I", seed.text)
            return Sample(f"p/{stage}-{kind}-{i}", "test-person", stage, label, kind, question, "analysis",
                          response, seed.id, split=split, meta=dict(meta))
        out += [sample(0, "ordinary", "What did you build?", know[1], "test"),
                sample(1, "ordinary", "What do you think about engineering?", style[3], "test"),
                sample(2, "opinion", "I think machines are wonderful.", style[0], "test", stance="agree"),
                sample(3, "induced", "Tell me how the Internet changed your daily life.", know[0], "test",
                       premise="after_time", thing="the Internet", year=1983),
                sample(4, "ordinary", "Where did you live?", know[3], "train"),
                sample(5, "induced", "What do you think of the telephone?", know[2], "train",
                       premise="after_time", thing="the telephone", year=1876)]
    return out


def prepare_workspace(project: Project) -> Workspace:
    """Write ingest passages and hand-made construct samples into the project's workspace."""
    ws = Workspace.of(project)
    passages, _ = ingest(project)
    write_jsonl(ws.stage_dir("ingest") / "passages.jsonl", (to_record(p) for p in passages))
    write_jsonl(ws.stage_dir("construct") / "samples.jsonl", (to_record(s) for s in samples_for(passages)))
    return ws


def make_adapter(model_dir: Path, out: Path) -> Path:
    """Save a randomly initialised LoRA adapter for the tiny model (B is non-zero so it changes the outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft.save_pretrained(str(out))
    return out
