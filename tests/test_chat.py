"""The chat template, conversations as data, and chat generation, on small hand-made conversations (in process; the
end-to-end runs through train.py, sample.py --chat and serve.py are in test_chat_run.py)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tinygpt_pl.data.chat import SPECIAL_TOKENS, ChatTokenizer
from tinygpt_pl.data.conversations import (
    ChatValBatchMaker,
    Conversations,
    chat_train_batch,
    packed_chat_train_batch,
)
from tinygpt_pl.data.datamodule import TextDataModule
from tinygpt_pl.data.tokenizer import CharTokenizer, get_tokenizer, tokenizer_from_state
from tinygpt_pl.errors import UsageError
from tinygpt_pl.generation.chat import Chat
from tinygpt_pl.generation.generate import Sampling, stream_ids
from tinygpt_pl.model import GPT, GPTConfig

CONVERSATION = [
    {"role": "system", "content": "You reverse words."},
    {"role": "user", "content": "abc"},
    {"role": "assistant", "content": "cba"},
    {"role": "user", "content": "xy"},
    {"role": "assistant", "content": "yx"},
]


@pytest.fixture(scope="module")
def gpt2() -> ChatTokenizer:
    return ChatTokenizer(get_tokenizer("gpt2"))


def test_template_renders_each_message_between_its_roles_tokens_and_masks_all_but_the_assistant(gpt2):
    ids, mask, truncated = gpt2.render(CONVERSATION)
    assert not truncated
    assert gpt2.decode(ids) == (
        "<|system_start|>You reverse words.<|system_end|><|user_start|>abc<|user_end|><|assistant_start|>cba"
        "<|assistant_end|><|user_start|>xy<|user_end|><|assistant_start|>yx<|assistant_end|>"
    )
    assert [gpt2.special[t] for t in SPECIAL_TOKENS] == list(range(50257, 50263))  # GPT-2's padded rows
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    assert gpt2.decode(trained) == "cba<|assistant_end|>yx<|assistant_end|>"  # the replies and their end tokens
    assert gpt2.prompt(CONVERSATION[:2]) == ids[: ids.index(gpt2.start("assistant")) + 1]


def test_text_that_spells_a_special_token_is_read_as_text(gpt2):
    spelled = "".join(SPECIAL_TOKENS) + "<|endoftext|>"
    ids = gpt2.encode(spelled)
    assert max(ids) < 50256 and gpt2.decode(ids) == spelled
    rendered, _, _ = gpt2.render([{"role": "user", "content": spelled}, {"role": "assistant", "content": "ok"}])
    assert sum(i >= 50257 for i in rendered) == 4  # only the template's own: user start/end, assistant start/end


def test_char_template_takes_the_ids_after_the_vocabulary_and_travels_in_the_state():
    chat = ChatTokenizer(CharTokenizer("abcxy "))
    assert chat.vocab_size == 12 and chat.start("system") == 6 and chat.end("assistant") == 11
    rebuilt = tokenizer_from_state(chat.state_dict())
    assert isinstance(rebuilt, ChatTokenizer) and rebuilt.state_dict() == chat.state_dict()
    assert rebuilt.render(CONVERSATION[1:3]) == chat.render(CONVERSATION[1:3])
    assert list(chat.byte_lengths()) == [1] * 6 + [0] * 6


def test_a_long_conversation_is_cut_at_the_last_assistant_message_that_fits(gpt2):
    whole, _, _ = gpt2.render(CONVERSATION)
    first_reply_end = whole.index(gpt2.end("assistant")) + 1
    ids, mask, truncated = gpt2.render(CONVERSATION, max_tokens=len(whole) - 1)
    assert truncated and ids == whole[:first_reply_end] and len(mask) == len(ids)


@pytest.mark.parametrize(
    ("messages", "why"),
    [
        (None, "no messages list"),
        ([], "no messages list"),
        ([{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "hi"}], "unknown role 'bot'"),
        ([{"role": "user", "content": "hi"}], "no assistant message"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "hi"}], "without text content"),
    ],
)
def test_what_is_no_conversation_says_why(gpt2, messages, why):
    with pytest.raises(ValueError, match=why):
        gpt2.render(messages)


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def reversal(i: int) -> dict:
    word = "abcxy"[i % 5 :] + "xy" * (i % 3)
    return {"messages": [{"role": "user", "content": word}, {"role": "assistant", "content": word[::-1]}]}


BAD_ROWS = [{"text": "no messages"}, {"messages": [{"role": "user", "content": "abc"}]},
            {"messages": [{"role": "robot", "content": "abc"}, {"role": "assistant", "content": "cba"}]}]  # fmt: skip


def chat_data(tmp_path: Path, rows: list, **kwargs) -> TextDataModule:
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    options = dict(path=path, format="chat", tokenizer="gpt2", block_size=16, batch_size=4, num_proc=1,
                   cache_dir=str(tmp_path / "cache"), val_fraction=0.2) | kwargs  # fmt: skip
    return TextDataModule(**options)


def test_chat_data_skips_and_counts_bad_rows_and_cuts_long_ones(tmp_path):
    long = {"messages": [*reversal(0)["messages"], {"role": "user", "content": "x " * 50},
                         {"role": "assistant", "content": "y"}]}  # fmt: skip
    data = chat_data(tmp_path, [reversal(i) for i in range(20)] + BAD_ROWS + [long])
    with pytest.warns(UserWarning, match=r"skipped 3 of 24 rows \(1 no messages list, 1 no assistant message, 1 unkn"):
        data.prepare_data()
    data.setup("fit")
    assert (len(data.train_tokens), len(data.val_tokens)) == (17, 4)
    meta = json.loads((data.token_dir / "train.json").read_text())
    assert (meta["conversations"], meta["truncated"], sum(meta["skipped"].values())) == (21, 1, 3)
    x, y = data.val_tokens.batch(np.arange(4), 16)
    assert data.tokenizer.decode(x[-1][y[-1] == -1].tolist()).startswith("<|user_start|>abcxy")
    assert data.tokenizer.decode(y[-1][y[-1] != -1].tolist()) == "yxcba<|assistant_end|>"  # the cut one's first reply


def test_strict_refuses_a_bad_row_and_writes_nothing(tmp_path):
    data = chat_data(tmp_path, [reversal(i) for i in range(20)] + BAD_ROWS, strict=True)
    with pytest.raises(UsageError, match=r"row 20 of .* no messages list; 3 rows like it: fix them, or drop --data"):
        data.prepare_data()
    assert not [p for p in data.token_dir.rglob("*") if p.is_file()]


def test_chat_data_without_a_messages_column_or_conversations_is_refused(tmp_path):
    with pytest.raises(UsageError, match="has no column 'messages'"):
        chat_data(tmp_path, [{"text": "hello"}] * 5).prepare_data()
    with pytest.raises(UsageError, match="no conversation to train on"):
        chat_data(tmp_path, BAD_ROWS * 3).prepare_data()
    with pytest.raises(UsageError, match="pass --model.init_from the base model's checkpoint"):
        chat_data(tmp_path, [reversal(0)], tokenizer="char")


def test_training_rows_are_whole_conversations_and_two_ranks_split_one_global_batch(tmp_path):
    data = chat_data(tmp_path, [reversal(i) for i in range(30)])
    data.prepare_data()
    data.setup("fit")
    conversations = data.train_tokens
    whole = chat_train_batch(conversations, 16, 8, seed=1, step=5, part=0, num_parts=1)
    halves = [chat_train_batch(conversations, 16, 4, seed=1, step=5, part=p, num_parts=2) for p in (0, 1)]
    for i in (0, 1):
        assert torch.equal(torch.cat([h[i] for h in halves]), whole[i])
    x, y = whole
    user_start = data.tokenizer.start("user")
    assert (x[:, 0] == user_start).all() and (x[:, 1:] != user_start).all()  # one conversation per row
    inside = (y[:, :-1] != -1) & (y[:, :-1] != data.tokenizer.end("assistant"))  # a reply's end is the last id
    assert torch.equal(y[:, :-1][inside], x[:, 1:][inside])  # targets: the next ids, or -1


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_val_covers_each_held_out_assistant_token_once(tmp_path, world_size):
    data = chat_data(tmp_path, [reversal(i) for i in range(30)], val_fraction=0.3)
    data.prepare_data()
    data.setup("fit")
    val = data.val_tokens
    expected = sum(int(val.mask[val.offsets[i] + 1 : val.offsets[i + 1]].sum()) for i in range(len(val)))
    counted = 0
    for rank in range(world_size):
        maker = ChatValBatchMaker(val, 16, 2, world_size, rank)
        counted += sum(int((maker(j)[1] != -1).sum()) for j in range(len(maker)))
    assert counted == expected > 0


def test_a_cache_with_a_missing_mask_is_called_damaged(tmp_path):
    data = chat_data(tmp_path, [reversal(i) for i in range(10)])
    data.prepare_data()
    (data.token_dir / "train.mask.bin").unlink()
    with pytest.raises(UsageError, match="damaged .*train.mask.bin is missing"):
        Conversations.open(data.token_dir / "train.bin")


@pytest.fixture(scope="module")
def chat_model() -> tuple[GPT, ChatTokenizer]:
    torch.manual_seed(0)
    tokenizer = ChatTokenizer(CharTokenizer("abcxy "))
    return GPT(GPTConfig(vocab_size=12, block_size=64, n_layer=2, n_head=2, n_embd=16, dropout=0.0)).eval(), tokenizer


def test_a_chat_runs_only_the_new_messages_and_replies_as_a_whole_run_would(chat_model, monkeypatch):
    model, tokenizer = chat_model
    fed = []  # the positions each forward pass ran
    hidden_states = model.hidden_states
    monkeypatch.setattr(
        model, "hidden_states", lambda idx, caches=None: fed.append(idx.size(1)) or hidden_states(idx, caches)
    )
    chat = Chat(model, tokenizer, Sampling(temperature=0), max_new_tokens=5)
    first = chat.reply([{"role": "user", "content": "abc"}]).result()
    after_first = list(chat.ids)
    assert after_first[-1] == tokenizer.end("assistant") and first.completion_tokens <= 5
    unfed = 1 + (first.finish_reason == "length")  # the end token, and the last reply token when cut by length
    fed.clear()
    second = chat.reply([{"role": "user", "content": "xy"}])
    second.result()
    assert chat.ids[: len(after_first)] == after_first
    assert fed[0] == unfed + len(second.prompt_ids) and set(fed[1:]) <= {1}  # earlier turns were not run again
    idx = torch.tensor([after_first + second.prompt_ids])
    fresh = [t.item() for t in stream_ids(model, idx, 5, Sampling(temperature=0), kv_cache=False,
                                          eot_id=tokenizer.end("assistant"), vocab_limit=12)]  # fmt: skip
    assert tokenizer.decode(fresh) == second.text and second.finish_reason == ("length" if len(fresh) == 5 else "stop")
    chat.clear()
    assert chat.ids == [] and chat.reply([{"role": "user", "content": "abc"}]).result().text == first.text


def test_a_model_without_the_template_cannot_chat(chat_model):
    model, _ = chat_model
    with pytest.raises(UsageError, match="is not a chat model .* --data.format chat"):
        Chat(model, CharTokenizer("abcxy "), Sampling())
    with pytest.raises(UsageError, match="unknown role 'robot'"):
        Chat(model, chat_model[1], Sampling()).reply([{"role": "robot", "content": "a"}])


def test_packed_rows_hold_whole_conversations_and_two_ranks_split_one_global_batch(tmp_path):
    data = chat_data(tmp_path, [reversal(i) for i in range(30)], block_size=32)
    data.prepare_data()
    data.setup("fit")
    conversations = data.train_tokens
    x, y, segments = packed_chat_train_batch(conversations, 32, 8, seed=1, step=5, part=0, num_parts=1)
    halves = [packed_chat_train_batch(conversations, 32, 4, seed=1, step=5, part=p, num_parts=2) for p in (0, 1)]
    for i, whole in enumerate((x, y, segments)):
        assert torch.equal(torch.cat([h[i] for h in halves]), whole)
    user_start = data.tokenizer.start("user")
    starts = segments[:, 1:] != segments[:, :-1]
    assert ((x[:, 1:] == user_start) == (starts & (x[:, 1:] != 0))).all()  # a new segment at each conversation
    assert (segments.max(dim=1).values >= 2).all()  # several conversations per row
    assert data.tokenizer.decode(y[y != -1].tolist()).count("<|assistant_end|>") == int((x == user_start).sum())


@pytest.mark.parametrize("pos_emb", ["learned", "rotary"])
def test_packed_conversations_see_only_themselves(tmp_path, pos_emb):
    """A conversation packed after others gets the logits it gets alone: no attention across its start, and its
    positions counted from its own start."""
    data = chat_data(tmp_path, [reversal(i) for i in range(30)], block_size=32)
    data.prepare_data()
    data.setup("fit")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=data.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=16, dropout=0.0,
                          pos_emb=pos_emb))  # fmt: skip
    x, y, segments = data.train_tokens.packed([3, 7, 11], 32)
    packed, _ = model(torch.from_numpy(x)[None], segments=torch.from_numpy(segments)[None])
    for k, i in enumerate([3, 7, 11]):
        alone, _ = model(data.train_tokens.batch(np.array([i]), 32)[0])
        n = int((segments == k).sum()) - 1  # the last position's input: the end token packed, padding alone
        mine = packed[0, torch.from_numpy(segments == k)][:n]
        torch.testing.assert_close(mine, alone[0, :n], atol=1e-5, rtol=0)
    mixed, _ = model(torch.from_numpy(x)[None])  # without the segments, later conversations see the earlier ones
    assert not torch.allclose(mixed[0, torch.from_numpy(segments == 2)], packed[0, torch.from_numpy(segments == 2)])
