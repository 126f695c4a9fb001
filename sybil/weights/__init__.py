"""Getting weights into a model: the safetensors loader and its key map (loader), Hub
downloads (download) and the GPT-2 tokenizer (tokenizer)."""
