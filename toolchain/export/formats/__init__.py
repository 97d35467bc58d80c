"""Export formats, one per file, each registering a `toolchain.export.spec.FormatSpec` in
`models.registry.FORMATS` under its file name."""
