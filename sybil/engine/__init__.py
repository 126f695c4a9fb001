"""The engine: per-slot sequences (sequence), the core whose step is plan -> draft ->
forward -> accept -> commit (core), generate() over it (generate), chunked-prefill
budget, prompt cache, round log, long-text scoring, and the one factory that turns a
configuration into loaded models and an engine (factory)."""
