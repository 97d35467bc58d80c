"""What a model *is*: its config, the one Llama-style decoder with a static KV cache, the
tokenizer, checkpoint I/O in the Hugging Face layout, and Hugging Face import.

`models` imports nothing else of edgesmith: every other package builds on it.
"""
