"""The module swap: `kernels.fuse_` puts fused subclasses into one model and nothing else, `unfuse_`
undoes it exactly, two models in one process run their own ops even from two threads at once (and a
test's implementation override stays in its thread), and a tracing exporter refuses a fused model in
one line."""

import copy
import threading

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from kernels import cpu, modules, ops, reference
from models.errors import EdgesmithError
from models.quant import Int8KVAttention, quantize_embedding_, quantize_linear_
from toolchain.export.formats.executorch import export_program


class OpRecorder(TorchDispatchMode):
    """Names of the ops dispatched in the thread that entered it (dispatch modes are thread-local)."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func._schema.name)
        return func(*args, **(kwargs or {}))


def edgesmith_ops(names: set[str]) -> set[str]:
    return {n for n in names if n.startswith("edgesmith::")}


def variant_model(tiny_model):
    """Every kind of module the table swaps: quantized MLP, an int8-KV attention, a tied quantized head."""
    quantize_linear_(tiny_model, 4, 32, include=lambda n: "mlp" in n)
    attn = tiny_model.layers[0].self_attn
    tiny_model.layers[0].self_attn = Int8KVAttention(attn, torch.full((2,), 0.05), torch.full((2,), 0.05))
    tiny_model.lm_head.weight = tiny_model.embed_tokens.weight
    quantize_embedding_(tiny_model, 8, 32)  # ties the head to the quantized table
    return tiny_model


def test_fuse_swaps_the_layers_in_place_and_unfuse_undoes_it(tiny_model):
    # setup
    model = variant_model(tiny_model)
    tokens = torch.randint(0, model.config.vocab_size, (1, 9))
    state = {k: v.data_ptr() for k, v in model.state_dict().items()}
    classes = {n: type(m) for n, m in model.named_modules()}
    with torch.inference_mode():
        before = model(tokens)
        # execute
        fused_out = kernels.fuse_(model)(tokens)
        names = kernels.fused_modules(model)
        fused_state = {k: v.data_ptr() for k, v in model.state_dict().items()}
        after = kernels.fuse_(model, "reference")(tokens)
    # assert: every layer of the table, the same tensors under the same names, and back bit for bit
    assert set(names) == {n for n, c in classes.items() if c in modules.FUSED}
    assert {"layers.0.self_attn", "layers.1.self_attn", "layers.1", "norm", "lm_head",
            "layers.1.mlp.down_proj", "layers.0.post_attention_layernorm"} <= set(names)
    assert fused_state == state
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert kernels.fused_modules(model) == []
    assert torch.equal(before, after)
    torch.testing.assert_close(fused_out, before, rtol=1e-5, atol=1e-5)


def test_fused_module_classes_subclass_the_plain_ones(tiny_model):
    kernels.fuse_(tiny_model)
    for name in kernels.fused_modules(tiny_model):
        m = tiny_model.get_submodule(name)
        assert isinstance(m, modules.PLAIN[type(m)]), name


def test_a_block_with_another_norm_keeps_its_own_forward(tiny_model):
    # setup: a variant the table does not know in one block
    tiny_model.layers[1].post_attention_layernorm = nn.LayerNorm(tiny_model.config.dim)
    tokens = torch.randint(0, tiny_model.config.vocab_size, (1, 7))
    with torch.inference_mode():
        before = tiny_model(tokens)
        # execute
        kernels.fuse_(tiny_model)
        fused = tiny_model(tokens)
    # assert: its block stays plain (it calls the LayerNorm), the rest is fused
    names = kernels.fused_modules(tiny_model)
    assert "layers.1" not in names and "layers.1.post_attention_layernorm" not in names
    assert "layers.0" in names and "layers.1.mlp" in names
    torch.testing.assert_close(fused, before, rtol=1e-5, atol=1e-5)


def test_two_models_in_two_threads_run_their_own_ops(tiny_model):
    # setup: the same weights twice, one fused; each decodes with its own cache
    plain = tiny_model
    fused = kernels.fuse_(copy.deepcopy(plain))
    tokens = torch.randint(0, plain.config.vocab_size, (1, 12))

    def run(model):
        model.setup_cache(1, 32)
        with torch.inference_mode():
            out = [model(tokens[:, :8], torch.arange(8))]
            out += [model(tokens[:, i:i + 1], torch.tensor([i])) for i in range(8, 12)]
        return torch.cat([o[:, -1] for o in out])

    alone = {"plain": run(plain), "fused": run(fused)}
    results, seen, errors = {}, {}, []
    start = threading.Barrier(2)

    def worker(key, model):
        try:
            start.wait()
            with OpRecorder() as rec:
                results[key] = [run(model) for _ in range(5)]
            seen[key] = rec.names
        except BaseException as e:  # re-raised in the main thread below
            errors.append(e)

    # execute
    threads = [threading.Thread(target=worker, args=(k, m)) for k, m in (("plain", plain), ("fused", fused))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    # assert: each thread saw only its model's ops, and got what its model gives alone, bit for bit
    assert not errors, errors
    assert edgesmith_ops(seen["plain"]) == set()
    assert {"edgesmith::rms_norm", "edgesmith::add_rms_norm", "edgesmith::rope_", "edgesmith::swiglu",
            "edgesmith::flash_attention", "edgesmith::decode_attention"} <= edgesmith_ops(seen["fused"])
    assert {"aten::scaled_dot_product_attention", "aten::silu"} <= seen["plain"]
    assert not {"aten::scaled_dot_product_attention", "aten::silu", "aten::rsqrt"} & seen["fused"]
    for key in ("plain", "fused"):
        assert all(torch.equal(r, alone[key]) for r in results[key]), key
    torch.testing.assert_close(alone["fused"], alone["plain"], rtol=1e-5, atol=1e-5)


def test_a_tracing_exporter_refuses_a_fused_model_in_one_line(tiny_model):
    # setup
    kernels.fuse_(tiny_model)
    # execute / assert
    with pytest.raises(EdgesmithError) as e:
        export_program(tiny_model, "fp32", 32)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("executorch: the model runs fused kernels (layers.0, layers.0.input_layernorm, "
                              "layers.0.self_attn and ")
    assert "kernels.unfuse_(model)" in message
    kernels.refuse_fused(kernels.unfuse_(tiny_model), "executorch")  # a plain model passes


def test_an_implementation_override_stays_in_its_thread():
    # setup
    x, inside, outside = torch.zeros(2), threading.Event(), threading.Event()
    seen = {}

    def forced():
        with ops.override("reference"):
            seen["thread"] = ops.impl_for(x)
            inside.set()
            outside.wait(timeout=60)

    # execute: the main thread asks while the other thread holds its override
    t = threading.Thread(target=forced)
    t.start()
    inside.wait(timeout=60)
    seen["main"] = ops.impl_for(x)
    outside.set()
    t.join(timeout=60)
    # assert
    assert seen["thread"] is reference
    assert seen["main"] is (cpu if cpu.available() else reference)


@pytest.mark.skipif(not cpu.available(), reason="fused CPU library unavailable")
@pytest.mark.parametrize("bits", [4, 8])
def test_joint_projections_equal_the_separate_kernel_calls(tiny_model, bits):
    # setup: a quantized, fused model; one decode-step input per layer
    quantize_linear_(tiny_model, bits, 32, include=lambda n: "layers" in n)
    kernels.fuse_(tiny_model)
    attn, mlp = tiny_model.layers[0].self_attn, tiny_model.layers[0].mlp
    x = torch.randn(1, 1, tiny_model.config.dim)
    with torch.inference_mode():
        # execute: one kernel call each for q/k/v and gate/up, then one op call per Linear (as under a trace)
        q, k, v = attn.project(x)
        gate, up = mlp.gate_up(x)
        with OpRecorder() as rec:  # a dispatch mode: the modules go through torch.ops, one Linear at a time
            q1, k1, v1 = attn.project(x)
            gate1, up1 = mlp.gate_up(x)
    # assert: the same kernel rows, bit for bit; the joint packing is cached on the module and unfuse drops it
    assert edgesmith_ops(rec.names) == {"edgesmith::weight_only_matmul"}
    for joint, alone in ((q, q1), (k, k1), (v, v1), (gate, gate1), (up, up1)):
        assert torch.equal(joint, alone)
    assert cpu.JOINT_CACHE in attn.__dict__ and cpu.JOINT_CACHE in mlp.__dict__
    kernels.unfuse_(tiny_model)
    assert cpu.JOINT_CACHE not in attn.__dict__


@pytest.mark.skipif(not cpu.available(), reason="fused CPU library unavailable")
def test_joint_packing_follows_the_codes(tiny_model):
    # setup
    quantize_linear_(tiny_model, 4, 32, include=lambda n: "mlp" in n)
    kernels.fuse_(tiny_model)
    mlp = tiny_model.layers[0].mlp
    x = torch.randn(1, tiny_model.config.dim)
    before = mlp.gate_up(x)[0]
    # execute: the canonical codes change in place; the cached joint packing must not go stale
    with torch.no_grad():
        mlp.gate_proj.qweight.neg_().clamp_(-8, 7)
    after = mlp.gate_up(x)[0]
    # assert
    expected = reference.weight_only_matmul(x, mlp.gate_proj.qweight, mlp.gate_proj.scales, 4)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)
