r"""Prompt-to-Prompt attention control (Hertz et al. 2022) through diffusers' attention processors.

An edit decodes a batch of pairs ``[sources..., targets...]`` from the same noise: the source
branch reproduces the image, the target branch follows the new prompt. P2P makes the target
branch borrow the *attention maps* of the source branch, so the layout stays and only what the
prompt changes may move. In every attention layer, with probabilities
``A = softmax(Q K^T / sqrt(d))`` of shape [heads, pixels, tokens]:

* cross-attention, first ``cross_fraction`` of the steps, through a token map M (source x
  target tokens, ``attention_mapper``): ``A_tgt[..., j] = sum_i A_src[..., i] M[i, j]`` for the
  aligned target tokens j:
    - replace (same word count): word k takes the map of source word k; with a BPE tokenizer a
      word may have another token count, and then each of its tokens gets the source word's
      summed map over its own count (P2P's ``get_replacement_mapper``);
    - refine (words added or removed, aligned by words): the tokens of common words map one to
      one; the tokens of new words keep their own maps;
    - reweight: ``A_tgt[..., j] *= amplify`` for every token of the chosen target words (no
      renormalisation);
* self-attention, first ``self_fraction`` of the steps: ``A_tgt = A_src`` (only for maps of at
  most 32x32 tokens, the iCD authors' setting; on SD1.5 that skips the 64x64 layers);
* local blend (optional): after each step from ``blend_start`` of the steps on (P2P's 0.2: from
  step 10 of 50, from step 0 of 4), ``x_tgt <- x_src + M * (x_tgt - x_src)``, where the
  mask M is the union over both branches of {cross-attention map of the blend words, summed over
  words, averaged over layers and heads, max-pooled 3x3, scaled to [0, 1]} > threshold. (P2P
  divides by the max only; the toy world's maps have a floor of ~0.6 of their max everywhere,
  so that would keep every pixel. Min-max scaling behaves the same on peaked SD maps.) On SD1.5
  only the 16x16 maps enter (``blend_downsample`` = 4, P2P's and the iCD authors' setting).

Words are P2P's: the prompt split on whitespace. A blend or amplify word selects all the tokens
the tokenizer made of it (``word_positions``), so the BPE pieces of "watercolor" move together.

Steps count P2P's way (``controlled_steps``): step i of n is controlled while
``i < int(fraction * n)``, so with iCD's 4 decoding steps cross 0.3 controls step 0 and self 0.6
steps 0 and 1 (with 3 steps cross 0.3 controls none). Only the conditional network pass is
controlled: the teacher baselines run the unconditional pass of CFG inside
``controller.paused()``; the iCD students have no such pass
(their guidance is an input embedding).

``attention_control(unet, controller)`` swaps every attention processor of a UNet for one that
calls the controller (diffusers' public ``set_attn_processor`` API) and restores the originals on
exit; the controller checks that every hooked layer ran in every step, so a model that routes
attention elsewhere fails loudly instead of editing nothing.
"""

from __future__ import annotations

import difflib
import re
import string
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .checks import check_finite

SELF_MAX_TOKENS = 32 * 32


def controlled_steps(fraction: float, num_steps: int) -> int:
    """How many of ``num_steps`` steps a control fraction covers, P2P's way: int(fraction * n),
    so steps 0 ... that - 1 are controlled."""
    return int(fraction * num_steps)


class AlignmentError(ValueError):
    """Source and target prompts cannot be aligned token by token for attention control."""


def _tokens(tokenizer, prompt: str) -> list[int]:
    """Token ids of one prompt, with BOS and EOS, without padding."""
    return tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids


def _normal(word: str) -> str:
    """A word as blend / amplify words are matched: lower case, outer punctuation dropped."""
    return word.lower().strip(string.punctuation)


def word_spans(tokenizer, prompt: str) -> list[list[int]]:
    """For each whitespace-separated word of ``prompt`` (P2P's words), its token positions
    (BOS is position 0). A BPE tokenizer may split a word into several tokens ("watercolor" ->
    "wat", "er", "color</w>" with a small vocabulary); a word-level one gives one each.

    Read from the fast tokenizer's character offsets; a tokenizer without offsets tokenizes word
    by word (as CLIP does anyway). Words cut off by truncation have no positions."""
    words = list(re.finditer(r"\S+", prompt))
    length = tokenizer.model_max_length
    try:
        encoding = tokenizer(prompt, truncation=True, max_length=length,
                             return_offsets_mapping=True)
    except NotImplementedError:  # a slow tokenizer: count each word's tokens on its own
        spans, position = [], 1
        for word in words:
            count = len(_tokens(tokenizer, word.group())) - 2
            spans.append([p for p in range(position, position + count) if p < length - 1])
            position += count
        return spans
    spans = [[] for _ in words]
    ids = encoding.input_ids
    for position, (begin, end) in enumerate(encoding.offset_mapping):
        if end <= begin or position in (0, len(ids) - 1):  # BOS, EOS
            continue
        for k, word in enumerate(words):
            if word.start() <= begin < word.end():
                spans[k].append(position)
                break
    return spans


def attention_mapper(tokenizer, source: str, target: str, mode: str = "auto"):
    r"""P2P's token map from the source prompt to the target prompt, and which target tokens
    it covers.

    Returns (mapper [L, L] float on the CPU, aligned [L] bool), L the padded length: the target
    branch's cross-attention to token j becomes :math:`\sum_i A_{src}[..., i]\, M[i, j]` where
    ``aligned[j]``, and stays its own elsewhere.

    * ``replace`` (P2P's ``AttentionReplace``; prompts with the same number of words): word k of
      the target takes word k of the source's maps; when the two words have a different number
      of BPE tokens, every target token of the word gets the sum of the source word's maps
      divided by its own token count (P2P's ``get_replacement_mapper``).
    * ``refine`` (``AttentionRefine``; words added or removed): the words are aligned with
      difflib (longest common blocks of words, compared by their tokens); the tokens of a
      common word map one to one, the tokens of a new word keep their own maps.
    * ``auto``: replace when the word counts agree, else refine.

    BOS maps to BOS, EOS to EOS, the target's padding to the padding after the source's EOS.
    Raises AlignmentError when the prompts cannot be aligned that way.
    """
    src, tgt = _tokens(tokenizer, source), _tokens(tokenizer, target)
    src_spans, tgt_spans = word_spans(tokenizer, source), word_spans(tokenizer, target)
    length = tokenizer.model_max_length
    if mode == "auto":
        mode = "replace" if len(src_spans) == len(tgt_spans) else "refine"
    mapper = torch.zeros(length, length, device="cpu")  # (source tokens, target tokens)
    aligned = torch.zeros(length, dtype=torch.bool, device="cpu")  # (target tokens,)
    if mode == "replace":
        if len(src_spans) != len(tgt_spans):
            raise AlignmentError(
                f"word replacement needs prompts of the same word count (the same token count "
                f"on a word-level tokenizer), got {len(src_spans)} words for {source!r} and "
                f"{len(tgt_spans)} for {target!r}; use mode='refine' (or 'auto')")
        for s_span, t_span in zip(src_spans, tgt_spans):
            if len(s_span) == len(t_span):
                mapper[s_span, t_span] = 1.0
            else:  # a word of another token count: spread the source word over the target's
                for j in t_span:
                    mapper[s_span, j] = 1.0 / len(t_span)
            aligned[t_span] = True
    elif mode == "refine":
        src_words = [tuple(src[p] for p in span) for span in src_spans]
        tgt_words = [tuple(tgt[p] for p in span) for span in tgt_spans]
        matcher = difflib.SequenceMatcher(a=src_words, b=tgt_words, autojunk=False)
        blocks = [block for block in matcher.get_matching_blocks() if block.size]
        if not blocks:
            raise AlignmentError(f"{source!r} and {target!r} share no words, so P2P has no "
                                 f"attention map to carry over; write the target prompt as an "
                                 f"edit of the source prompt")
        for a, b, size in blocks:
            for k in range(size):
                s_span, t_span = src_spans[a + k], tgt_spans[b + k]
                mapper[s_span, t_span] = 1.0  # the same word: the same tokens, one to one
                aligned[t_span] = True
    else:
        raise ValueError(f"unknown alignment mode {mode!r}; choose 'auto', 'replace' or 'refine'")
    mapper[0, 0] = mapper[len(src) - 1, len(tgt) - 1] = 1.0  # BOS, EOS
    aligned[0] = aligned[len(tgt) - 1] = True
    for j in range(len(tgt), length):  # padding follows the source's EOS
        mapper[min(len(src) + j - len(tgt), length - 1), j] = 1.0
        aligned[j] = True
    return mapper, aligned


def token_mapping(tokenizer, source: str, target: str, mode: str = "auto"):
    """For every target token position j: the source position M(j) and whether j is aligned.

    The one-source-token view of ``attention_mapper`` (for a replaced word of another token
    count, the first token of the source word). Returns (mapping [L] long, aligned [L] bool)
    with L the tokenizer's padded length.
    """
    mapper, aligned = attention_mapper(tokenizer, source, target, mode)
    return mapper.argmax(0), aligned  # (L,), (L,): argmax takes the first of equal maxima


def word_positions(tokenizer, prompt: str, words) -> torch.Tensor:
    """Bool [L] on the CPU: the token positions of ``words`` in the prompt (every occurrence).

    A word is matched against the prompt's whitespace words (lower case, outer punctuation
    dropped) and selects all its tokens, however many the BPE made of it, but not tokens of
    punctuation alone (the "," of "cat,"); an entry of several words ("red car") selects a run
    of them. So "cat" does not select the "cat</w>" that ends "wildcat"."""
    if isinstance(words, str) or not all(isinstance(word, str) for word in words):
        raise ValueError(f"words must be a tuple of words, e.g. ('circle',), got {words!r}")
    spans = word_spans(tokenizer, prompt)
    pieces = tokenizer.convert_ids_to_tokens(_tokens(tokenizer, prompt))
    punctuation = {p for p, piece in enumerate(pieces)  # "," of "cat," is not the word
                   if not _normal(piece.replace("</w>", "")) and p not in (0, len(pieces) - 1)}
    prompt_words = [_normal(word) for word in prompt.split()]
    selected = torch.zeros(tokenizer.model_max_length, dtype=torch.bool, device="cpu")  # (L,)
    for word in words:
        parts = [_normal(part) for part in word.split()]
        found = [i for i in range(len(prompt_words) - len(parts) + 1)
                 if parts and prompt_words[i:i + len(parts)] == parts]
        positions = [p for i in found for span in spans[i:i + len(parts)] for p in span
                     if p not in punctuation]
        if not positions:
            raise AlignmentError(f"the word {word!r} is not in the prompt {prompt!r}; "
                                 f"blend and amplify words must be words of their prompt")
        selected[positions] = True
    return selected


def changed_words(source: str, target: str) -> tuple[str, ...]:
    """The target's words that the source does not have at the same place (difflib)."""
    a, b = source.split(), target.split()
    opcodes = difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes()
    return tuple(word for tag, _, _, j1, j2 in opcodes if tag in ("replace", "insert")
                 for word in b[j1:j2])


P2P_FIXES = {"cross_fraction": "the fraction of the steps whose cross-attention is carried over",
             "self_fraction": "the fraction of the steps whose self-attention is carried over",
             "blend_threshold": "the local blend keeps the pixels above it in the scaled map",
             "blend_start": "the fraction of the steps after which the local blend starts"}


def check_p2p_numbers(**values) -> None:
    """ValueError unless every given P2P setting is finite and in range: the fractions and the
    blend threshold in [0, 1], ``amplify`` > 0 (1 = no reweighting)."""
    for name, value in values.items():
        if name == "amplify":
            check_finite(name, value, 0, low_open=True, fix="1 = no reweighting, e.g. 4")
        else:
            check_finite(name, value, 0, 1, fix=P2P_FIXES[name])


def _one_per_edit(value, batch: int, name: str) -> list:
    """None for every edit, or the given list, which must have one entry per edit."""
    if value is None:
        return [None] * batch
    if isinstance(value, str):
        raise ValueError(f"{name} must be a list with one entry per edit, got the string "
                         f"{value!r}: e.g. [(('circle',), ('square',))] for blend_words of one "
                         f"edit, [('blue',)] for amplify_words")
    value = list(value)
    if len(value) != batch:
        raise ValueError(f"{name} must be a list with one entry per edit ({batch}), got "
                         f"{len(value)}: e.g. [(('circle',), ('square',))] for blend_words of "
                         f"one edit")
    return value


class PromptToPrompt:
    """The attention controller of a batch of B edits (see the module docstring).

    ``blend_words``: a list with, per edit, (source words, target words) for the local blend, or
    None (no blend; two empty word lists, e.g. for a new background, mean the same).
    ``amplify_words``: a list with, per edit, the target words to reweight, or None (the words
    that changed). Both default to None for every edit.

    ``blend_downsample``: the local blend reads only the cross-attention maps whose side is the
    latent side divided by it (the nearest side present): 4 on SD1.5 gives P2P's 16x16 maps of
    64x64 latents; None (the toy world) averages the maps of every resolution.

    The token bookkeeping (``mapper``, ``aligned``, ``equalizer``, the blend words' positions)
    stays on the CPU and is moved to the attention maps' device where it meets them.
    """

    def __init__(self, tokenizer, sources: list[str], targets: list[str], num_steps: int,
                 cross_fraction: float = 0.3, self_fraction: float = 0.6, amplify: float = 1.0,
                 amplify_words=None, blend_words=None, blend_threshold: float = 0.3,
                 blend_start: float = 0.2, mode: str = "auto",
                 blend_downsample: int | None = None):
        if len(sources) != len(targets):
            raise ValueError(f"got {len(sources)} source and {len(targets)} target prompts; "
                             f"give one target per source")
        check_p2p_numbers(cross_fraction=cross_fraction, self_fraction=self_fraction,
                          amplify=amplify, blend_threshold=blend_threshold,
                          blend_start=blend_start)
        batch = len(sources)
        pairs = [attention_mapper(tokenizer, s, t, mode) for s, t in zip(sources, targets)]
        self.mapper = torch.stack([m for m, _ in pairs])  # (B, L source, L target)
        self.aligned = torch.stack([a for _, a in pairs]).float()  # (B, L)
        amplify_words = _one_per_edit(amplify_words, batch, "amplify_words")
        self.equalizer = torch.ones(self.aligned.shape, device="cpu")  # (B, L)
        for i, (source, target, words) in enumerate(zip(sources, targets, amplify_words)):
            words = changed_words(source, target) if words is None else words
            self.equalizer[i, word_positions(tokenizer, target, words)] = amplify
        blend_words = _one_per_edit(blend_words, batch, "blend_words")
        for words in blend_words:
            if words is not None and (isinstance(words, str) or len(words) != 2):
                raise ValueError(f"each blend_words entry must be (source words, target words), "
                                 f"e.g. (('circle',), ('square',)), or None; got {words!r}")
        self.blend = [
            None if words is None or not (words[0] or words[1]) else
            (word_positions(tokenizer, s, words[0]), word_positions(tokenizer, t, words[1]))
            for s, t, words in zip(sources, targets, blend_words)]
        self.cross_steps = controlled_steps(cross_fraction, num_steps)
        self.self_steps = controlled_steps(self_fraction, num_steps)
        self.blend_from = controlled_steps(blend_start, num_steps)
        self.blend_threshold = blend_threshold
        if blend_downsample is not None:
            check_finite("blend_downsample", blend_downsample, 1, integer=True,
                         fix="latent side / blend map side, e.g. 4 on SD1.5 (16x16 maps)")
        self.blend_downsample = blend_downsample
        self.batch = batch
        self.step, self.active = -1, True
        self.hooked: set[str] = set()
        self._called: set[str] = set()
        self._maps: list[torch.Tensor] = []

    # -- the editing loop calls these ---------------------------------------------------------
    def begin_step(self, i: int) -> None:
        """Start decoding step i (0-based); checks that the previous step ran every layer."""
        self._check_layers()
        self.step, self._called, self._maps = i, set(), []

    def finish(self) -> None:
        self._check_layers()
        self.step = -1

    @property
    def step_maps(self) -> list[torch.Tensor]:
        """The cross-attention maps kept in the current step, one per layer that ran, each
        averaged over heads: (2B, L, side, side) with L text tokens (read-only; for plots)."""
        return list(self._maps)

    @contextmanager
    def paused(self):
        """Run the network without control (the unconditional pass of CFG)."""
        self.active = False
        try:
            yield
        finally:
            self.active = True

    def blend_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Local blend of the latents [2B, C, h, w] after step ``self.step``."""
        if self.step < self.blend_from or not self._maps or all(b is None for b in self.blend):
            return x
        source, target = x.chunk(2)  # (B, C, h, w) each
        maps = torch.stack([F.interpolate(m, size=x.shape[-2:], mode="bilinear")
                            for m in self._blend_maps(x.shape[-1])]).mean(0)  # (2B, L, h, w)
        mask = torch.ones_like(target[:, :1])  # (B, 1, h, w)
        for i, words in enumerate(self.blend):  # each edit's mask: (1, h, w)
            if words is not None:
                mask[i] = (self._word_mask(maps[i], words[0])
                           | self._word_mask(maps[self.batch + i], words[1])).float()
        return torch.cat([source, source + mask * (target - source)])  # (2B, C, h, w)

    def _blend_maps(self, latent_side: int) -> list[torch.Tensor]:
        """The stored maps (2B, L, side, side) the blend reads: all, or those of the side
        nearest to latent_side / blend_downsample."""
        if self.blend_downsample is None:
            return self._maps
        wanted = latent_side / self.blend_downsample
        side = min({m.shape[-1] for m in self._maps}, key=lambda s: abs(s - wanted))
        return [m for m in self._maps if m.shape[-1] == side]

    def _word_mask(self, maps: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """(1, h, w) bool: where the words' summed map, max-pooled 3x3 and min-max scaled,
        exceeds the threshold; ``maps`` (L, h, w), ``words`` (L,) bool."""
        if not words.any():
            return torch.zeros((1, *maps.shape[-2:]), dtype=torch.bool, device=maps.device)
        word_map = F.max_pool2d(maps[words.to(maps.device)].sum(0, keepdim=True), 3, stride=1,
                                padding=1)  # (1, h, w)
        low, high = word_map.min(), word_map.max()
        return (word_map - low) / (high - low).clamp_min(1e-12) > self.blend_threshold

    def _check_layers(self) -> None:
        missing = self.hooked - self._called
        if self.step >= 0 and missing:
            raise RuntimeError(f"attention control: {len(missing)} of {len(self.hooked)} hooked "
                               f"layers did not run in step {self.step} (e.g. {min(missing)}); "
                               f"the model does not route attention through its processors, so "
                               f"the edit would silently ignore the controller")

    # -- the attention processors call these --------------------------------------------------
    def needs_probs(self, is_cross: bool, tokens: int) -> bool:
        if not self.active or self.step < 0:
            return False
        if is_cross:
            return self.step < self.cross_steps or any(b is not None for b in self.blend)
        return self.step < self.self_steps and tokens <= SELF_MAX_TOKENS

    def __call__(self, probs: torch.Tensor, is_cross: bool) -> torch.Tensor:
        """Edit the attention probabilities [2B * heads, pixels, tokens] of one layer."""
        two_b, heads = 2 * self.batch, probs.shape[0] // (2 * self.batch)
        source, target = probs.reshape(two_b, heads, *probs.shape[1:]).chunk(2)
        # source, target: (B, heads, pixels, tokens)
        if is_cross and self.step < self.cross_steps:
            mapper = self.mapper.to(source)  # (B, L source, L target)
            carried = torch.einsum("bhps,bst->bhpt", source, mapper)  # (B, heads, pixels, L)
            aligned = self.aligned[:, None, None, :].to(target)  # (B, 1, 1, L)
            equalizer = self.equalizer[:, None, None, :].to(target)  # (B, 1, 1, L)
            target = (aligned * carried + (1 - aligned) * target) * equalizer
        elif not is_cross and self.step < self.self_steps:
            target = source  # (B, heads, pixels, pixels)
        probs = torch.cat([source, target]).reshape(probs.shape)  # (2B * heads, pixels, tokens)
        if is_cross:
            self._store_map(probs.reshape(two_b, heads, *probs.shape[1:]))
        return probs

    def _store_map(self, probs: torch.Tensor) -> None:
        pixels = probs.shape[2]  # probs: (2B, heads, pixels, L)
        side = int(round(pixels**0.5))
        if side * side == pixels:  # averaged over heads: (2B, L, side, side)
            self._maps.append(probs.mean(1).transpose(1, 2).reshape(len(probs), -1, side, side))


class ControlledAttnProcessor:
    """diffusers' AttnProcessor with the controller between softmax and the value product.

    Layers the controller does not need at this step run the original processor (often the
    fused scaled-dot-product kernel), so control costs nothing outside its window.
    """

    def __init__(self, controller: PromptToPrompt, name: str, original):
        self.controller, self.name, self.original = controller, name, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):
        self.controller._called.add(self.name)
        is_cross = encoder_hidden_states is not None
        tokens = (encoder_hidden_states if is_cross else hidden_states).shape[1]
        if hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None:
            raise ValueError(f"attention control supports the transformer attention of a UNet "
                             f"([B, tokens, C] inputs, no group/spatial norm); layer {self.name} "
                             f"is not one: hook the UNet, not the VAE")
        if not self.controller.needs_probs(is_cross, tokens):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask,
                                 temb, **kwargs)
        residual, batch = hidden_states, hidden_states.shape[0]
        context = hidden_states if not is_cross else (
            attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross
            else encoder_hidden_states)
        mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (2B * heads, pixels, d)
        key = attn.head_to_batch_dim(attn.to_k(context))  # (2B * heads, tokens, d)
        value = attn.head_to_batch_dim(attn.to_v(context))  # (2B * heads, tokens, d)
        probs = self.controller(attn.get_attention_scores(query, key, mask),
                                is_cross)  # (2B * heads, pixels, tokens)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))  # (2B, pixels, heads * d)
        out = attn.to_out[1](attn.to_out[0](out))  # (2B, pixels, C)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextmanager
def attention_control(unet, controller: PromptToPrompt):
    """Route every attention layer of ``unet`` through ``controller`` inside the ``with``."""
    original = unet.attn_processors
    if not original:
        raise ValueError("this UNet has no attention layers to control")
    unet.set_attn_processor({name: ControlledAttnProcessor(controller, name, processor)
                             for name, processor in original.items()})
    controller.hooked = set(original)
    try:
        yield controller
    finally:
        unet.set_attn_processor(dict(original))
        controller.hooked = set()
