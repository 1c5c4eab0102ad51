"""icd_lite.sd15.train on tiny SD1.5-type components (CPU): training lowers the pair's
reconstruction error, a resumed run equals an uninterrupted one, two accelerate processes equal
one, the output loads back (our loader and the SD1.5 loader, for a CFG-distilled and a real-CFG
teacher), and bad data fails in one line."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sd15_train_launch import (launch, make_coco_data, make_model_folder, tiny_unet,
                               train_args)
from icd_lite.sd15 import data as sd15_data
from icd_lite.sd15.train import (PREFIX, TrainConfig, load_models, load_student_unet, main,
                                 shard_plan, train)

FORWARD, REVERSE = "forward-19-259-519-779.safetensors", "reverse-259-519-779-999.safetensors"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny diffusers folder (with a CFG-distilled teacher UNet in teacher/) and 8 COCO rows."""
    root = tmp_path_factory.mktemp("sd15")
    return make_model_folder(root / "model", distilled_teacher=True), \
        make_coco_data(root / "data")


def _accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def _cache(world, folder):
    tokenizer, text_encoder, vae, unet = load_models(world[0])
    encoder = sd15_data.Encoder(vae, text_encoder, tokenizer)
    pairs = sd15_data.open_source(world[1], resolution=16)
    sd15_data.encode_to_cache(pairs, encoder, folder)
    return unet, sd15_data.LatentCache(folder)


def _same_files(a, b, names, atol, adam_noise=0.0):
    """Equal within atol; with ``adam_noise`` > 0, up to 1 element in 1000 may differ by up to
    ``adam_noise``: Adam divides by sqrt(v), so a gradient component at the rounding level
    (~1e-9, near AdamW's eps 1e-8) moves its weight by a fraction of lr in either run, in a
    direction the summation order decides."""
    for name in names:
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys()
        diff = torch.cat([(x[k] - y[k]).abs().flatten() for k in x])
        allowed = 1e-3 if adam_noise else 0.0
        assert (diff > atol).float().mean() <= allowed, (name, int((diff > atol).sum()))
        assert diff.max() <= max(atol, adam_noise), (name, diff.max())


def _student_eps(unet, z, cond, w):
    t = torch.full((z.shape[0],), 519)
    embedding = None
    if unet.config.time_cond_proj_dim:
        from icd_lite.guidance import guidance_embedding
        embedding = guidance_embedding(torch.full((z.shape[0],), w),
                                       unet.config.time_cond_proj_dim)
    return unet(z, t, encoder_hidden_states=cond, timestep_cond=embedding).sample


def test_a_few_steps_lower_the_reconstruction_error_and_the_pair_loads_back(world, tmp_path):
    """Real-CFG teacher: 4 iterations of the four updates lower encode -> decode MSE; the
    files are the release's layout; the reverse projection is trained, the forward one zero."""
    unet, cache = _cache(world, tmp_path / "latents")
    config = TrainConfig(steps=4, batch=4, micro_batch=4, lr=3e-3, lora_rank=4, lora_alpha=4,
                         eval_every=4, save_every=4, eval_samples=4,
                         gradient_checkpointing=False)
    students, history = train(_accelerator(), unet, cache, config, tmp_path / "out")
    curve = [e["reconstruction_mse"] for e in history if "reconstruction_mse" in e]
    assert len(curve) == 2 and curve[-1] < 0.97 * curve[0], curve
    assert {"reverse_cd", "forward_cd", "forward_preservation", "reverse_preservation"} \
        <= set(history[-2])
    out = tmp_path / "out"
    lora = load_file(str(out / FORWARD))
    assert lora and all(k.startswith(PREFIX) and ".lora_" in k for k in lora)
    assert load_file(str(out / REVERSE)).keys() == lora.keys()
    assert list(load_file(str(out / "cond_proj.safetensors"))) == \
        ["reverse.time_embedding.cond_proj.weight"]
    assert not students["forward"].unet.time_embedding.cond_proj.weight.any()
    assert json.loads((out / "icd_lora.json").read_text())["lora_alpha"] == 4
    assert (out / "progress.csv").read_text().startswith("step,seconds,reconstruction_mse")
    # round trip: the files, fused onto the teacher, give the trained students' outputs
    teacher = load_models(world[0])[3]
    z, cond = cache.get([0, 1])
    for role, w in (("forward", 0.0), ("reverse", 7.0)):
        with torch.no_grad():
            expected = students[role](z, torch.full((2,), 519), None, cond, torch.full((2,), w))
            got = _student_eps(load_student_unet(out, role, teacher), z, cond, w)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def _max_weight_difference(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


def test_a_real_cfg_pair_loads_through_the_sd15_loader(world, tmp_path):
    """One iteration with the plain UNet as teacher (real CFG, trained reverse projection):
    ``load_sd15_pipeline(cond_proj=...)`` gives the trained students (outputs within 1e-5) and
    the same UNets as ``load_student_unet`` (weights within 1e-5); the guard, a wrong shape
    and a missing file fail in one line."""
    from safetensors.torch import save_file

    from icd_lite.sd15.loading import LoRAFileError, load_sd15_pipeline

    unet, cache = _cache(world, tmp_path / "latents")
    config = TrainConfig(steps=1, batch=2, micro_batch=2, lr=3e-3, lora_rank=4, lora_alpha=4,
                         eval_every=0, save_every=1, gradient_checkpointing=False)
    out = tmp_path / "out"
    students, _ = train(_accelerator(), unet, cache, config, out)
    assert students["reverse"].unet.time_embedding.cond_proj.weight.abs().max() > 0
    options = dict(base=world[0], loras=out, device="cpu", rank=None, lora_alpha=4)
    pipe = load_sd15_pipeline(None, cond_proj=out, **options)
    assert pipe.base_unet.config.time_cond_proj_dim is None  # plain SD1.5 for the baselines
    plain = load_models(world[0])[3]
    z, cond = cache.get([0, 1])
    for role, w in (("forward", 0.0), ("reverse", 7.0)):
        loaded = getattr(pipe, f"{role}_unet")
        assert _max_weight_difference(loaded, load_student_unet(out, role, plain)) <= 1e-5
        with torch.no_grad():
            expected = students[role](z, torch.full((2,), 519), None, cond, torch.full((2,), w))
            got = _student_eps(loaded, z, cond, w)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert not pipe.forward_unet.time_embedding.cond_proj.weight.any()
    with pytest.raises(LoRAFileError, match="real-CFG teacher.*pass cond_proj="):
        load_sd15_pipeline(None, teacher=world[0] / "teacher", **options)
    with pytest.raises(ValueError, match="pass no teacher"):
        load_sd15_pipeline(None, teacher=world[0] / "teacher", cond_proj=out, **options)
    bad = tmp_path / "bad.safetensors"
    save_file({"reverse.time_embedding.cond_proj.weight": torch.zeros(8, 512)}, str(bad))
    with pytest.raises(LoRAFileError, match=r"shape \[8, 512\].*is \[8, 16\]"):
        load_sd15_pipeline(None, cond_proj=bad, **options)
    with pytest.raises(FileNotFoundError, match="no guidance projection at"):
        load_sd15_pipeline(None, cond_proj=tmp_path / "missing.safetensors", **options)


def test_a_resumed_run_equals_an_uninterrupted_one(world, tmp_path):
    """3 iterations at once, and 1 + (resume) 2, through the command line: same weights."""
    options = dict(batch=4, micro_batch=4, save_every=1, eval_every=0)
    args = train_args(*world, tmp_path / "once", steps=3, **options)
    main(args + ["--no-gradient-checkpointing"])
    for steps in (1, 3):
        args = train_args(*world, tmp_path / "twice", steps=steps, **options)
        main(args + ["--no-gradient-checkpointing"])
    _same_files(tmp_path / "once", tmp_path / "twice", [FORWARD, REVERSE, "cond_proj.safetensors"],
                atol=1e-6)
    history = json.loads((tmp_path / "twice" / "checkpoint" / "icd_history.json").read_text())
    assert [e["step"] for e in history] == [1, 2, 3]


def test_two_accelerate_processes_equal_one_process_on_the_whole_batch(world, tmp_path):
    """2 gloo processes x 2 accumulated shards of 1 sample against 1 process x 4 shards, with
    the CFG-distilled teacher, gradient checkpointing in the launched run only: the same LoRAs
    (each shard draws its numbers from (seed, iteration, shard), the gradients are averaged
    over 4 equal shards either way, so only float summation order differs; lr is 1e-3, so a
    missing all-reduce or a shard counted twice would move weights by ~1e-3)."""
    options = dict(steps=2, batch=4, micro_batch=1, eval_every=0, save_every=2,
                   teacher=world[0] / "teacher")
    result = launch(train_args(*world, tmp_path / "two", **options))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "iCD-SD1.5 2/2" in result.stdout
    assert len(list((tmp_path / "two" / "latents").glob("part-*-of-00002.safetensors"))) == 2
    main(train_args(*world, tmp_path / "one", **options) + ["--no-gradient-checkpointing"])
    assert not (tmp_path / "one" / "cond_proj.safetensors").exists()  # teacher's, frozen
    _same_files(tmp_path / "one", tmp_path / "two", [FORWARD, REVERSE], atol=1e-5,
                adam_noise=1e-4)
    # and the SD1.5 loader reads them as a pair of its own (alpha given, rank read)
    loading = pytest.importorskip("icd_lite.sd15.loading")
    pipe = loading.load_sd15_pipeline(None, base=world[0], teacher=world[0] / "teacher",
                                      loras=tmp_path / "one", device="cpu", rank=None,
                                      lora_alpha=4, with_base_unet=False)
    assert pipe.boundaries.reverse == (0, 259, 519, 779)
    teacher = load_models(world[0], world[0] / "teacher")[3]
    z, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 20, 16)
    with torch.no_grad():
        for role in ("forward", "reverse"):
            ours = _student_eps(load_student_unet(tmp_path / "one", role, teacher), z, cond, 7.0)
            theirs = _student_eps(getattr(pipe, f"{role}_unet"), z, cond, 7.0)
            torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_bad_data_and_batches_fail_in_one_line(tmp_path):
    (tmp_path / "img").mkdir()
    bad_csv = tmp_path / "img.csv"
    bad_csv.write_text("idx,file_name,text\n0,a.png,a cat\n")
    with pytest.raises(ValueError, match=r"no column\(s\) \['caption'\]"):
        sd15_data.open_source(bad_csv)
    with pytest.raises(ValueError, match="holds no images"):
        sd15_data.open_source(tmp_path / "img")
    (tmp_path / "img" / "a.png").write_bytes(b"not a png")
    (tmp_path / "img" / "a.txt").write_text("a cat")
    with pytest.raises(ValueError, match="cannot read image .*a.png"):
        sd15_data.open_source(tmp_path / "img")[0]
    (tmp_path / "img" / "b.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no caption file"):
        sd15_data.open_source(tmp_path / "img")
    with pytest.raises(ValueError, match="multiple of --micro-batch 3 x 2 processes"):
        shard_plan(8, 3, 2)
    with pytest.raises(ValueError, match="not a CSV file, an image folder"):
        sd15_data.open_source(tmp_path / "missing.csv")
    try:
        import webdataset  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="need the webdataset package"):
            next(sd15_data.open_source(tmp_path / "shard-000.tar"))


def test_images_are_resized_and_centre_cropped_like_the_authors(tmp_path):
    """Resize(R) on the shorter side then CenterCrop(R), [-1, 1]: a 40 x 20 image whose outer
    fifths are black keeps only its white middle at R = 10 (a squashing resize would not)."""
    from PIL import Image
    import numpy as np

    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, 8:32] = 255
    Image.fromarray(pixels).save(tmp_path / "x.png")
    image = sd15_data.load_image(tmp_path / "x.png", 10)
    assert image.shape == (3, 10, 10)
    assert image.min() > 0.9  # the centre crop is all white (+1)
    assert sd15_data.shuffled_indices(5, 0, 5, 0).sort().values.tolist() == [0, 1, 2, 3, 4]
    assert not torch.equal(sd15_data.shuffled_indices(5, 1, 5, 0),
                           sd15_data.shuffled_indices(5, 0, 5, 0))


def test_a_distilled_teacher_is_called_once_per_reverse_cd_target():
    """With time_cond_proj_dim the teacher reads w itself (one pass); plain: real CFG (two)."""
    from icd_lite.losses import reverse_cd_loss
    from icd_lite.schedule import default_boundaries
    from icd_lite.sd15.train import Teacher, build_students

    for dim, passes in ((16, 1), (None, 2)):
        teacher = Teacher(tiny_unet(time_cond_proj_dim=dim))
        student = build_students(teacher.unet, TrainConfig(lora_rank=2, lora_alpha=2,
                                                           gradient_checkpointing=False))
        calls = []  # hooked after the students are copied from it
        teacher.unet.register_forward_hook(lambda *a: calls.append(1))
        x0, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 20, 16)
        reverse_cd_loss(student["reverse"], teacher, x0, torch.randn_like(x0), cond,
                        torch.zeros_like(cond), default_boundaries(4))
        assert len(calls) == passes
