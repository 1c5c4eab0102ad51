"""The toy world's text side: the word-level tokenizer, prompt checks, the tiny CLIP encoder."""

import pytest
import torch
from transformers import CLIPTextModel, PreTrainedTokenizerFast

from icd_lite.world.scenes import caption, make_dataset, vocabulary
from icd_lite.world.text import (MAX_LENGTH, SPECIAL_TOKENS, UnknownWordError, build_tokenizer,
                                 check_prompt, text_encoder_config)

PROMPT = "a small red circle and a large yellow diamond on a striped gray background"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def encoder(tokenizer):
    torch.manual_seed(0)
    return CLIPTextModel(text_encoder_config(tokenizer)).eval()


def tokenize(tokenizer, prompts):
    return tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                     return_tensors="pt")


def test_every_word_has_its_own_id(tokenizer):
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    words = vocabulary()
    ids = tokenizer.convert_tokens_to_ids(words)
    assert tokenizer.unk_token_id not in ids
    assert len(set(ids)) == len(words)  # one id per word
    special = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    assert not set(ids) & set(special)
    assert len(tokenizer) == len(words) + len(SPECIAL_TOKENS)
    for word, i in zip(words, ids):  # and the tokenizer itself reads each word as that id
        assert tokenizer(word)["input_ids"] == [tokenizer.bos_token_id, i, tokenizer.eos_token_id]


def test_caption_layout_bos_words_eos_pad(tokenizer):
    words = PROMPT.split()
    tokens = tokenize(tokenizer, [PROMPT])
    ids = tokens.input_ids[0].tolist()
    assert len(ids) == MAX_LENGTH == tokenizer.model_max_length
    n = len(words)
    assert ids[0] == tokenizer.bos_token_id
    assert ids[1:n + 1] == tokenizer.convert_tokens_to_ids(words)
    assert ids[n + 1] == tokenizer.eos_token_id
    assert ids[n + 2:] == [tokenizer.pad_token_id] * (MAX_LENGTH - n - 2)
    assert tokens.attention_mask[0].tolist() == [1] * (n + 2) + [0] * (MAX_LENGTH - n - 2)


def test_decode_round_trips_dataset_captions(tokenizer):
    _, captions, _ = make_dataset(50, seed=3)
    tokens = tokenize(tokenizer, captions + [PROMPT])
    decoded = tokenizer.batch_decode(tokens.input_ids, skip_special_tokens=True)
    assert decoded == captions + [PROMPT]
    assert tokenizer.unk_token_id not in tokens.input_ids


def test_check_prompt_normalises(tokenizer):
    assert check_prompt("  A Small RED circle,  on a  BLUE background. ", tokenizer) == \
        "a small red circle on a blue background"
    assert check_prompt(PROMPT, tokenizer) == PROMPT
    assert check_prompt("", tokenizer) == ""  # the null prompt of classifier-free guidance


def test_check_prompt_names_unknown_words_and_lists_the_vocabulary(tokenizer):
    with pytest.raises(UnknownWordError) as info:
        check_prompt("a small red Dog on a blue background", tokenizer)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "'dog'" in message
    for word in vocabulary():
        assert word in message
    assert "[PAD]" not in message and "[UNK]" not in message


def test_check_prompt_length_limit(tokenizer):
    longest = " ".join(["a"] * (MAX_LENGTH - 2))  # [BOS] 18 words [EOS] fills all 20 positions
    assert check_prompt(longest, tokenizer) == longest
    with pytest.raises(ValueError, match="at most 18"):
        check_prompt(longest + " a", tokenizer)


def test_text_encoder_shapes(tokenizer, encoder):
    config = text_encoder_config(tokenizer)
    assert config.vocab_size == len(tokenizer) and config.max_position_embeddings == MAX_LENGTH
    assert config.eos_token_id == tokenizer.eos_token_id
    tokens = tokenize(tokenizer, [PROMPT, "a large blue square on a white background", ""])
    with torch.no_grad():
        out = encoder(**tokens)
    assert out.last_hidden_state.shape == (3, MAX_LENGTH, 64)
    assert out.pooler_output.shape == (3, 64)
    assert torch.isfinite(out.last_hidden_state).all()


def test_pooled_output_is_read_at_eos(tokenizer, encoder):
    text = "a small red circle on a blue background"
    ids = tokenize(tokenizer, [text]).input_ids
    eos = len(text.split()) + 1
    assert ids[0, eos] == tokenizer.eos_token_id
    after_pad = ids.clone()
    after_pad[0, eos + 2] = tokenizer.convert_tokens_to_ids("square")  # a token after EOS
    other_word = ids.clone()
    other_word[0, 3] = tokenizer.convert_tokens_to_ids("green")  # "red" -> "green"
    with torch.no_grad():
        out = encoder(input_ids=torch.cat([ids, after_pad, other_word]))
    pooled, hidden = out.pooler_output, out.last_hidden_state
    torch.testing.assert_close(pooled[0], hidden[0, eos], rtol=0, atol=0)
    torch.testing.assert_close(pooled[1], pooled[0], rtol=0, atol=0)
    assert not torch.allclose(pooled[2], pooled[0], atol=1e-4)


def test_dataset_captions_use_only_the_vocabulary(tokenizer):
    _, _, scenes = make_dataset(200, seed=5)
    for scene in scenes:
        text = caption(scene)
        assert check_prompt(text, tokenizer) == text
