"""Continuous batching (generation/batch.py) on tiny models: completions that join at different steps, at different
positions, advance in one forward pass per step and get the text each gets alone; slots are freed and reused."""

import pytest
import torch
from test_generate import CHARS

from tinygpt_pl.generation.batch import Batch, Cancel
from tinygpt_pl.generation.generate import Completion, Sampling
from tinygpt_pl.model import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(pos_emb: str) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0, pos_emb=pos_emb)
    return GPT(config).eval()


PROMPTS = ["ROMEO:", "A", "JULIET:\nO Romeo, Romeo", "KING", "First Citizen:\nBefore we proceed any", "QUEEN"]


def completion(model: GPT, i: int) -> Completion:
    """Greedy and sampled with a seed, with and without a stop string, short and past the context (block_size 32)."""
    sampling = Sampling(temperature=0.9 * (i % 2), top_p=0.9 if i % 3 else 1.0)
    return Completion(model, CHARS, PROMPTS[i], 12 + 5 * i, sampling, stop=["\n\n"] if i == 2 else (),
                      generator=torch.Generator().manual_seed(i))  # fmt: skip


@pytest.mark.parametrize("pos_emb", ["learned", "rotary"])
def test_completions_joining_at_different_steps_get_their_text_alone_in_one_forward_pass_per_step(pos_emb):
    model = tiny(pos_emb)
    alone = [completion(model, i).result() for i in range(len(PROMPTS))]
    batch = Batch(model, max_size=8, timeout=None)
    passes = []  # per step, each forward pass's positions of its rows' last tokens
    hidden_states = model.hidden_states

    def counted(idx, caches=None, positions=None, mask=None):
        if positions is None:  # one completion: a prompt, a decode step, or a moved window (run without caches, from 0)
            passes[-1].append([caches[0].length if caches else 0])
        else:
            passes[-1].append(positions[:, -1].tolist())
        return hidden_states(idx, caches, positions, mask)

    model.hidden_states = counted
    texts, steps = {}, 0
    while batch.active() or steps < len(PROMPTS):
        if steps < len(PROMPTS):
            batch.add(str(steps), (completion(model, steps), False))  # one joins at each of the first steps
        passes.append([])
        for uid, message, ended in batch.step():
            if ended:
                texts[int(uid)] = (message["text"], message["finish_reason"])
        steps += 1
    # the prompts and moved windows alone; all the others together, at their different positions
    assert max(len(set(positions)) for step in passes for positions in step) >= 4
    assert all(sum(len(positions) > 1 for positions in step) <= 1 for step in passes)
    assert texts == {i: (c.text, c.finish_reason) for i, c in enumerate(alone)}
    assert sorted(batch.free_slots) == list(range(8))


def test_a_cancelled_completion_frees_its_slot_for_the_next_request():
    model = tiny("learned")
    batch = Batch(model, max_size=1, timeout=None)
    batch.add("long", (Completion(model, CHARS, "A", 1000, Sampling(temperature=0)), True))
    batch.step()
    batch.add("short", (completion(model, 0), False))
    batch.step()
    assert "short" not in batch.running  # no slot free
    batch.add("cancel", Cancel("long"))
    ended = {}
    while batch.active():
        for uid, message, done in batch.step():
            if done:
                ended[uid] = message
    assert ended["long"] is None and ended["cancel"] is None
    assert ended["short"]["text"] == completion(model, 0).result().text
    assert batch.free_slots == [0]
