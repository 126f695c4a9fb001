"""The command lines, on top of everything else: generate, serve, perplexity, download.
`python -m sybil.<name>` runs each."""
