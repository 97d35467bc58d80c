"""Pass kinds other than quantize (prune, lowrank, distill, qat), one per file, each a frozen config
plus one function registered in `models.registry.PASSES` under its file name."""
