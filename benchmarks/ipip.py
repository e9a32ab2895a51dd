"""IPIP-NEO-120 administration on the embedded Gemma 3 270M, CPU: persllm's one-pass option log-likelihood vs
generating an answer per item and parsing the digit (what peers do), same model, prompts and threads.

Both administer all 120 items to Ada Lovelace (1835). The baseline generates greedily in padded batches of 8 with a
16-token budget (short enough to favour it: an answer with any reasoning needs more) and counts how many answers
contain a readable 1-5 choice; the log-likelihood side always yields all 120.

    python -m benchmarks ipip
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GEN_TOKENS = 16
GEN_BATCH = 8


def run() -> list[dict[str, Any]]:
    import torch

    from persllm import template
    from persllm.backends.base import GenParams
    from persllm.backends.hf import HFBackend
    from persllm.config import load_project
    from persllm.eval import ipip
    from persllm.models import embedded_hf_dir

    torch.set_num_threads(2)
    project = load_project(REPO / "examples" / "ada-lovelace")
    stage = project.stages[0].id
    context = template.context_for(project, stage)
    prompts = ipip.choice_prompts(project.language)
    requests = [template.prompt_messages(context, question) for _, question in prompts]
    backend = HFBackend(embedded_hf_dir(), batch_size=GEN_BATCH, name="embedded")
    backend.option_logprobs(requests[:2], ipip.OPTIONS, prefix=template.RESPONSE_TAG)  # warm-up (allocations)

    started = time.perf_counter()
    logprobs = backend.option_logprobs(requests, ipip.OPTIONS, prefix=template.RESPONSE_TAG)
    loglik_seconds = time.perf_counter() - started
    assert len(logprobs) == len(prompts)

    params = GenParams(temperature=0.0, max_tokens=GEN_TOKENS, seed=0)
    started = time.perf_counter()
    texts = ["" if isinstance(r, Exception) else r.text for _, r in sorted(backend.complete_many(requests, params),
                                                                            key=lambda pair: pair[0])]
    generate_seconds = time.perf_counter() - started
    parsed = sum(ipip.parse_choice(template.visible_answer(t)) is not None for t in texts)
    backend.close()

    loglik_rate, generate_rate = len(prompts) / loglik_seconds, len(prompts) / generate_seconds
    return [{"benchmark": "IPIP-NEO-120, 120 items (items/s)", "persllm": loglik_rate, "baseline": generate_rate,
             "unit": "it/s", "ratio": loglik_rate / generate_rate, "higher_is_better": True,
             "baseline_name": f"generate {GEN_TOKENS} tokens + parse, batches of {GEN_BATCH}",
             "note": f"log-likelihood {loglik_seconds:.1f} s, 120/120 answered; generate {generate_seconds:.1f} s, "
                     f"{parsed}/120 parseable"}]


if __name__ == "__main__":
    for row in run():
        print(row)
