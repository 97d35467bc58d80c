"""Training: the trainer (trainer.py; one process, DDP or FSDP2 ranks through torchrun, launch.py),
exact-resume state checkpoints (state.py), LoRA/QLoRA (lora.py), and the `train` / `finetune`
commands (run.py, finetune.py)."""
