import math

import pytest
import torch

from tinygpt_pl.generation.generate import Sampling, generate
from tinygpt_pl.model import GPT, GPTConfig


def tiny(**overrides) -> GPT:
    config = dict(vocab_size=65, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0)
    config.update(overrides)
    torch.manual_seed(0)
    return GPT(GPTConfig(**config))


def test_shapes():
    model = tiny()
    idx = torch.randint(0, 65, (3, 16))
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 65) and loss is None
    logits, loss = model(idx, idx)
    assert loss.shape == ()


def test_causal_changing_a_token_never_changes_earlier_logits():
    model = tiny(dropout=0.2).eval()
    idx = torch.randint(0, 65, (2, 16))
    t = 9
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % 65
    before, _ = model(idx)
    after, _ = model(changed)
    torch.testing.assert_close(before[:, :t], after[:, :t], rtol=0, atol=0)
    assert not torch.allclose(before[:, t:], after[:, t:])


def test_loss_at_init_is_uniform_guess():
    model = tiny(n_layer=4, n_embd=64)
    idx = torch.randint(0, 65, (8, 16))
    _, loss = model(idx, torch.randint(0, 65, (8, 16)))
    assert abs(loss.item() - math.log(65)) < 0.05


def test_ignores_padding_targets():
    model = tiny()
    idx = torch.randint(0, 65, (2, 16))
    y = torch.randint(0, 65, (2, 16))
    padded = y.clone()
    padded[:, 10:] = -1
    logits, loss = model(idx, padded)
    expected = torch.nn.functional.cross_entropy(logits[:, :10].reshape(-1, 65), y[:, :10].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_overfits_one_batch():
    model = tiny()
    x = torch.randint(0, 65, (4, 16))
    y = torch.randint(0, 65, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_lecture_model_parameter_count():
    # The lecture's final model: 6 layers, 6 heads, n_embd 384, block 256, 65 characters, tied LM head, no
    # biases. nanoGPT reports 10.65M for it, which excludes the 256 * 384 position embeddings.
    model = GPT(GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384))
    per_block = 2 * 384 + 384 * 3 * 384 + 384 * 384 + 2 * 384 * 4 * 384
    assert model.num_params() == 6 * per_block + 384 + 65 * 384 + 256 * 384 == 10_745_088
    assert round((model.num_params() - 256 * 384) / 1e6, 2) == 10.65


def test_weights_tied_and_residual_projections_scaled():
    model = GPT(GPTConfig(n_layer=8, n_embd=128, n_head=4))
    assert model.lm_head.weight is model.transformer.wte.weight
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.001
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.001


def test_generate_crops_context_and_respects_options():
    model = tiny().eval()
    idx = torch.zeros((2, 5), dtype=torch.long)
    out = generate(model, idx, 30)  # grows past block_size=16
    assert out.shape == (2, 35) and torch.equal(out[:, :5], idx)
    greedy = generate(model, idx, 10, Sampling(top_k=1))
    logits, _ = model(greedy[:, -11:-1])
    assert torch.equal(greedy[:, -1], logits[:, -1].argmax(-1))
    limited = generate(model, idx, 200, vocab_limit=7, generator=torch.Generator().manual_seed(1))
    assert limited[:, 5:].max() < 7
    a = generate(model, idx, 20, generator=torch.Generator().manual_seed(3))
    b = generate(model, idx, 20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_rejects_heads_that_do_not_divide_n_embd():
    with pytest.raises(ValueError, match="divisible"):
        GPT(GPTConfig(n_embd=30, n_head=4))


@pytest.mark.parametrize(
    "shape",
    [
        dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2, bias=False),  # the lecture's
        dict(vocab_size=50304, block_size=64, n_layer=3, n_head=4, n_embd=64, dropout=0.0, bias=True),  # GPT-2's style
    ],
)
def test_same_seed_same_initial_weights_as_nanogpt(shape: dict) -> None:
    """torch.manual_seed(s); GPT(config) draws nanoGPT's weights, bit for bit (tests/nanogpt_reference.py)."""
    from nanogpt_reference import NanoGPT

    torch.manual_seed(1337)
    ours = GPT(GPTConfig(**shape)).state_dict()
    torch.manual_seed(1337)
    reference = NanoGPT(GPTConfig(**shape)).state_dict()
    assert list(ours) == list(reference)  # the same parameters in the same order: the optimizer's order too
    for name, tensor in reference.items():
        assert torch.equal(ours[name], tensor), name
