"""Data files shipped with persllm (general instructions, anachronisms)."""
