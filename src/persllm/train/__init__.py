"""Training: SFT on personified CoT data mixed with general data, automated DPO pairs, DPO, preference accuracy,
merged and GGUF exports of the tuned model.

Heavy libraries (torch, transformers, trl, peft) are imported inside the functions, so importing this package is
cheap.
"""

from persllm.train.data import build_sft_records, persona_context, prompt_for, sample_messages, sample_prompt
from persllm.train.dpo import train_dpo
from persllm.train.gguf_export import export_gguf, export_ggufs
from persllm.train.merge import merge_variant
from persllm.train.pairs import build_pairs, pairs_by_split
from persllm.train.prefs import preference_accuracy
from persllm.train.sft import train_sft

__all__ = ["build_pairs", "build_sft_records", "export_gguf", "export_ggufs", "merge_variant", "pairs_by_split",
           "persona_context", "preference_accuracy", "prompt_for", "sample_messages", "sample_prompt", "train_dpo",
           "train_sft"]
