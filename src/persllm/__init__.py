"""persllm: turn material about a person into a personified LLM (PersLLM: construct data, SFT + DPO, evaluate, serve).

`import persllm` stays light: heavy libraries (torch, transformers, llama.cpp) load only inside the stage that
needs them.
"""

from __future__ import annotations

__version__ = "0.1.0"

from persllm.config import Project, load_project
from persllm.errors import BackendError, ConfigError, DataError, PersllmError
from persllm.types import Message, Negative, Passage, PreferencePair, Probe, Sample

__all__ = [
    "BackendError", "ConfigError", "DataError", "Message", "Negative", "Passage", "PersllmError", "PreferencePair",
    "Probe", "Project", "Sample", "__version__", "load_project",
]
