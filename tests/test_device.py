"""Device leaks, caught on a machine without a GPU: every public path runs under a checker that
simulates a second device (``tests/devicecheck.py``).

Why a leak is caught. On a GPU the models' weights are on ``cuda``; a tensor that icd-lite makes
without ``device=`` (``torch.zeros(3)``, ``torch.tensor(values)``, ``torch.randn(shape)``,
``torch.from_numpy(...)``) is on the CPU, and the first op that combines the two raises
"Expected all tensors to be on the same device". On a CPU-only machine (CI, this one) both are
the same device and the bug is invisible. The checker is a ``TorchFunctionMode``: it sees every
torch call and tags each tensor *host* (made by icd-lite's code without a device, from numpy,
by ``.cpu()``, or computed from host tensors only) or *device* (the models' weights, anything
moved with ``.to(device)``, anything made with ``device=x.device``). An op that mixes the two is
exactly an op that would raise on a GPU, and is recorded with the icd-lite line that called it;
so is a factory call with a CPU ``generator=`` and a ``device=``, which CUDA refuses (noise is
drawn on the CPU and then moved). Each test below runs one public path at a tiny size and
asserts that nothing was recorded: if any ``torch.zeros`` / ``torch.tensor`` / ``torch.randn``
on these paths lost its ``device=`` (or its ``.to(device)``), its test fails, naming the line.

Why not ``torch.set_default_device("meta")``: meta tensors have no values, so every data-
dependent step (``.item()``, ``.tolist()``, boolean masks, ``if t.min() < 0``) fails, and the
harmless create-then-move pattern ``torch.as_tensor(v).to(x.device)`` fails with them; even
``reconstruct``, which runs on CUDA, cannot run. Here every op still computes on the CPU.

What it cannot catch:

* a tensor made with an explicit ``device=torch.device("cpu")`` that later meets the model: a
  torch.device made in code counts as the models' device (the checker cannot tell it from the
  ``torch.device("cuda")`` a user passes), so such CPU bookkeeping is trusted. icd-lite spells
  its CPU bookkeeping ``device="cpu"``, which is tracked as host, and ``device=x.device`` of a
  host x is tracked too;
* tensors made before the checker started (at import, or by the module fixture) are taken as
  on the device, except those listed by ``devicecheck.import_time_host_tensors`` (the noise
  schedule's tables); a module-level CPU constant added later must be listed there;
* ops torch performs in C++ (inside one call) and, by design, ops in torch's optimizers,
  autograd and gradient clipping, which handle devices themselves;
* anything CUDA does differently beyond device placement (dtype support, numerics): the
  CPU/GPU equality check of ``tools/gpu_check.sh`` covers that on a GPU machine.
"""

import os

import numpy as np
import pytest
import torch

from devicecheck import ICD_DIR, DeviceLeakChecker, import_time_host_tensors, no_leaks
from icd_lite import baselines, bench, cli, editing, losses
from icd_lite.experiments import editing_evaluation, evaluation, toybench
from icd_lite.experiments.world_quality import measure_world
from icd_lite import load_components, load_pipeline, metrics, toy2d
from icd_lite.distill import RECIPES, LatentCaptions, distill, encode_dataset
from icd_lite.students import student_from_teacher
from icd_lite.world import checkpoints, train
from icd_lite.world.loading import load_clip, load_vae
from icd_lite.world.models import build_vae
from icd_lite.world.scenes import make_dataset
from icd_lite.world.text import build_tokenizer

# Under the checker a torch.device stands for the GPU (the string "cpu" would mean the host).
DEVICE = torch.device("cpu")
PROMPT = "a small red circle on a gray background"


# -- the checker itself ----------------------------------------------------------------------------
SNIPPETS = '''
def made_on_the_host(x):
    return x + torch.zeros(3)

def made_on_the_device(x):
    return x + torch.zeros(3, device=x.device)

def drawn_on_the_cpu_then_moved(x, g):
    return x + torch.randn(3, generator=g).to(x.device)

def drawn_with_a_cpu_generator_on_the_device(x, g):
    return x + torch.randn(3, generator=g, device=x.device)

def from_numpy_then_moved(x):
    return x + torch.from_numpy(np.zeros(3, dtype=np.float32)).to(x.device)

def host_scalar_and_host_index(x):
    index = torch.tensor([0, 2])
    return x[index] * torch.tensor(2.0)

def spelt_cpu_meets_the_device(x):
    return x + torch.ones(3, device="cpu")

def kept_status_of_as_tensor(x):
    return torch.as_tensor(torch.ones(3).to(x.device)) + x
'''


@pytest.fixture(scope="module")
def snippets():
    """Functions compiled with a file name inside the icd_lite package, as icd-lite code."""
    namespace = {"torch": torch, "np": np}
    exec(compile(SNIPPETS, os.path.join(ICD_DIR, "_devicecheck_snippets.py"), "exec"), namespace)
    return namespace


def leaks_of(function, *args):
    with DeviceLeakChecker() as checker:
        function(*args)
    return checker.leaks


@pytest.mark.parametrize("name, leaks", [
    ("made_on_the_host", 1), ("made_on_the_device", 0), ("drawn_on_the_cpu_then_moved", 0),
    ("drawn_with_a_cpu_generator_on_the_device", 1), ("from_numpy_then_moved", 0),
    ("host_scalar_and_host_index", 0), ("spelt_cpu_meets_the_device", 1),
    ("kept_status_of_as_tensor", 0)])
def test_the_checker_flags_exactly_what_a_gpu_would_refuse(snippets, name, leaks):
    x, generator = torch.ones(3), torch.Generator().manual_seed(0)
    args = (x, generator) if name.startswith("drawn") else (x,)
    found = leaks_of(snippets[name], *args)
    assert len(found) == leaks, found
    for leak in found:
        assert leak.where.startswith("icd_lite/_devicecheck_snippets.py:")


def test_the_checker_leaves_code_outside_icd_lite_alone():
    """The same mistake in a test (or a user's script) is not icd-lite's: not recorded."""
    assert leaks_of(lambda: torch.ones(3) + torch.zeros(3)) == []


def test_the_report_names_the_op_and_the_line(snippets):
    with DeviceLeakChecker() as checker:
        snippets["made_on_the_host"](torch.ones(3))
    report = checker.report()
    assert "icd_lite/_devicecheck_snippets.py:3: add" in report and "host [3]" in report


# -- the toy world, loaded once ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def world():
    components = load_components("toy", device=DEVICE)
    return components, load_pipeline("G", components)


@pytest.fixture(scope="module")
def cases():
    """One ToyBench case each of: a colour edit, an added object (no source blend word: the
    blend's empty mask) and a removed one (no target blend word)."""
    by_type = {case.edit_type: case for case in toybench.stratified_subset(
        toybench.load_toybench(), 1)}
    return [by_type["color"], by_type["add"], by_type["remove"]]


def edit_inputs(cases):
    source, _, _, sources, targets = toybench.case_batch(cases)
    return source, sources, targets, editing_evaluation.blend_words(cases)


def test_generate(world):
    _, pipe = world
    with no_leaks():
        out = pipe.generate([PROMPT, PROMPT], w=8.0, tau=0.8, seed=1)
    assert out.images.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("w, tau", [(1.0, None), (8.0, 0.8)])
def test_reconstruct(world, w, tau):
    _, pipe = world
    with no_leaks():
        images, captions, _ = make_dataset(2, seed=3)  # rendered on the host
        out = pipe.reconstruct(images, captions, w=w, tau=tau)
    assert out.nfe == 8


def test_icd_edit_with_local_blend_and_reweighting(world, cases):
    _, pipe = world
    with no_leaks():
        source, sources, targets, blend = edit_inputs(cases)
        edit = editing.icd_edit(pipe, source, sources, targets, w=4.0, tau=0.8,
                                p2p=editing.P2PSettings(amplify=4.0), blend_words=blend,
                                amplify_words=[case.changed_words or None for case in cases])
    assert edit.images.shape == (3, 3, 32, 32) and edit.nfe == 8


def test_prompt_switch_edit(world, cases):
    _, pipe = world
    with no_leaks():
        source, sources, targets, _ = edit_inputs(cases)
        editing.prompt_switch_edit(pipe, source, sources, targets)


@pytest.mark.parametrize("method", editing.BASELINES)
def test_baseline_edit(world, cases, method):
    components, _ = world
    with no_leaks():
        source, sources, targets, blend = edit_inputs(cases[1:])
        edit = editing.baseline_edit(components, source, sources, targets, method, steps=3,
                                     blend_words=blend, nti_inner_steps=1)
    assert edit.images.shape == (2, 3, 32, 32)


def test_baseline_reconstructions(world):
    components, _ = world
    with no_leaks():
        images, captions, _ = make_dataset(2, seed=4)
        baselines.ddim_reconstruct(components, images, captions, w=8.0, tau=0.8, steps=3)
        baselines.negative_prompt_reconstruct(components, images, captions, steps=3)
        baselines.null_text_reconstruct(components, images, captions, steps=3, inner_steps=1)


def test_every_metric(world, cases):
    components, _ = world
    perception = metrics.ToyPerception(components.clip, components.tokenizer)
    generated = torch.rand(3, 3, 32, 32) * 2 - 1  # made by the test: on the device
    with no_leaks():
        real, captions, scenes = make_dataset(3, seed=6)  # on the host
        keep = torch.from_numpy(np.ones((3, 32, 32), dtype=bool))
        for a, b in [(generated, real), (real, generated)]:
            metrics.mse(a, b), metrics.psnr(a, b), metrics.ssim(a, b), metrics.ssim(a, b, keep)
            metrics.masked_mse(a, b, keep), metrics.masked_psnr(a, b, keep)
            perception.dino_like(a, b), perception.lpips_like(a, b)
            toybench.structure_distance(perception, a, b)
        perception.clip_t(generated, captions), perception.clip_t(real, captions)
        features = perception.image_embeddings(generated)
        metrics.frechet_distance(features, perception.image_embeddings(real))
        metrics.latent_nll(components.encode_images(real))
        single = [i for i, scene in enumerate(scenes) if len(scene.objects) == 1]
        perception.attribute_accuracy(generated[single], [scenes[i] for i in single])
        edited = torch.rand(len(cases), 3, 32, 32) * 2 - 1
        rows = toybench.evaluate(perception, cases, edited)
        toybench.summarize(rows)


def test_inversion_experiments(world):
    components, pipe = world
    perception = metrics.ToyPerception(components.clip, components.tokenizer)
    with no_leaks():
        images, captions, _ = make_dataset(2, seed=8)
        real_features = perception.image_embeddings(images)
        evaluation.table1(components, images, captions, perception, real_features, steps=2)
        evaluation.threshold_curve(components, images, captions, thresholds=(0.4, 1.0), steps=2)


def test_editing_tradeoff(world, cases):
    components, pipe = world
    perception = metrics.ToyPerception(components.clip, components.tokenizer)
    with no_leaks():
        editing_evaluation.tradeoff(
            perception, cases[:1],
            lambda w: lambda x, s, t, b: editing.icd_edit(pipe, x, s, t, w, blend_words=b),
            [2.0], "iCD")


# -- training ------------------------------------------------------------------------------------------
def test_a_distillation_step(world):
    components, _ = world
    with no_leaks():
        images, captions, _ = make_dataset(4, seed=9)
        data = encode_dataset(components, images, captions)
        distill(components, RECIPES["G"], data, steps=1, batch=2)


def test_an_icd_training_step_on_a_unet(world):
    components, _ = world
    reverse, forward = (student_from_teacher(components.unet) for _ in range(2))
    optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-5) for model in (reverse, forward)]
    config = RECIPES["G"].icd_config()
    with no_leaks():
        images, captions, _ = make_dataset(2, seed=10)
        data = encode_dataset(components, images, captions)
        assert isinstance(data, LatentCaptions)
        x0, cond, null = data.batch(2, torch.Generator().manual_seed(0))
        losses.icd_training_step(reverse, forward, components.eps_model(), *optimizers, x0,
                                 cond, null, config, torch.Generator().manual_seed(1))


def test_the_2d_world_trains_where_it_lives():
    world = toy2d.default_world(DEVICE)
    with no_leaks():
        init = toy2d.fit_eps_student(world, steps=2, batch=16, disable=True)
        toy2d.distill_pair(world, init, RECIPES["G"].icd_config(), steps=1, batch=16,
                           disable=True)


@pytest.fixture
def scratch_training(tmp_path, monkeypatch):
    """World training into tmp_path: checkpoints there, and the shipped weights untouched."""
    monkeypatch.setattr(train, "CHECKPOINT_DIR", tmp_path / "train")
    monkeypatch.setattr(checkpoints, "WEIGHTS_DIR", tmp_path / "weights")
    monkeypatch.setattr(checkpoints, "MANIFEST", tmp_path / "weights" / "manifest.json")
    return tmp_path


def test_a_world_training_step_of_every_stage(scratch_training):
    tokenizer = build_tokenizer()
    with no_leaks():
        images, captions, _ = make_dataset(8, seed=12)
        clip = train.train_clip(images, captions, tokenizer, steps=1, batch=4, save_every=1,
                                command="clip", device=DEVICE)
        train.train_vae(images, steps=1, batch=2, save_every=1, command="vae", device=DEVICE)
        train.finetune_clip_on_decoded(clip, build_vae(), images, captions, tokenizer,
                                       steps=1, batch=4, save_every=1, command="decoded",
                                       device=DEVICE)
    with no_leaks():  # the teacher's data from the shipped CLIP and VAE, then one step
        latents, caption_index, embeddings = train.teacher_data(
            load_clip(tokenizer, DEVICE), load_vae(DEVICE), images, captions, tokenizer, DEVICE)
        train.train_teacher(latents, caption_index, embeddings, steps=2, batch=4, save_every=1,
                            command="teacher", until=1, device=DEVICE)


# -- the benches and the command line -------------------------------------------------------------------
def test_bench_world():
    with no_leaks():
        results = measure_world(n=4, steps=2, device=DEVICE)
    assert results["n"] == 4


def test_bench_inversion():
    with no_leaks():
        results = bench.bench_inversion(n=2, timing_images=1, device=DEVICE, recipes=["G"],
                                        steps=2, nti_inner_steps=1)
    assert [row["method"] for row in results["table6"]][0].startswith("iCD")


def test_bench_editing():
    with no_leaks():
        results = bench.bench_editing(per_type=1, nti_per_type=1, device=DEVICE,
                                      timing_cases=1, fast_repeats=1, steps=2, nti_inner_steps=1)
    assert results["cases"] == 6 and "NTI + P2P" in results["toybench"]


def test_the_command_line(tmp_path, capsys):
    image = tmp_path / "in.png"
    with no_leaks():
        assert cli.main(["generate", "--prompt", PROMPT, "--out", str(image),
                         "--device", "cpu"]) == 0
        assert cli.main(["invert", "--image", str(image), "--prompt", PROMPT,
                         "--out", str(tmp_path / "noise.safetensors"),
                         "--reconstruction", str(tmp_path / "rec.png"), "--device", "cpu"]) == 0
        assert cli.main(["edit", "--image", str(image), "--source", PROMPT,
                         "--target", PROMPT.replace("circle", "square"), "--blend", "circle",
                         "square", "--out", str(tmp_path / "out.png"), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.count("NFE") == 4


def test_import_time_tables_count_as_host():
    """The schedule's tables stay on the CPU on a GPU machine: indexing them with a device
    tensor must be caught (world/train.py's min-SNR weight once did)."""
    tables = import_time_host_tensors()
    assert any(t.shape == (1000,) for t in tables)
    source = "def weight(t, table):\n    return table[t]\n"
    namespace = {}
    exec(compile(source, os.path.join(ICD_DIR, "_devicecheck_table.py"), "exec"), namespace)
    with DeviceLeakChecker(host=tables) as checker:
        namespace["weight"](torch.tensor([1, 2]), tables[0])
    assert [leak.op for leak in checker.leaks] == ["__getitem__"]
    with DeviceLeakChecker(host=tables) as checker:
        train.min_snr_weight(torch.tensor([1, 500]))
    assert checker.leaks == []
