"""The Gradio app. It only calls `toolchain`, `runtimes` and `devices`, and holds no logic of its
own. Nothing is here yet.
"""
