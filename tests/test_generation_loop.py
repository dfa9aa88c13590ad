"""The decode loop's mechanics on a stand-in model whose greedy chain is known by construction.

The stand-in's next-token scores depend only on the last token t: best is t+1, second best t+2 (mod V).
"""

from types import SimpleNamespace

import pytest
import torch

from idefics2.generation import default_eos_token_ids, generate, stream_generate

V = 26
CONTEXT = 64  # the stand-in's max_position_embeddings


class TokenHead(torch.nn.Module):
    """The stand-in's head: a hidden state holds its token id; the logits are that token's row of `table`."""

    def __init__(self, table):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(V, 1))  # (V, hidden): the vocabulary size, the device
        self.table = table

    def forward(self, hidden):
        return self.table[hidden[..., 0].long()]


class ChainModel(torch.nn.Module):
    """The decode core's view of a model (embed, decoder, head, decode step, KV cache), with known logits;
    records every call of the decoder."""

    def __init__(self, generation_config=None):
        super().__init__()
        table = torch.full((V, V), -4.0)
        for t in range(V):
            table[t, (t + 1) % V] = 4.0
            table[t, (t + 2) % V] = 3.0
        self.lm_head = TokenHead(table)
        self.generation_config = generation_config or {}
        self.config = SimpleNamespace(
            text_config=SimpleNamespace(max_position_embeddings=CONTEXT, sliding_window=None)
        )
        self.weights_version = 0
        self.calls = []
        self.caches = []
        self.images_given = []

    @property
    def table(self):
        return self.lm_head.table

    @table.setter
    def table(self, table):
        self.lm_head.table = table

    def new_kv_cache(self, batch_size, max_length, dtype=None, device=None):
        self.caches.append((batch_size, max_length))
        keys = torch.zeros(batch_size, 1, max_length, 1)
        return SimpleNamespace(
            keys=[keys], values=[keys.clone()], batch_size=batch_size, max_length=max_length
        )

    def get_image_features(self, pixel_values, pixel_attention_mask=None):
        return torch.zeros(pixel_values.shape[0] * pixel_values.shape[1], 2, 1)

    def embed_inputs(self, input_ids, image_hidden_states=None):
        self.images_given.append(image_hidden_states is not None)
        return input_ids[..., None].float()  # (B, T, 1): each position's hidden state is its token id

    def model(self, inputs_embeds, kv_cache, cache_position, attention_mask=None):
        self.calls.append(dict(tokens=inputs_embeds.shape[1], slots=cache_position.tolist(), keys=None))
        return SimpleNamespace(last_hidden_state=inputs_embeds)

    def decode_logits(self, token_ids, position_ids, mask, kv_cache, cache_position):
        self.calls.append(dict(tokens=token_ids.shape[1], slots=cache_position.tolist(), keys=mask.shape[-1]))
        return self.table[token_ids]  # (B, 1, V)

    def c_decode_logits(self, tokens, positions, kv_cache):
        return None  # no whole step in one C call: every step comes through decode_logits

    def c_decode_greedy(self, tokens, positions, kv_cache, excluded=None):
        return None  # nor its greedy tokens


class Letters:
    """Token i is the letter chr(ord('a') + i); pad 0."""

    pad_token_id = 0
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + i) for i in ids)


def test_greedy_follows_the_chain_and_calls_the_model_once_per_token():
    model = ChainModel()
    pixels = torch.zeros(1, 1, 3, 4, 4)
    out = generate(model, torch.tensor([[1, 2, 3]]), pixel_values=pixels, max_new_tokens=5)
    assert out.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert model.caches == [(1, 8)] and model.images_given == [True]
    assert model.calls[0] == dict(tokens=3, slots=[0, 1, 2], keys=None)  # the prefill
    assert [c["slots"] for c in model.calls[1:]] == [[3], [4], [5], [6]]  # the last token needs no forward
    assert [c["keys"] for c in model.calls[1:]] == [4, 5, 6, 7]  # each step attends over the slots so far
    assert all(c["tokens"] == 1 for c in model.calls[1:])


def test_left_padded_rows_sit_at_slots_from_zero_of_their_own_cache_rows():
    model = ChainModel()
    prompt = torch.tensor([[1, 2, 3], [0, 0, 5]])
    out = generate(model, prompt, torch.tensor([[1, 1, 1], [0, 1, 1]]), max_new_tokens=2)
    assert out.tolist() == [[1, 2, 3, 4, 5], [0, 0, 5, 6, 7]]
    assert model.caches == [(2, 5)]
    # one right-padded prefill of both rows, then each row's token at its own slot (row 1: 2 real tokens)
    assert model.calls[0]["slots"] == [0, 1, 2] and model.calls[1]["slots"] == [3, 2]


def test_eos_finishes_rows_pads_them_and_trims_columns():
    model = ChainModel()
    prompt = torch.tensor([[1, 2, 3], [0, 0, 5]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    out = generate(model, prompt, mask, max_new_tokens=10, eos_token_id=[6, 20], pad_token_id=0)
    # row 0: 4 5 6(eos); row 1: 6(eos) then pads; stops when both are done
    assert out.tolist() == [[1, 2, 3, 4, 5, 6], [0, 0, 5, 6, 0, 0]]
    assert len(model.calls) == 3


def test_eos_default_from_generation_config_and_chat_template():
    model = ChainModel({"eos_token_id": 2, "pad_token_id": 0})
    assert default_eos_token_ids(model) == [2]
    tokenizer = SimpleNamespace(end_of_utterance_token_id=7, eos_token_id=2)
    processor = SimpleNamespace(tokenizer=tokenizer, chat_template="User: ...<end_of_utterance>\n")
    assert default_eos_token_ids(model, processor) == [2, 7]
    assert default_eos_token_ids(model, SimpleNamespace(tokenizer=tokenizer, chat_template="{{x}}")) == [2]
    assert default_eos_token_ids(ChainModel(), tokenizer) == [2]
    out = generate(model, torch.tensor([[3]]), max_new_tokens=8, tokenizer=processor)
    assert out.tolist() == [[3, 4, 5, 6, 7]]


def test_min_new_tokens_bans_eos_until_reached():
    model = ChainModel()
    out = generate(model, torch.tensor([[3]]), max_new_tokens=4, min_new_tokens=2, eos_token_id=4)
    assert out.tolist() == [[3, 5, 6, 7, 8]]  # 4 banned at step 0 -> second best 5; later 4 never comes
    out = generate(model, torch.tensor([[2]]), max_new_tokens=4, min_new_tokens=1, eos_token_id=4)
    assert out.tolist() == [[2, 3, 4]]  # eos allowed from the second new token on


def test_bad_words_single_and_multi_token():
    model = ChainModel()
    out = generate(model, torch.tensor([[3]]), max_new_tokens=4, bad_words_ids=[[5, 6], [9]])
    # 4, 5, then 6 banned after 5 -> 7, 8, (9 banned ->) 10
    assert out.tolist() == [[3, 4, 5, 7, 8]]
    out = generate(model, torch.tensor([[7]]), max_new_tokens=2, bad_words_ids=[[9]])
    assert out.tolist() == [[7, 8, 10]]


def test_stop_strings_stop_the_row_after_the_completing_token():
    model = ChainModel()
    prompt = torch.tensor([[1], [10]])
    out = generate(model, prompt, max_new_tokens=8, stop_strings=["efg"], tokenizer=Letters())
    # row 0 writes c d e f g and stops ("efg"); row 1 (l m n ...) never stops
    assert out[0].tolist() == [1, 2, 3, 4, 5, 6] + [0, 0, 0]
    assert out[1].tolist() == list(range(10, 19))


def test_streamer_sees_every_step_and_stream_generate_returns_the_sequences():
    model = ChainModel()
    seen = []
    out = generate(model, torch.tensor([[1], [4]]), max_new_tokens=4, eos_token_id=6, streamer=seen.append)
    assert torch.equal(torch.stack(seen, 1), out[:, 1:])
    events = []
    put_end = SimpleNamespace(put=lambda t: events.append(t.tolist()), end=lambda: events.append("end"))
    generate(model, torch.tensor([[1, 2]]), max_new_tokens=3, streamer=put_end)
    assert events == [[[1, 2]], [3], [4], [5], "end"]  # transformers' protocol: prompt first, then steps
    steps = stream_generate(model, torch.tensor([[1]]), max_new_tokens=3)
    assert [int(next(steps)) for _ in range(3)] == [2, 3, 4]
    with pytest.raises(StopIteration) as done:
        next(steps)
    assert done.value.value.tolist() == [[1, 2, 3, 4]]


def test_sampling_seed_reproduces_and_top_k_1_is_greedy():
    model = ChainModel()
    model.table = torch.randn(V, V, generator=torch.Generator().manual_seed(0))
    prompt = torch.tensor([[1, 2], [3, 4]])
    a = generate(model, prompt, max_new_tokens=30, do_sample=True, seed=11)
    gen = torch.Generator().manual_seed(11)
    b = generate(model, prompt, max_new_tokens=30, do_sample=True, generator=gen)
    c = generate(model, prompt, max_new_tokens=30, do_sample=True, seed=12)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = generate(model, prompt, max_new_tokens=30)
    assert torch.equal(generate(model, prompt, max_new_tokens=30, do_sample=True, top_k=1, seed=3), greedy)
    assert not torch.equal(a, greedy)


def test_max_length_counts_the_prompt():
    out = generate(ChainModel(), torch.tensor([[1, 2, 3]]), max_length=5)
    assert out.tolist() == [[1, 2, 3, 4, 5]]
    assert generate(ChainModel({"max_new_tokens": 2}), torch.tensor([[1]])).shape == (1, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_beams=4), "unsupported generation argument"),
        (dict(temperature=0.5), "only apply to sampling"),
        (dict(top_k=5), "only apply to sampling"),
        (dict(do_sample=True, seed=1, generator=torch.Generator()), "either seed or generator"),
        (dict(max_new_tokens=3, min_new_tokens=5), "larger than max_new_tokens"),
        (dict(max_new_tokens=3, max_length=9), "either max_new_tokens or max_length"),
        (dict(max_length=2), "leaves no room"),
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
        (dict(do_sample=True, temperature=0.0), "temperature must be a number > 0"),
        (dict(do_sample=True, top_p=1.5), "top_p must be in"),
        (dict(do_sample=True, top_k=-1), "top_k must be an integer"),
        (dict(repetition_penalty=-1.0), "repetition_penalty must be"),
        (dict(bad_words_ids=[[1, 99]]), "bad_words_ids must be"),
        (dict(bad_words_ids=[[]]), "bad_words_ids must be"),
        (dict(eos_token_id="x"), "eos_token_id must be"),
        (dict(stop_strings=["x"]), "need tokenizer"),
        (dict(stop_strings=[""], tokenizer=Letters()), "stop_strings must be"),
    ],
)
def test_bad_arguments_give_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(ChainModel(), torch.tensor([[1, 2, 3]]), **kwargs)


def test_bad_prompts_give_clear_errors():
    with pytest.raises(ValueError, match="LongTensor"):
        generate(ChainModel(), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="shape of input_ids"):
        generate(ChainModel(), torch.tensor([[1, 2, 3]]), torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="left padding"):
        generate(ChainModel(), torch.tensor([[1, 2, 0]]), torch.tensor([[1, 1, 0]]))


def test_prompt_and_new_tokens_beyond_the_context_are_refused_with_the_numbers():
    from idefics2.generation import ContextLengthError

    model = ChainModel()
    prompt = torch.ones(1, CONTEXT - 4, dtype=torch.long)
    assert generate(model, prompt, max_new_tokens=4).shape == (1, CONTEXT)  # exactly full: allowed
    model = ChainModel()
    with pytest.raises(ContextLengthError) as caught:
        generate(model, prompt, max_new_tokens=5)
    message = str(caught.value)
    assert "60 tokens" in message and "max_new_tokens is 5" in message and "context of 64 tokens" in message
    assert "max_position_embeddings" in message and "at most 4" in message
    assert (caught.value.prompt_length, caught.value.max_new_tokens, caught.value.limit) == (60, 5, 64)
    assert not model.calls  # refused before the model ran
    with pytest.raises(ValueError, match="shorten the prompt;|shorten the prompt$"):
        next(stream_generate(model, torch.ones(1, 200, dtype=torch.long), max_new_tokens=1))


def test_context_counts_the_real_tokens_of_left_padded_rows():
    model = ChainModel()
    prompt = torch.ones(2, CONTEXT, dtype=torch.long)
    mask = torch.ones(2, CONTEXT, dtype=torch.long)
    mask[:, : CONTEXT - 10] = 0  # 10 real tokens per row, padded to the context length
    assert generate(model, prompt, mask, max_new_tokens=54).shape == (2, CONTEXT + 54)
    with pytest.raises(ValueError, match="the prompt has 10 tokens and max_new_tokens is 55"):
        generate(model, prompt, mask, max_new_tokens=55)
