"""`edgesmith generate` and `edgesmith eval` on any artifact or checkpoint, through `runtimes.load`
(in process: the CLI's `main`, as the console script calls it)."""

import re

import pytest

from edgesmith.cli import main
from toolchain.export.parity import torch_threads


def run(capsys, *args):
    with torch_threads(1):
        code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_on_an_artifact_equals_the_checkpoint_and_speculation_changes_nothing(artifact, checkpoints,
                                                                                       capsys):
    # setup
    greedy = ("--prompt", "def moving_average(values", "--temperature", 0, "--max-new-tokens", 30)
    # execute
    code_c, from_ckpt, _ = run(capsys, "generate", checkpoints["float"], *greedy)
    code_a, from_gguf, _ = run(capsys, "generate", artifact("gguf"), *greedy)
    code_s, spec, err = run(capsys, "generate", artifact("onnx"), *greedy, "--draft", artifact("gguf-q4"),
                            "--draft-tokens", 3)
    # assert
    assert code_c == code_a == code_s == 0
    assert from_ckpt.startswith("def moving_average(values") and from_gguf == from_ckpt and spec == from_ckpt
    assert re.search(r"onnxruntime \+ draft llamacpp: \d+ tokens, .* speculative k=3: acceptance \d+\.\d%", err)


def test_eval_through_an_artifact_matches_the_checkpoint(artifact, checkpoints, text_folder, capsys):
    # execute
    code_c, ckpt_out, _ = run(capsys, "eval", checkpoints["float"], "--data", text_folder, "--seq-len", 64)
    code_a, onnx_out, _ = run(capsys, "eval", artifact("onnx"), "--data", text_folder, "--seq-len", 64)
    # assert: the same figure to the printed precision, each through its own runtime
    assert code_c == code_a == 0
    ppl = re.search(r"validation perplexity (\d+\.\d+) ", ckpt_out).group(1)
    assert f"validation perplexity {ppl} " in onnx_out
    assert "windows of 64, through torch" in ckpt_out and "through onnxruntime" in onnx_out


@pytest.mark.parametrize("args, message", [
    (["--draft-tokens", "3"], "--draft-tokens: needs --draft PATH"),
    (["--max-new-tokens", "200"], "tokens) + max_new_tokens (200) exceeds the llamacpp session's max_seq_len 128"),
])
def test_generate_refuses_bad_requests_in_one_line(args, message, artifact, capsys):
    code, out, err = run(capsys, "generate", artifact("gguf"), "--prompt", "def f", *args)
    assert code == 2 and message in err and err.count("\n") == 1
