"""Run under torchrun by test_distributed: load a training-state checkpoint into an FSDP2-sharded model,
forward a fixed batch on every rank, and have rank 0 save the logits (safetensors)."""

import sys

import torch
from safetensors.torch import save_file

from models.llama import Transformer
from toolchain.train.launch import init_distributed, shutdown
from toolchain.train.run import resolve_model_config
from toolchain.train.state import list_states, load_state
from toolchain.train.trainer import TrainConfig, make_optimizer, wrap_model


def main(model_json: str, run_dir: str, out_file: str) -> None:
    env = init_distributed()
    cfg = TrainConfig(strategy="fsdp", batch_size=4, seq_len=32)
    model = wrap_model(Transformer(resolve_model_config(model_json)), cfg, env)
    opt, _ = make_optimizer(model, cfg)
    load_state(env, list_states(run_dir)[-1], model, opt)
    tokens = torch.arange(64).remainder(300).view(2, 32)
    with torch.no_grad():
        logits = model(tokens)
    if env.is_main:
        save_file({"logits": logits.detach().contiguous()}, out_file)
    shutdown(env)


if __name__ == "__main__":
    main(*sys.argv[1:])
