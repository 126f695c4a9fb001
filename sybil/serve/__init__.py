"""The server: the scheduler thread that owns the engine (scheduler), the OpenAI routes
that never touch a model (api, schema), metrics, streamed text, and the HTTP runner
(http). `python -m sybil.serve` runs it (sybil.cli.serve)."""
