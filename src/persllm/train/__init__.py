"""Training: SFT on personified CoT data mixed with general data, automated DPO pairs, DPO, preference accuracy.

The merged and GGUF exports of the tuned model live in persllm.export (merge.py, gguf.py). Heavy libraries (torch,
transformers, trl, peft) are imported inside the functions, so importing this package is cheap.
"""

from persllm.train.data import build_sft_records, persona_context, prompt_for, sample_messages, sample_prompt
from persllm.train.dpo import train_dpo
from persllm.train.pairs import build_pairs, pairs_by_split
from persllm.train.prefs import preference_accuracy
from persllm.train.sft import train_sft

__all__ = ["build_pairs", "build_sft_records", "pairs_by_split", "persona_context", "preference_accuracy",
           "prompt_for", "sample_messages", "sample_prompt", "train_dpo", "train_sft"]
