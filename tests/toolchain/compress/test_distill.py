"""The distill pass: a pruned student matched to its teacher through the trainer (one process or DDP
ranks), with the perplexity it recovers reported."""

import copy
import json

import pytest
import torch

from models.checkpoint import load_checkpoint, save_checkpoint
from models.errors import EdgesmithError
from edgesmith.cli import main
from toolchain.compress import Context, apply, parse_pass
from toolchain.compress.quality import compare
from toolchain.train.trainer import TrainConfig, train

SHORT = "steps=30,batch_size=8,seq_len=64,lr=1e-3,warmup=5,eval_tokens=4096"


@pytest.fixture(scope="module")
def teacher(trained):
    """The shared nano model trained 160 steps more: clearly better than a unigram model (val
    perplexity about 112 against the unigram's 207), so matching it takes more than token counts."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the per-test one-thread fixture
    torch.manual_seed(0)
    model = copy.deepcopy(trained.model)
    model, _ = train(model, trained.train, None, TrainConfig(steps=160, batch_size=8, seq_len=64, lr=3e-3, warmup=5,
                                                             seed=1), progress=False)
    torch.set_num_threads(before)
    return model.eval()


def context(trained, teacher):
    return Context(tokenizer=trained.tokenizer, calibration=trained.calib, reference=teacher,
                   train_tokens=trained.train, val_tokens=trained.val)


def test_distilling_a_pruned_nano_model_recovers_at_least_half_the_lost_perplexity(trained, teacher):
    # setup: remove half the KV groups (and their query heads); the teacher is the unpruned model
    ctx = context(trained, teacher)
    student = apply(copy.deepcopy(teacher), parse_pass("prune:method=heads,ratio=0.5"), ctx)
    teacher_ppl = compare(teacher, None, trained.val, 64, 4096)["perplexity"]
    pruned_ppl = compare(student, None, trained.val, 64, 4096)["perplexity"]
    assert pruned_ppl > teacher_ppl * 1.15  # pruning hurt
    # execute: the KL term only (lm_weight=0), so every bit of recovery comes from the teacher
    ctx = context(trained, teacher)
    torch.manual_seed(0)
    out = apply(student, parse_pass(f"distill:{SHORT},lm_weight=0"), ctx)
    # assert
    r = ctx.report
    after = compare(out, None, trained.val, 64, 4096)["perplexity"]
    assert r["perplexity"]["teacher"] == pytest.approx(teacher_ppl)
    assert r["perplexity"]["before"] == pytest.approx(pruned_ppl)
    assert r["perplexity"]["after"] == pytest.approx(after)
    assert r["recovered"] == pytest.approx((pruned_ppl - after) / (pruned_ppl - teacher_ppl))
    assert r["recovered"] >= 0.5
    assert r["train"]["final_loss"] < r["train"]["first_loss"] and r["train"]["world_size"] == 1
    assert (out.config.n_heads, out.config.n_kv_heads) == (2, 1)  # still the pruned architecture


def test_zeros_of_a_sparse_student_stay_zero(trained, teacher):
    # setup
    ctx = context(trained, teacher)
    student = apply(copy.deepcopy(teacher), parse_pass("prune:method=2:4"), ctx)
    zeros = {n: p.detach() == 0 for n, p in student.named_parameters() if p.dim() == 2}
    # execute
    out = apply(student, parse_pass("distill:steps=4,batch_size=4,seq_len=32,eval_tokens=1024"), ctx)
    # assert: the zeros are exactly where they were (the 2:4 pattern holds), while the weights trained
    for n, p in out.named_parameters():
        if n in zeros:
            assert torch.equal(p.detach() == 0, zeros[n]), n
    assert ctx.report["train"]["final_loss"] != ctx.report["train"]["first_loss"]
    assert ctx.report["zeros_kept"] == sum(int(z.sum()) for z in zeros.values())


def test_student_of_a_named_size_speaks_the_teachers_vocabulary(trained, teacher):
    # execute
    ctx = context(trained, teacher)
    out = apply(copy.deepcopy(teacher), parse_pass("distill:steps=3,batch_size=4,seq_len=32,eval_tokens=1024,"
                                                   "student=nano"), ctx)
    # assert: a fresh nano model, with the teacher's vocabulary and context length
    assert out.config.dim == 128 and out.config.vocab_size == 512 and out.config.max_seq_len == 256
    assert ctx.report["student"] == "nano"


def test_compress_prune_then_distill_on_two_ranks(trained, teacher, tmp_path, capfd):
    # setup
    src = save_checkpoint(teacher, trained.tokenizer, tmp_path / "teacher", {"parent": None, "passes": []})
    out = tmp_path / "student"
    # execute: --nproc 2 re-runs the command as two DDP ranks under torchrun
    rc = main(["compress", str(src), "--pass", "prune:method=heads,ratio=0.5", "--pass",
               "distill:steps=6,batch_size=4,seq_len=32,eval_tokens=2048", "--nproc", "2", "--out", str(out),
               "--data", str(trained.corpus), "--seq-len", "64", "--max-tokens", "2048"])
    # assert
    printed = capfd.readouterr()
    assert rc == 0, printed.err
    report = json.loads((out / "compress_report.json").read_text())
    prune, distill = report["passes"]
    assert distill["kind"] == "distill" and distill["report"]["train"]["world_size"] == 2
    assert distill["before"]["params"] == prune["after"]["params"] < prune["before"]["params"]
    assert distill["report"]["perplexity"]["after"] < distill["report"]["perplexity"]["before"]
    ckpt = load_checkpoint(out)
    assert ckpt.config.n_kv_heads == 1 and [p["kind"] for p in ckpt.meta["lineage"]["passes"]] == ["prune", "distill"]
    assert printed.out.count("compressed ") == 1 and "distill " in printed.out  # rank 0 prints, once


@pytest.mark.parametrize("spec, message", [
    ("distill:temperature=0", "distill: temperature=0 must be > 0"),
    ("distill:kl_weight=0,lm_weight=0", "kl_weight and lm_weight are both 0"),
    ("distill:student=huge", "distill: student='huge' is not a named size; allowed: nano, micro, small"),
    ("distill:steps=0", "distill: steps=0 must be an integer >= 1"),
    ("distill:lr=-1", "distill: lr=-1 must be > 0"),
])
def test_bad_config_is_one_clear_error(spec, message):
    with pytest.raises(EdgesmithError, match=message):
        parse_pass(spec)


def test_sequence_longer_than_the_model_and_missing_teacher_are_clear_errors(trained, teacher):
    with pytest.raises(EdgesmithError, match="distill: seq_len=512 exceeds the model's max_seq_len 256"):
        apply(copy.deepcopy(teacher), parse_pass("distill:steps=1,seq_len=512"), context(trained, teacher))
    with pytest.raises(EdgesmithError, match="distill: no teacher"):
        apply(copy.deepcopy(teacher), parse_pass("distill:steps=1"), Context(train_tokens=trained.train))
