"""Export what `persllm train` trains on for other trainers: TRL, LLaMA-Factory, axolotl and OpenAI fine-tuning.

Every format carries the same records (the SFT mix with its repeats and general conversations, the held-out test set,
the DPO pairs as soon as they can be built), the same prompts (system prompt with persona and stage, temporal label,
CoT answer format) and, for the trainers, ready-to-run configs with every hyper-parameter persllm uses, the base
model's turn markers and the stage tokens declared as each tool expects. See docs/export-*.md.

The tuned model itself is exported by merge.py (base + adapter stack as one transformers checkpoint) and gguf.py
(that checkpoint as GGUF for llama.cpp and Ollama), which `persllm export --merged/--gguf` runs (import them from
their modules).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from persllm.config import Project
from persllm.export import axolotl, llamafactory, openai, trl
from persllm.export.bundle import Bundle, build_bundle, record_counts
from persllm.types import Message, PreferencePair, Sample

FORMATS = ("trl", "llamafactory", "axolotl", "openai")
_WRITERS = {"trl": trl.write, "llamafactory": llamafactory.write, "axolotl": axolotl.write, "openai": openai.write}

__all__ = ["FORMATS", "Bundle", "build_bundle", "export", "record_counts", "write"]


def write(bundle: Bundle, fmt: str, out_dir: Path) -> list[Path]:
    """Write one format of a bundle into `out_dir`; return the files."""
    if fmt not in _WRITERS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    return _WRITERS[fmt](bundle, Path(out_dir).expanduser().resolve())


def export(project: Project, samples: Sequence[Sample], pairs: Sequence[PreferencePair], fmt: str, out_dir: Path,
           general: Sequence[Sequence[Message]] | None = None) -> list[Path]:
    """Build the bundle (loads the base tokenizer and, unless given, the project's general conversations) and write
    one format; return the files."""
    if general is None:
        from persllm.general import load_general

        general = [list(record.messages) for record in load_general(project)[0]]
    return write(build_bundle(project, samples, pairs, general), fmt, out_dir)
