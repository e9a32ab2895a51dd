"""persllm benchmarks: each measures the persllm path and its baseline in the same run (`python -m benchmarks`)."""
