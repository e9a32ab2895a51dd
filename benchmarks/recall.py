"""Trained-fact recall: ask a tuned model its own training questions, verbatim, and count the answers that name a
fact of the golden answer (a name or year the question does not give), with a Wilson interval.

The probes ask about trained facts in eval's own wording; this asks in training's wording. A model that fails both
has not learnt the facts (underfit); one that passes this and fails the probes has memorised wordings. Run by
`python -m benchmarks.recipe` for each candidate, or alone:

    python -m benchmarks.recall examples/ada-lovelace --output /tmp/recipe/ada-lovelace/demo/out --preset demo
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

LIMIT = 40  # questions per model: about a minute of greedy decoding each on 2 cores


def fact_terms(question: str, answer: str, ref: Any) -> list[str]:
    """Names and years of a golden answer that its question does not give: what a recalled answer must name."""
    from persllm.construct import facts as F
    from persllm.eval.probes import contains

    return [t for t in F.entities(answer, ref) + F.years(answer) if not contains(question, t)]


def recalled(answer: str, question: str, terms: Sequence[str]) -> bool:
    """The answer is a real answer (not garbage) and names at least one of the fact's terms."""
    from persllm.eval.probes import contains, garbage

    return any(contains(answer, t) for t in terms) and not garbage(answer, question)


def answers(results: Iterable[tuple[int, Any]], model: str) -> dict[int, str]:
    """Answer texts by request index; a request the backend failed stops the measurement (a failure is not an
    answer that missed the fact)."""
    from persllm.errors import BackendError

    texts = {}
    for i, result in results:
        if isinstance(result, BackendError):
            raise SystemExit(f"recall: model {model!r} failed on question {i + 1}: {result}; fix the model or its "
                             "backend and rerun (nothing was written)")
        texts[i] = result.text
    return texts


def measure(example: Path, output: Path, preset: str, models: Sequence[str] = ("sft", "dpo"),
            limit: int = LIMIT) -> dict[str, Any]:
    """Recall of each model over up to `limit` training ordinary questions whose golden answer names a fact."""
    from persllm import variants
    from persllm.backends.base import GenParams
    from persllm.config import load_project
    from persllm.construct import facts as F
    from persllm.eval.generate import persona_messages
    from persllm.eval.metrics import rate_ci

    project = load_project(example, overrides=[f"output_dir={output}"], preset=preset)
    ref = F.persona_ref(project.name, project.language, [], project.aliases)
    rows = [json.loads(line) for line in (output / "construct" / "samples.jsonl").read_text("utf-8").splitlines()]
    asks = [(s, terms) for s in rows if s["split"] == "train" and s["kind"] == "ordinary"
            and (terms := fact_terms(s["question"], s["response"], ref))]
    random.Random(project.seed).shuffle(asks)  # a fixed subset, the same for every candidate on the same data
    asks = asks[:limit]
    out: dict[str, Any] = {"n": len(asks), "models": {}}
    params = GenParams(temperature=0.0, max_tokens=project.eval.max_new_tokens)
    requests = [list(persona_messages(project, s["stage"], s["question"])) for s, _ in asks]
    for model in models:
        backend = variants.open_variant(project, model)
        try:
            texts = answers(backend.complete_many(requests, params), model)
        finally:
            backend.close()
        hits = [recalled(texts.get(i, ""), s["question"], terms) for i, (s, terms) in enumerate(asks)]
        out["models"][model] = {**rate_ci(sum(hits), len(hits)).as_dict(), "passed": sum(hits),
                                "examples": [{"question": s["question"], "terms": terms, "answer": texts.get(i, ""),
                                              "recalled": hit} for i, ((s, terms), hit) in
                                             enumerate(zip(asks, hits, strict=True))]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("example", type=Path, help="the persona's project folder")
    parser.add_argument("--output", type=Path, required=True, help="the run's output folder (with construct, sft, dpo)")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--models", default="sft,dpo")
    parser.add_argument("--limit", type=int, default=LIMIT)
    parser.add_argument("--json", type=Path, help="write the result here as well")
    args = parser.parse_args()
    result = measure(args.example, args.output, args.preset, [m for m in args.models.split(",") if m], args.limit)
    for model, r in result["models"].items():
        print(f"{model}: {r['passed']}/{r['n']} trained facts recalled")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
