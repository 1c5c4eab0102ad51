"""Prompt-to-Prompt attention control and the editors, on the shipped toy world and students."""

import pytest
import torch

from icd_lite.attention import (AlignmentError, PromptToPrompt, attention_control,
                                changed_words, token_mapping, word_positions)
from icd_lite import load_pipeline
from icd_lite.editing import P2PSettings, baseline_edit, icd_edit, prompt_switch_edit
from icd_lite.world.scenes import make_dataset

SOURCE = "a small red circle on a gray background"
TARGET = "a small blue circle on a gray background"
ADDED = "a small red circle and a large blue square on a gray background"
NO_CONTROL = P2PSettings(cross_fraction=0.0, self_fraction=0.0, amplify=1.0)


@pytest.fixture(scope="module")
def pipe(components):
    return load_pipeline("G", components)


@pytest.fixture(scope="module")
def image():
    images, _, _ = make_dataset(1, seed=3)
    return images  # any image works: the prompts below need not describe it


def test_every_attention_layer_is_hooked_and_restored(components):
    unet = components.unet
    before = {name: type(p) for name, p in unet.attn_processors.items()}
    controller = PromptToPrompt(components.tokenizer, [SOURCE], [TARGET], num_steps=4)
    with attention_control(unet, controller):
        assert len(controller.hooked) == 14  # 7 transformer blocks, self + cross each
        assert {type(p).__name__ for p in unet.attn_processors.values()} == {
            "ControlledAttnProcessor"}
        controller.begin_step(0)
        cond = components.encode_prompt([SOURCE, TARGET])
        unet(torch.randn(2, 4, 8, 8), torch.tensor([999, 999]), encoder_hidden_states=cond)
        assert controller._called == controller.hooked
        controller.finish()
    assert {name: type(p) for name, p in unet.attn_processors.items()} == before


def test_a_layer_that_bypasses_its_processor_is_an_error(components):
    unet = components.unet
    controller = PromptToPrompt(components.tokenizer, [SOURCE], [TARGET], num_steps=4)
    cond = components.encode_prompt([SOURCE, TARGET])
    with attention_control(unet, controller):
        name = sorted(controller.hooked)[0]
        unet.set_attn_processor({**unet.attn_processors,
                                 name: unet.attn_processors[name].original})
        controller.begin_step(0)
        unet(torch.randn(2, 4, 8, 8), torch.tensor([999, 999]), encoder_hidden_states=cond)
        with pytest.raises(RuntimeError, match="did not run in step 0"):
            controller.begin_step(1)


def test_replace_maps_position_to_position(components):
    mapping, aligned = token_mapping(components.tokenizer, SOURCE, TARGET)
    assert mapping.tolist() == list(range(20)) and aligned.all()


def test_refine_aligns_words_and_leaves_new_words_their_own_maps(components):
    tokenizer = components.tokenizer
    mapping, aligned = token_mapping(tokenizer, SOURCE, ADDED)
    source_words = ["[BOS]"] + SOURCE.split() + ["[EOS]"]
    target_words = ["[BOS]"] + ADDED.split() + ["[EOS]"]
    for j, word in enumerate(target_words):
        if aligned[j]:
            assert source_words[mapping[j]] == word
    new = [w for j, w in enumerate(target_words) if not aligned[j]]
    assert new == ["and", "a", "large", "blue", "square"]
    assert mapping[len(target_words)] == len(source_words)  # padding follows the source's EOS


def test_prompts_that_cannot_be_aligned_get_clear_errors(components):
    tokenizer = components.tokenizer
    with pytest.raises(AlignmentError, match="same token count.*refine"):
        token_mapping(tokenizer, SOURCE, ADDED, mode="replace")
    with pytest.raises(AlignmentError, match="share no words"):
        token_mapping(tokenizer, "red circle", "blue square", mode="refine")
    with pytest.raises(AlignmentError, match="not in the prompt"):
        word_positions(tokenizer, SOURCE, ["square"])
    with pytest.raises(ValueError, match="one entry per edit"):
        PromptToPrompt(tokenizer, [SOURCE], [TARGET], 4, blend_words=[(("circle",),)] * 2)


def test_changed_words():
    assert changed_words(SOURCE, TARGET) == ("blue",)
    assert changed_words(SOURCE, ADDED) == ("and", "a", "large", "blue", "square")


def test_controller_off_equals_plain_guided_decoding(pipe, image):
    edit = icd_edit(pipe, image, SOURCE, TARGET, w=8.0, tau=0.8, p2p=NO_CONTROL)
    noise = pipe.encode(image, SOURCE).latents
    plain = pipe.decode(noise, TARGET, w=8.0, tau=0.8).images
    unguided = pipe.decode(noise, SOURCE).images
    assert edit.nfe == 8
    torch.testing.assert_close(edit.images, plain, atol=1e-4, rtol=0)
    torch.testing.assert_close(edit.reconstructions, unguided, atol=1e-4, rtol=0)


def test_attention_control_changes_only_the_target_branch(pipe, image):
    plain = icd_edit(pipe, image, SOURCE, TARGET, p2p=NO_CONTROL)
    controlled = icd_edit(pipe, image, SOURCE, TARGET, p2p=P2PSettings(1.0, 1.0, amplify=1.0))
    torch.testing.assert_close(controlled.reconstructions, plain.reconstructions)
    assert (controlled.images - plain.images).abs().max() > 0.05


def test_reweighting_changes_the_edit(pipe, image):
    settings = P2PSettings(cross_fraction=1.0, self_fraction=0.0, amplify=1.0)
    flat = icd_edit(pipe, image, SOURCE, TARGET, p2p=settings)
    amplified = icd_edit(pipe, image, SOURCE, TARGET, p2p=P2PSettings(1.0, 0.0, amplify=4.0))
    assert (amplified.images - flat.images).abs().max() > 0.05


def test_local_blend_keeps_the_source_outside_its_mask(pipe, image):
    words = [(("circle",), ("circle",))]
    # a threshold of 1 selects no pixel: the blend hands every pixel back to the source branch
    nothing = icd_edit(pipe, image, SOURCE, TARGET, blend_words=words,
                       p2p=P2PSettings(blend_threshold=1.0))
    torch.testing.assert_close(nothing.images, nothing.reconstructions)
    # a lower threshold lets the edit through where the blend words attend
    local = icd_edit(pipe, image, SOURCE, TARGET, blend_words=words,
                     p2p=P2PSettings(blend_threshold=0.5))
    assert (local.images - local.reconstructions).abs().max() > 0.05


def test_prompt_switch_without_guidance_is_a_reconstruction(pipe, image):
    switched = prompt_switch_edit(pipe, image, SOURCE, TARGET, w=1.0)
    torch.testing.assert_close(switched.images, pipe.reconstruct(image, SOURCE).images)
    assert switched.nfe == 8


# 10 inversion steps + 10 decoding steps of 2 passes (CFG); NTI adds per step one conditional
# pass, 1 or 2 optimisation passes and the pass that moves x
@pytest.mark.parametrize("method, nfe", [("ddim", [30]), ("npi", [30]), ("nti", range(60, 71))])
def test_baselines_edit_and_count_evaluations(components, image, method, nfe):
    edit = baseline_edit(components, image, SOURCE, TARGET, method, steps=10, nti_inner_steps=2)
    assert edit.images.shape == image.shape and edit.reconstructions.shape == image.shape
    assert edit.nfe in nfe
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline_edit(components, image, SOURCE, TARGET, "edict")


def test_npi_source_branch_reconstructs_better_than_ddim_p2p(components, image):
    from icd_lite.metrics import psnr
    ddim = baseline_edit(components, image, SOURCE, TARGET, "ddim", steps=10)
    npi = baseline_edit(components, image, SOURCE, TARGET, "npi", steps=10)
    assert psnr(npi.reconstructions, image) > psnr(ddim.reconstructions, image) + 1.0


def test_editors_on_toybench_count_cases_and_time_against_bare_network_cost(components, pipe):
    from icd_lite.experiments import editing_evaluation, toybench
    from icd_lite.metrics import ToyPerception

    perception = ToyPerception(components.clip, components.tokenizer)
    cases = toybench.stratified_subset(toybench.load_toybench(), 2)
    icd = editing_evaluation.make_editors(components, {"G": pipe})[editing_evaluation.ICD]
    results = editing_evaluation.toybench_results(perception, {"all": icd, "subset": icd}, cases,
                                                  per_type={"subset": 1})
    assert (results["all"]["cases"], results["subset"]["cases"]) == (12, 6)
    summary = results["all"]["summary"]
    assert set(summary) == {"color", "shape", "background", "size", "add", "remove", "all"}
    rows = results["all"]["rows"]
    assert summary["all"]["dino_like"] == pytest.approx(sum(r["dino_like"] for r in rows) / 12)
    assert results["all"]["nfe"] == 8

    timing = editing_evaluation.edit_timing({"iCD": icd}, cases[:1], pipe)
    assert timing[0]["ratio_to_icd"] == 1.0 and timing[0]["nfe"] == 8
    icd_row = timing[0]
    assert icd_row["bare_network_seconds"] < icd_row["paired_edit_seconds"]
    assert icd_row["overhead_ratio"] == pytest.approx(
        icd_row["paired_edit_seconds"] / icd_row["bare_network_seconds"])


def test_guidance_trades_preservation_for_change_in_the_tradeoff(components, pipe):
    from icd_lite.experiments import editing_evaluation, toybench
    from icd_lite.metrics import ToyPerception

    perception = ToyPerception(components.clip, components.tokenizer)
    cases = toybench.stratified_subset(toybench.load_toybench(), 2)
    def icd_at(w):
        return editing_evaluation.make_editors(components, {"G": pipe}, w_icd=w)[
            editing_evaluation.ICD]

    unguided, guided = editing_evaluation.tradeoff(perception, cases, icd_at, (1.0, 8.0), "iCD")
    assert (unguided["w"], guided["w"], guided["editor"]) == (1.0, 8.0, "iCD")
    assert guided["dino_like"] < unguided["dino_like"] - 0.05
    assert guided["bg_psnr"] < unguided["bg_psnr"] - 1.0


def test_malformed_edit_arguments_get_errors_that_show_the_expected_form(pipe, image):
    with pytest.raises(ValueError, match=r"one entry per edit.*\(\('circle',\), \('square',\)\)"):
        icd_edit(pipe, image, SOURCE, TARGET, blend_words="circle")
    with pytest.raises(ValueError, match="each blend_words entry must be"):
        icd_edit(pipe, image, SOURCE, TARGET, blend_words=[("circle", "circle", "circle")])
    with pytest.raises(ValueError, match="tuple of words"):
        icd_edit(pipe, image, SOURCE, TARGET, blend_words=[("circle", "circle")])
    with pytest.raises(ValueError, match="non-empty target prompt"):
        icd_edit(pipe, image, SOURCE, "")


def test_blend_words_are_read_like_the_prompts(pipe, image):
    upper = icd_edit(pipe, image, SOURCE.upper(), TARGET, blend_words=[(("CIRCLE",), ("Circle",))])
    lower = icd_edit(pipe, image, SOURCE, TARGET, blend_words=[(("circle",), ("circle",))])
    torch.testing.assert_close(upper.images, lower.images)
