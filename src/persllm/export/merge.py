"""Merged exports of a tuned variant: base model + its adapter stack as one transformers checkpoint (safetensors).

The merged folder is what other servers load (vLLM, TGI, transformers without PEFT) and what the GGUF export reads.
Its tokenizer carries persllm's chat template without TRL's {% generation %} markers (identical output, and parsers
other than transformers' accept it), and its generation config stops at the end-of-turn token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

from persllm import template
from persllm.config import Project
from persllm.errors import ConfigError
from persllm.variants import TUNED
from persllm.workspace import Workspace, atomic_dir, write_json

MERGED_FILE = "persllm_merged.json"


def variant_source(project: Project, variant: str) -> Path:
    """The trained result of a variant: its adapter/ (LoRA, QLoRA) or model/ (full fine-tuning) folder."""
    if variant not in TUNED:
        raise ConfigError(f"--model {variant!r}: choose sft or dpo (the base model needs no merge)")
    ws = Workspace.of(project)
    for folder, marker in ((ws.adapter_dir(variant), "adapter_config.json"), (ws.full_model_dir(variant), "config.json")):
        if (folder / marker).is_file():
            return folder
    raise ConfigError(f"no trained {variant.upper()} model in {ws.stage_dir(variant)}; run `persllm train "
                      f"{project.root}` first")


def best_variant(project: Project) -> str:
    """The most trained variant on disk: dpo, else sft."""
    for variant in reversed(TUNED):
        try:
            variant_source(project, variant)
        except ConfigError:
            continue
        return variant
    raise ConfigError(f"nothing trained yet in {project.output}; run `persllm train {project.root}` first")


def merge_variant(project: Project, variant: str, out_dir: Path) -> Path:
    """Write base + the variant's adapter stack, merged, with tokenizer and chat template into out_dir (atomically)."""
    from persllm.train._model import session

    source = variant_source(project, variant)
    with session():  # no library progress bars (library code never prints)
        model, tokenizer, base, stack = _merged(project, source)
    start, end = template.markers_for(tokenizer.get_vocab())
    tokenizer.chat_template = template.chat_template(start, end, training=False)
    meta = {"variant": variant, "persona": project.name, "base": base,
            "stack": [str(p) for p in stack], "template_version": template.VERSION, "turn_markers": [start, end],
            "temporal_labels": project.sft.temporal_labels, "keep_cot": project.sft.keep_cot}
    return _save(model, tokenizer, meta, Path(out_dir))


def _merged(project: Project, source: Path) -> tuple[Any, Any, str, list[Path]]:
    """The merged model (in the base checkpoint's precision), its tokenizer, the base, and the adapters merged."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from persllm.backends import base_model_path
    from persllm.backends.hf import adapter_stack, merge_adapters
    from persllm.models import prepare_tokenizer
    from persllm.train._model import set_stop_tokens

    full = source.name == "model"
    base = str(source) if full else base_model_path(project.base_model)
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    prepare_tokenizer(tokenizer)
    # Merging happens in fp32 (exact on CPU); the result is stored in the base checkpoint's own precision.
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if len(tokenizer) > cast(torch.Tensor, model.get_input_embeddings().weight).shape[0]:  # Tensor | Module in stubs
        model.resize_token_embeddings(len(tokenizer))
    stack = [] if full else adapter_stack(source)
    model = merge_adapters(model, stack)
    model = model.to(_stored_dtype(AutoConfig.from_pretrained(base)))
    set_stop_tokens(model, tokenizer)
    return model, tokenizer, base, stack


def _stored_dtype(config: Any) -> Any:
    """The dtype a checkpoint was saved in (fp32 when it does not say or says something unusual)."""
    import torch

    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def _save(model: Any, tokenizer: Any, meta: dict[str, Any], out_dir: Path) -> Path:
    """save_pretrained into a temp folder beside out_dir, then move it into place."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / MERGED_FILE, meta)
    return out_dir


def merged_meta(merged_dir: Path) -> dict[str, Any]:
    """persllm_merged.json of a merged folder ({} for checkpoints persllm did not merge)."""
    path = Path(merged_dir) / MERGED_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
