"""What transforms a model: data, training, compression passes, export, evaluation, recipes,
the pipeline, reports and the CLI.

May import `models`, `kernels`, `runtimes` and `devices`; never imports `gui`.
"""
