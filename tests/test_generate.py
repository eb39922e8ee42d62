"""Generation (generation/generate.py) on tiny models: the key/value cache computes what the plain path computes, also
past the context; sampling options, the end-of-text token, stop strings, streaming and seeds."""

import pytest
import torch

from tinygpt_pl.data.tokenizer import CharTokenizer, get_tokenizer
from tinygpt_pl.errors import UsageError
from tinygpt_pl.generation.generate import Completion, NextTokenLogits, Sampling, generate, stream_ids
from tinygpt_pl.model import GPT, GPTConfig

CHARS = CharTokenizer("\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(vocab_size: int = 64, **options) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0, **options)
    return GPT(config).eval()


@pytest.mark.parametrize("pos_emb", ["learned", "rotary"])
def test_cache_gives_the_plain_paths_ids_and_logits_also_past_the_context(pos_emb):
    model = tiny(pos_emb=pos_emb)
    idx = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    greedy = Sampling(temperature=0)
    cached = generate(model, idx, 30, greedy)  # 35 tokens: past block_size=16
    assert cached.shape == (2, 35) and torch.equal(cached[:, :5], idx)
    assert torch.equal(cached, generate(model, idx, 30, greedy, kv_cache=False))
    with_cache, plain = NextTokenLogits(model, kv_cache=True), NextTokenLogits(model, kv_cache=False)
    with torch.no_grad():
        for t in range(5, 36):
            expected = model(cached[:, max(0, t - 16) : t])[0][:, -1]  # the full forward pass of the cropped context
            torch.testing.assert_close(with_cache(cached[:, :t]), expected, rtol=0, atol=1e-5)
            torch.testing.assert_close(plain(cached[:, :t]), expected, rtol=0, atol=1e-5)
            if t < 35:
                assert torch.equal(cached[:, t], expected.argmax(-1))


def test_top_p_samples_only_the_nucleus_and_top_k_only_the_k_most_likely():
    probs = torch.tensor([0.05, 0.4, 0.02, 0.25, 0.13, 0.15])
    logits = probs.log().expand(4000, -1).clone()
    generator = torch.Generator().manual_seed(0)
    # sorted: 0.4, 0.25, 0.15 (0.8 before it, crossing 0.75), then 0.13 ...: the nucleus of 0.75 is ids 1, 3, 5
    drawn = Sampling(top_p=0.75).choose(logits, generator)
    assert set(drawn.flatten().tolist()) == {1, 3, 5}
    assert set(Sampling(top_p=0.35).choose(logits, generator).flatten().tolist()) == {1}
    assert set(Sampling(top_k=2).choose(logits, generator).flatten().tolist()) == {1, 3}
    assert set(Sampling(top_k=4, top_p=0.75).choose(logits, generator).flatten().tolist()) == {1, 3, 5}
    assert len(set(Sampling().choose(logits, generator).flatten().tolist())) == 6


def test_samples_follow_the_probabilities_and_the_renormalised_nucleus():
    probs = torch.tensor([0.05, 0.4, 0.02, 0.25, 0.13, 0.15])
    logits = probs.log().expand(40000, -1).clone()
    generator = torch.Generator().manual_seed(0)
    nucleus = probs * torch.tensor([0, 1, 0, 1, 0, 1]) / 0.8  # ids 1, 3, 5 (see above), renormalised
    for sampling, expected in [(Sampling(), probs), (Sampling(top_p=0.75), nucleus),
                               (Sampling(temperature=0.5), probs**2 / (probs**2).sum())]:  # fmt: skip
        drawn = sampling.choose(logits.clone(), generator).flatten()
        frequencies = torch.bincount(drawn, minlength=6) / drawn.numel()
        torch.testing.assert_close(frequencies, expected, rtol=0, atol=0.01)  # 4 standard deviations at most


def test_padding_ids_are_never_sampled():
    model = tiny()
    limited = generate(model, torch.zeros((1, 1), dtype=torch.long), 100, Sampling(temperature=3.0), vocab_limit=7,
                       generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert limited[:, 1:].max() < 7


def test_bad_sampling_options_are_refused():
    for options, message in [({"temperature": -0.5}, "temperature must be >= 0"), ({"top_p": 0.0}, r"top_p must be in"),
                             ({"top_p": 1.5}, "top_p must be in"), ({"top_k": 0}, "top_k must be >= 1")]:  # fmt: skip
        with pytest.raises(UsageError, match=message):
            Sampling(**options)


def test_stream_equals_the_whole_text_and_stop_strings_end_it():
    model = tiny(vocab_size=CHARS.vocab_size)

    def completion(seed: int, stop: tuple[str, ...] = ()) -> Completion:
        return Completion(model, CHARS, "ROMEO:", 120, Sampling(temperature=2.0), stop,
                          generator=torch.Generator().manual_seed(seed))  # fmt: skip

    whole = completion(3).result()
    assert whole.finish_reason == "length" and whole.completion_tokens == 120 and len(whole.text) == 120
    streamed = completion(3)
    pieces = list(streamed)
    assert len(pieces) == 120 and "".join(pieces) == whole.text == streamed.text  # the same seed, the same text
    assert completion(4).result().text != whole.text

    stop = (whole.text[100:103], whole.text[40:42])  # the text has the second one first
    first = min(whole.text.find(s) for s in stop)
    stopped = completion(3, stop)
    assert "".join(stopped) == stopped.text == whole.text[:first] and stopped.finish_reason == "stop"
    assert completion(3, stop).result().text == whole.text[:first]


def test_bpe_stream_holds_split_characters_and_the_end_of_text_token_stops():
    gpt2 = get_tokenizer("gpt2")
    model = tiny(vocab_size=50304)
    completion = Completion(model, gpt2, "Hello, world", 60, Sampling(), generator=torch.Generator().manual_seed(0))
    pieces = list(completion)
    prompt = torch.tensor([gpt2.encode("Hello, world")])
    ids = generate(model, prompt, 60, vocab_limit=gpt2.vocab_size, eot_id=gpt2.eot_id,
                   generator=torch.Generator().manual_seed(0))[0, prompt.size(1) :]  # fmt: skip
    assert "".join(pieces) == gpt2.decode(ids.tolist()) == completion.text
    assert all(not piece.endswith("\ufffd") for piece in pieces[:-1])  # a character's bytes come out whole

    ids = generate(model, torch.tensor([[0]]), 20, Sampling(temperature=0))[0, 1:].tolist()
    stop_at = ids.index(ids[5])  # the first time the 6th token was chosen: as if it were the end-of-text token
    stopped = list(stream_ids(model, torch.tensor([[0]]), 20, Sampling(temperature=0), eot_id=ids[5]))
    assert [t.item() for t in stopped] == ids[:stop_at]

    says_eot = tiny(vocab_size=50304, bias=True, tie_weights=False)  # logits: 0, and 64 for <|endoftext|>
    with torch.no_grad():
        says_eot.transformer.ln_f.weight.zero_()
        says_eot.transformer.ln_f.bias.fill_(1.0)
        says_eot.lm_head.weight.zero_()
        says_eot.lm_head.weight[gpt2.eot_id] = 2.0
    done = Completion(says_eot, gpt2, "", 50, Sampling(), generator=torch.Generator().manual_seed(0)).result()
    assert (done.text, done.finish_reason, done.completion_tokens, done.prompt_ids) == ("", "stop", 0, [gpt2.eot_id])
