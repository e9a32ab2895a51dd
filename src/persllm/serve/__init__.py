"""An OpenAI-compatible server for personas: /v1/models, /v1/chat/completions (streaming or not) and /health.

Model ids are `<persona-slug>@<stage-id>:<variant>` (variant base, sft, dpo, or a backend spec) plus
`<persona-slug>@<stage-id>` for the best variant served (dpo > sft > base). Every request is rendered with
template.prompt_messages, so a tuned model sees exactly its training prompt. A client's system (or developer) message
is ignored: the persona prompt is owned by persllm, and the generic "You are a helpful assistant" that many clients
send would pull a tuned model out of character. The chain of thought ([Analysis]) is removed from the answer unless
the request sets `show_analysis: true` (openai client: `extra_body={"show_analysis": True}`).

Concurrency: at most `max_concurrency` generations run at once, `max_queue` more wait, and beyond that requests get
503 with Retry-After. In-process models (transformers, llama.cpp) additionally run one request at a time, since their
weights and tokenizer are shared. Backends are loaded on first use and the `max_loaded` most recently used stay
loaded; stages and personas that share weights share one loaded backend.

Bounded work per request: stop strings are few and short and matched on the visible answer (never inside the hidden
analysis, and never by the backend); a local model's prompt is counted in its tokens against its context (capped by
`max_context`), and what does not fit is OpenAI's 400 context_length_exceeded; a client that disconnects, or a
request that times out, stops its model within a token or two, and keeps its slot (and /health's `running`) until the
model has stopped. Unsupported OpenAI fields (tools, logprobs, response formats, n > 1) get a 400 naming the field.

The package by concern: `ids` (model ids), `pool` (loaded backends), `gate` (admission), `parse` (request parsing and
limits), `errors` (OpenAI-shaped errors), `job` (one generation), `responses` (chat.completion bodies and SSE),
`http` (API keys and sockets) and `app` (the FastAPI app that joins them).
"""
