"""Text for the toy world: a word-level tokenizer and a tiny CLIP text encoder.

Stable Diffusion reads prompts with a BPE ``CLIPTokenizer`` and a ``CLIPTextModel``. The toy world
keeps the same types where it can: a ``transformers.PreTrainedTokenizerFast`` over a
``tokenizers`` WordLevel model (one token per word of the scene grammar; a CLIPTokenizer with an
empty merges list would map every word to unknown) and a small ``transformers.CLIPTextModel``.
Every prompt is ``[BOS] words [EOS] [PAD]...``, padded to ``MAX_LENGTH`` like SD's 77.
"""

from __future__ import annotations

import re

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, PreTrainedTokenizerFast

from .scenes import vocabulary

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
MAX_LENGTH = 20


class UnknownWordError(ValueError):
    """A prompt used a word that the toy world's vocabulary does not have."""


def build_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over the scene grammar's vocabulary (plus special tokens)."""
    words = vocabulary() if words is None else words
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]),
                                                  ("[EOS]", vocab["[EOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="[BOS]", eos_token="[EOS]",
                                   model_max_length=MAX_LENGTH)


def tokenize(tokenizer, prompts: list[str]):
    """Token ids and attention mask, padded to the tokenizer's length (20 here, 77 for SD1.5)."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt")


def check_prompt(prompt: str, tokenizer: PreTrainedTokenizerFast) -> str:
    """Lower-case the prompt and raise UnknownWordError listing the vocabulary if a word is
    outside it (the toy text encoder would otherwise read it as [UNK], silently)."""
    words = re.findall(r"\w+", prompt.lower())
    vocab = tokenizer.get_vocab()
    unknown = [w for w in words if w not in vocab]
    if unknown:
        known = sorted(w for w in vocab if not w.startswith("["))
        raise UnknownWordError(f"the toy world does not know the word(s) {unknown} in prompt "
                               f"{prompt!r}; its vocabulary is: {', '.join(known)}")
    if len(words) + 2 > tokenizer.model_max_length:
        raise ValueError(f"prompt {prompt!r} has {len(words)} words; the toy text encoder "
                         f"reads at most {tokenizer.model_max_length - 2}")
    return " ".join(words)


def text_encoder_config(tokenizer: PreTrainedTokenizerFast, hidden: int = 64) -> CLIPTextConfig:
    """A tiny CLIP text transformer: 2 layers, width 64, over the word vocabulary."""
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                          intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
                          projection_dim=hidden, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id)
