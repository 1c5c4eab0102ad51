"""The whole SD1.5 path on the tiny fabricated folder, on the CPU, with a real CLIP BPE tokenizer:
load, encode, decode, generate, reconstruct, iCD + P2P (replace and refine with words of several
tokens, blend and amplify words spanning several tokens), prompt-switch editing, the DDIM / NPI /
NTI baselines on plain SD1.5's UNet, the NFE counts, other image sizes, and the bench."""

import warnings

import pytest
import torch
from transformers import CLIPTokenizer

from icd_lite.attention import (PromptToPrompt, attention_mapper, token_mapping, word_positions,
                                word_spans)
from icd_lite.components import ImageResizeWarning
from icd_lite.editing import P2PSettings, baseline_edit, icd_edit, prompt_switch_edit
from icd_lite.sd15 import fabricate_model, fabricated_sources, load_sd15_pipeline
from icd_lite.sd15.fabricate import TOKENIZER_DIR

SOURCE = "a photo of a cat on the grass"
TARGET = "a photo of a giraffe on the grass"  # "giraffe" is several BPE tokens here
ADDED = "a watercolor photo of a cat on the grass with sunflowers"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return fabricate_model(tmp_path_factory.mktemp("sd15") / "tiny", "tiny",
                           releases=["4step-v1"])


@pytest.fixture(scope="module")
def pipe(folder):
    return load_sd15_pipeline(**fabricated_sources(folder), device="cpu")


@pytest.fixture(scope="module")
def tokenizer(pipe):
    return pipe.tokenizer


@pytest.fixture(scope="module")
def image(pipe):
    size = pipe.base.image_size
    return torch.rand((1, 3, size, size), generator=torch.Generator().manual_seed(0)) * 2 - 1


def tokens(tokenizer, word):
    return tokenizer.tokenize(word)


def test_the_tokenizer_is_a_clip_bpe_with_words_of_several_tokens(folder, tokenizer):
    assert isinstance(tokenizer, CLIPTokenizer) and tokenizer.model_max_length == 77
    merges = (folder / TOKENIZER_DIR / "merges.txt").read_text().splitlines()
    assert merges[0] == "#version: 0.2" and any(m.endswith("</w>") for m in merges[1:])
    assert (folder / TOKENIZER_DIR / "vocab.json").exists()
    assert tokens(tokenizer, "cat") == ["cat</w>"]
    for word in ("giraffe", "watercolor", "sunflowers"):
        assert len(tokens(tokenizer, word)) > 1, word
    words = tokenizer.convert_tokens_to_ids(["a</w>", "cat</w>"])
    assert tokenizer("a cat").input_ids == [tokenizer.bos_token_id, *words,
                                            tokenizer.eos_token_id]


def test_encode_decode_generate_reconstruct_and_their_nfe(pipe, image):
    assert pipe.config.preset == "sd15" and pipe.vae.dtype == torch.float32  # CPU: float32
    encoded = pipe.encode(image, SOURCE)
    assert encoded.nfe == 4 and encoded.latents.shape == (1, 4, 16, 16)
    decoded = pipe.decode(encoded.latents, SOURCE, w=20.0, tau=0.8)
    assert decoded.nfe == 4 and decoded.images.shape == image.shape
    assert torch.isfinite(decoded.images).all()
    generated = pipe.generate(SOURCE, seed=1)
    assert generated.nfe == 4 and generated.images.shape == image.shape
    reconstructed = pipe.reconstruct(image, SOURCE)
    assert reconstructed.nfe == 8
    torch.testing.assert_close(reconstructed.images, pipe.decode(encoded.latents, SOURCE).images)
    called = pipe(SOURCE, guidance_scale=20.0, output_type="pt")  # as diffusers' LCM pipeline
    assert called.nfe == 4 and called.images.shape == image.shape


def test_replace_spreads_a_source_word_over_the_target_words_tokens(tokenizer):
    mapper, aligned = attention_mapper(tokenizer, SOURCE, TARGET)  # same word count: replace
    src_spans, tgt_spans = word_spans(tokenizer, SOURCE), word_spans(tokenizer, TARGET)
    cat, giraffe = src_spans[4], tgt_spans[4]
    assert len(cat) == 1 and len(giraffe) > 1
    for j in giraffe:
        assert mapper[cat[0], j] == pytest.approx(1 / len(giraffe))
        assert mapper[:, j].sum() == pytest.approx(1 / len(giraffe))
    for s_span, t_span in zip(src_spans[5:], tgt_spans[5:]):  # the words after it, shifted
        assert [int(mapper[:, j].argmax()) for j in t_span] == s_span
    eos_src = len(tokenizer(SOURCE).input_ids) - 1
    eos_tgt = len(tokenizer(TARGET).input_ids) - 1
    assert mapper[eos_src, eos_tgt] == 1 and mapper[eos_src + 1, eos_tgt + 1] == 1  # padding
    assert aligned.all()
    mapping, _ = token_mapping(tokenizer, SOURCE, TARGET)
    assert mapping[giraffe[0]] == cat[0]


def test_refine_aligns_words_and_new_words_keep_their_maps(tokenizer):
    mapper, aligned = attention_mapper(tokenizer, SOURCE, ADDED)  # words added: refine
    tgt_spans = word_spans(tokenizer, ADDED)
    words = ADDED.split()
    new = {"watercolor", "with", "sunflowers"}
    for word, span in zip(words, tgt_spans):
        assert bool(aligned[span].all()) == (word not in new), word
    src_ids, tgt_ids = tokenizer(SOURCE).input_ids, tokenizer(ADDED).input_ids
    for j in range(1, len(tgt_ids) - 1):
        if aligned[j]:
            assert src_ids[int(mapper[:, j].argmax())] == tgt_ids[j]  # the same token
    assert len(tgt_spans[1]) > 1 and not aligned[tgt_spans[1]].any()  # "watercolor"'s tokens


def test_blend_and_amplify_words_select_every_token_of_whole_words(tokenizer):
    prompt = "a wildcat and a cat near Sunflowers,"
    selected = word_positions(tokenizer, prompt, ("cat",))
    assert selected.nonzero().flatten().tolist() == word_spans(tokenizer, prompt)[4]
    assert tokens(tokenizer, "wildcat")[-1] == "cat</w>"  # a substring match would take it
    flowers = word_positions(tokenizer, prompt, ("sunflowers",))
    assert flowers.sum() == len(tokens(tokenizer, "sunflowers")) > 1  # not the comma
    pair = word_positions(tokenizer, prompt, ("a cat",))
    assert pair.sum() == 2
    controller = PromptToPrompt(tokenizer, [SOURCE], [TARGET], 4, amplify=4.0,
                                amplify_words=[("giraffe",)], blend_words=[(("cat",),
                                                                            ("giraffe",))])
    giraffe = word_spans(tokenizer, TARGET)[4]
    assert controller.equalizer[0].eq(4.0).nonzero().flatten().tolist() == giraffe
    assert controller.blend[1 - 1][1].nonzero().flatten().tolist() == giraffe


def test_cross_attention_of_the_target_is_the_mapped_source(tokenizer):
    controller = PromptToPrompt(tokenizer, [SOURCE], [TARGET], num_steps=4, amplify=1.0)
    controller.begin_step(0)
    heads, pixels, length = 2, 5, tokenizer.model_max_length
    probs = torch.rand(2 * heads, pixels, length).softmax(-1)  # (2B * heads, pixels, tokens)
    out = controller(probs, is_cross=True)
    source, target = probs.reshape(2, heads, pixels, length)
    expected = source @ controller.mapper[0]  # (heads, pixels, tokens)
    torch.testing.assert_close(out.reshape(2, heads, pixels, length)[1], expected)
    torch.testing.assert_close(out.reshape(2, heads, pixels, length)[0], source)


def test_icd_edit_with_p2p_replace_and_refine(pipe, image):
    blend, amplify = [(("cat",), ("giraffe",))], [("giraffe",)]
    edit = icd_edit(pipe, image, SOURCE, TARGET, w=20.0, tau=0.8, blend_words=blend,
                    amplify_words=amplify)
    assert edit.nfe == 8 and edit.images.shape == image.shape
    assert torch.isfinite(edit.images).all()
    # the source branch is unguided and uncontrolled: it is the reconstruction
    torch.testing.assert_close(edit.reconstructions, pipe.reconstruct(image, SOURCE).images,
                               atol=1e-4, rtol=0)
    # a blend that selects no pixel hands every pixel back to the source branch
    nothing = icd_edit(pipe, image, SOURCE, TARGET, w=20.0, blend_words=blend,
                       p2p=P2PSettings(blend_threshold=1.0))
    torch.testing.assert_close(nothing.images, nothing.reconstructions)
    assert (edit.images - edit.reconstructions).abs().max() > 1e-3
    # amplifying the several tokens of "giraffe" changes the edit
    flat = icd_edit(pipe, image, SOURCE, TARGET, w=20.0, p2p=P2PSettings(1.0, 0.0, amplify=1.0),
                    amplify_words=amplify)
    loud = icd_edit(pipe, image, SOURCE, TARGET, w=20.0, p2p=P2PSettings(1.0, 0.0, amplify=4.0),
                    amplify_words=amplify)
    assert (loud.images - flat.images).abs().max() > 1e-4
    refined = icd_edit(pipe, image, SOURCE, ADDED, w=20.0, amplify_words=[("sunflowers",)],
                       blend_words=[((), ("watercolor", "sunflowers"))])
    assert refined.nfe == 8 and torch.isfinite(refined.images).all()


def test_sd15_blend_reads_the_quarter_resolution_maps(pipe, tokenizer):
    controller = P2PSettings().controller(tokenizer, [SOURCE], [TARGET], 4, preset="sd15")
    assert controller.blend_downsample == 4
    controller._maps = [torch.zeros(2, 77, side, side) for side in (16, 8, 4, 2)]
    assert [m.shape[-1] for m in controller._blend_maps(16)] == [4]  # 64 -> 16 at 512^2
    assert P2PSettings().controller(tokenizer, [SOURCE], [TARGET], 4).blend_downsample is None


def test_prompt_switch_edit(pipe, image):
    switched = prompt_switch_edit(pipe, image, SOURCE, TARGET, w=20.0, tau=0.8)
    assert switched.nfe == 8 and torch.isfinite(switched.images).all()
    unguided = prompt_switch_edit(pipe, image, SOURCE, TARGET, w=1.0)
    torch.testing.assert_close(unguided.images, pipe.reconstruct(image, SOURCE).images)


@pytest.mark.parametrize("method, nfe", [("ddim", 3 * 4), ("npi", 3 * 4),
                                         ("nti", 4 + 4 * (2 + 2) + 2 * 4)])
def test_baselines_run_on_plain_sd15_with_cfg(pipe, image, method, nfe):
    base = pipe.base
    assert base.unet is pipe.base_unet and base.unet.config.time_cond_proj_dim is None
    edit = baseline_edit(base, image, SOURCE, TARGET, method, w=7.5, steps=4,
                         blend_words=[(("cat",), ("giraffe",))], nti_inner_steps=2)
    # inversion: 1 pass a step; decoding: 2 (CFG) a step; NTI: + 2 inner passes + 2 per step
    assert edit.nfe == nfe
    assert edit.images.shape == image.shape and torch.isfinite(edit.images).all()


def test_other_image_sizes_are_resized_or_cropped_with_a_warning(pipe):
    wide = torch.rand((1, 3, 100, 140), generator=torch.Generator().manual_seed(1)) * 2 - 1
    with pytest.warns(ImageResizeWarning, match=r"140x100 \(W x H\) were resized \(aspect ratio "
                                                 r"changed\) to 128x128"):
        encoded = pipe.encode(wide, SOURCE)
    assert encoded.latents.shape == (1, 4, 16, 16)
    pipe.register_to_config(image_fit="crop")
    try:
        with pytest.warns(ImageResizeWarning, match="centre-cropped to 100x100 and resized"):
            cropped = pipe.base.fit_images(wide)
    finally:
        pipe.register_to_config(image_fit="resize")
    square = wide[..., :, 20:120]
    expected = torch.nn.functional.interpolate(square, size=(128, 128), mode="bilinear",
                                               antialias=True).clamp(-1, 1)
    torch.testing.assert_close(cropped, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImageResizeWarning)  # the VAE's size passes silently
        pipe.base.fit_images(torch.zeros(1, 3, 128, 128))


def test_the_bench_runs_at_tiny_size_on_the_cpu(pipe):
    from icd_lite.sd15.bench import print_report, run_bench

    report = run_bench({}, runs=1, warmup=0, baseline_steps=2, nti_inner_steps=1, pipe=pipe)
    assert report["nfe"]["icd_p2p"] == 8
    assert set(report["times"]) == {"icd_p2p", "icd_prompt_switch", "icd_floor", "ddim_floor",
                                    "ddim_p2p", "npi_p2p", "nti_p2p"}
    assert all(t["runs"] == 1 and t["median_s"] > 0 for t in report["times"].values())
    assert report["icd_over_floor"] > 0 and report["weights_GB"] > 0
    print_report(report)
