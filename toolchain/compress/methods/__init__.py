"""Quantization methods, one per file, each a frozen config plus one function registered in
`models.registry.METHODS` under its file name (`@METHODS.register("gptq", config=GPTQ)`)."""
