import pytest
import torch

from models.errors import EdgesmithError
from runtimes.generate import generate
from runtimes.sampling import GenerationConfig, sample


def _greedy_without_cache(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_with_cache_equals_full_recompute(tiny_model):
    prompt = [0, 5, 17, 200, 33]
    assert list(generate(tiny_model, prompt, GenerationConfig(max_new_tokens=20))) == \
        _greedy_without_cache(tiny_model, prompt, 20)


def test_seeded_sampling_is_deterministic(tiny_model):
    cfg = GenerationConfig(max_new_tokens=30, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    a = list(generate(tiny_model, [0, 1, 2], cfg))
    b = list(generate(tiny_model, [0, 1, 2], cfg))
    c = list(generate(tiny_model, [0, 1, 2], GenerationConfig(max_new_tokens=30, temperature=1.0, seed=8)))
    assert a == b and a != c


def test_stop_token_and_length_errors(tiny_model):
    first = next(generate(tiny_model, [0, 3], GenerationConfig(max_new_tokens=5)))
    assert list(generate(tiny_model, [0, 3], GenerationConfig(max_new_tokens=5, stop_tokens=(first,)))) == [first]
    with pytest.raises(EdgesmithError, match=r"prompt \(100 tokens\) \+ max_new_tokens \(29\) exceeds"):
        list(generate(tiny_model, [1] * 100, GenerationConfig(max_new_tokens=29)))
    with pytest.raises(EdgesmithError, match="prompt: empty"):
        list(generate(tiny_model, [], GenerationConfig()))


def test_sampling_filters():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.5])
    g = torch.Generator().manual_seed(0)
    assert sample(logits, GenerationConfig(), g) == 1
    assert {sample(logits, GenerationConfig(temperature=2.0, top_k=1), g) for _ in range(20)} == {1}
    assert {sample(logits, GenerationConfig(temperature=2.0, top_p=0.01), g) for _ in range(20)} == {1}
    top2 = {sample(logits, GenerationConfig(temperature=5.0, top_k=2), g) for _ in range(200)}
    assert top2 == {1, 2}
    # a strong repetition penalty moves greedy off the token already seen
    assert sample(logits, GenerationConfig(repetition_penalty=10.0), g, history=[1]) == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, "max_new_tokens: 0 must be >= 1"),
    ({"temperature": -1}, "temperature: -1 must be >= 0"),
    ({"top_k": 0}, "top_k: 0 must be >= 1"),
    ({"top_p": 1.5}, r"top_p: 1.5 must be in \(0, 1\]"),
])
def test_generation_config_validation(kwargs, message):
    with pytest.raises(EdgesmithError, match=message):
        GenerationConfig(**kwargs)
