"""The training loop of the toy world: resumable stages, and shipping weights with a manifest."""

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open

from icd_lite.world import checkpoints, train
from icd_lite.world.models import build_clip, build_vae
from icd_lite.world.scenes import make_dataset
from icd_lite.world.text import build_tokenizer


# run_stage fast-forwards the LR schedule on resume, before any optimizer step: PyTorch warns.
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler\\.step\\(\\)`")


class Crash(Exception):
    pass


def tiny_stage(checkpoint_dir, steps, monkeypatch, save_every=2, crash_at=None, lr=0.5,
               until=None):
    """run_stage on a Linear model with a teacher-style EMA; batches are seeded by the step.

    Returns (model, ema, minutes): minutes is None when the run stopped at ``until``."""
    monkeypatch.setattr(train, "CHECKPOINT_DIR", checkpoint_dir)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = copy.deepcopy(model).requires_grad_(False)
    target = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])

    def loss_fn(step):
        if step == crash_at:
            raise Crash(step)
        if step > 0:
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 0.5)
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(8, 3, generator=generator)
        return (model(x) - x @ target.T).pow(2).mean()

    minutes = train.run_stage("toy", model, loss_fn, steps, lr=lr, save_every=save_every,
                              extra_models={"toy_ema": ema}, until=until)
    return model, ema, minutes


def test_cosine_lr_warms_up_then_decays():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = train.cosine_lr(optimizer, steps=300, warmup=100)
    rates = []
    for _ in range(300):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(0.01) and rates[99] == pytest.approx(1.0)
    assert rates[100] == pytest.approx(1.0) and rates[200] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(rates[100:], rates[101:])) and rates[-1] < 1e-3


def test_run_stage_resumes_exactly(tmp_path, monkeypatch, capsys):
    reference, reference_ema, _ = tiny_stage(tmp_path / "uninterrupted", 6, monkeypatch)
    assert "resuming" not in capsys.readouterr().out

    first, _, _ = tiny_stage(tmp_path / "interrupted", 4, monkeypatch)
    path = tmp_path / "interrupted" / "toy.safetensors"
    with safe_open(str(path), "pt") as file:
        assert file.metadata()["step"] == "4" and file.metadata()["kind"] == "toy"
    with safe_open(str(tmp_path / "interrupted" / "toy_ema.safetensors"), "pt") as file:
        assert file.metadata()["step"] == "4" and file.metadata()["kind"] == "toy_ema"
    assert not torch.equal(first.weight, reference.weight)
    capsys.readouterr()

    resumed, resumed_ema, _ = tiny_stage(tmp_path / "interrupted", 6, monkeypatch)
    assert "toy: resuming at step 4" in capsys.readouterr().out
    for a, b in [(resumed, reference), (resumed_ema, reference_ema)]:
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    with safe_open(str(path), "pt") as file:
        assert file.metadata()["step"] == "6"


def test_run_stage_resumes_a_crashed_run_past_the_warmup(tmp_path, monkeypatch, capsys):
    """A 130-step run (100 warm-up steps, then cosine decay) that crashes at step 117 and is
    started again: it resumes from the checkpoint of step 100 and ends where an uninterrupted
    run ends, so the LR schedule was fast-forwarded correctly."""
    reference, reference_ema, _ = tiny_stage(tmp_path / "a", 130, monkeypatch, save_every=50,
                                             lr=0.05)
    with pytest.raises(Crash):
        tiny_stage(tmp_path / "b", 130, monkeypatch, save_every=50, crash_at=117, lr=0.05)
    capsys.readouterr()
    resumed, resumed_ema, _ = tiny_stage(tmp_path / "b", 130, monkeypatch, save_every=50,
                                         lr=0.05)
    assert "resuming at step 100" in capsys.readouterr().out
    for a, b in [(resumed, reference), (resumed_ema, reference_ema)]:
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_run_stage_stops_at_until_and_a_later_run_finishes_it(tmp_path, monkeypatch, capsys):
    """`make train-world` runs the first steps of a stage on one core (--until-step) and the
    rest on two: the pair ends bit-identical to one uninterrupted run, and only the run that
    reaches the last step reports minutes (and so ships the weights)."""
    reference, reference_ema, minutes = tiny_stage(tmp_path / "a", 7, monkeypatch)
    assert minutes is not None
    _, _, minutes = tiny_stage(tmp_path / "b", 7, monkeypatch, until=3)  # 3: not a save step
    assert minutes is None
    with safe_open(str(tmp_path / "b" / "toy.safetensors"), "pt") as file:
        assert file.metadata()["step"] == "3"
    capsys.readouterr()
    resumed, resumed_ema, minutes = tiny_stage(tmp_path / "b", 7, monkeypatch)
    assert "resuming at step 3" in capsys.readouterr().out and minutes is not None
    for a, b in [(resumed, reference), (resumed_ema, reference_ema)]:
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def linear_stage(checkpoint_dir, rank=0, processes=1, steps=6):
    """A Linear model trained by run_stage; each process takes its share of every batch."""
    train.CHECKPOINT_DIR = checkpoint_dir
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    target = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])

    def loss_fn(step):
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(step))[rank::processes]
        return (model(x) - x @ target.T).pow(2).mean()

    train.run_stage("toy", model, loss_fn, steps, lr=0.1, save_every=2, rank=rank,
                    processes=processes)
    return model


def two_process_worker(rank, checkpoint_dir, port):
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert train.data_parallel() == (rank, 2)
    linear_stage(checkpoint_dir, rank, 2)
    dist.destroy_process_group()


def test_two_processes_train_like_one_on_the_whole_batch(tmp_path):
    """Under torchrun each process computes half of every batch and the gradients are averaged:
    the weights rank 0 saves are those of one process on the whole batch."""
    one = linear_stage(tmp_path / "one")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    mp.spawn(two_process_worker, args=(tmp_path / "two", port), nprocs=2)
    two = torch.nn.Linear(3, 2)
    assert checkpoints.load_state(tmp_path / "two" / "toy.safetensors", two, kind="toy") == 6
    assert torch.allclose(two.weight, one.weight, atol=1e-6)
    assert torch.allclose(two.bias, one.bias, atol=1e-6)
    torch.manual_seed(0)
    assert not torch.allclose(two.weight, torch.nn.Linear(3, 2).weight)  # it did train


def test_min_snr_weight_caps_the_clean_steps_only():
    t = torch.tensor([1, 50, 100, 150, 500, 999])
    weight = train.min_snr_weight(t, gamma=5.0)
    alpha_bar = train.SD15_SCHEDULE.alphas_cumprod[t]
    assert torch.allclose(weight[:3], 5.0 * (1 - alpha_bar[:3]) / alpha_bar[:3])
    assert torch.all(weight[:3] < 1) and torch.all(weight[3:] == 1)


def test_run_stage_saves_every_and_at_the_end(tmp_path, monkeypatch):
    saved = []
    real_save = checkpoints.save_state
    monkeypatch.setattr(checkpoints, "save_state",
                        lambda path, model, optimizer=None, step=0, kind="", seconds=0.0:
                        saved.append((kind, step))
                        or real_save(path, model, optimizer, step, kind, seconds))
    tiny_stage(tmp_path, 5, monkeypatch, save_every=2)
    assert saved == [("toy", 2), ("toy_ema", 2), ("toy", 4), ("toy_ema", 4), ("toy", 5),
                     ("toy_ema", 5)]


def test_ship_writes_weights_and_manifest(tmp_path, monkeypatch):
    weights = tmp_path / "weights"
    manifest = weights / "manifest.json"
    monkeypatch.setattr(checkpoints, "WEIGHTS_DIR", weights)
    monkeypatch.setattr(checkpoints, "MANIFEST", manifest)  # read at call time by record()
    model = torch.nn.Linear(3, 2)
    train.ship("vae", model, "python -m icd_lite.world.train --stage vae", scaling_factor=0.25,
               train_minutes=1.0)
    path = weights / "vae.safetensors"
    entry = checkpoints.read_manifest(manifest)["vae.safetensors"]
    assert entry["sha256"] == checkpoints.sha256(path)
    assert entry["command"] == "python -m icd_lite.world.train --stage vae"
    assert entry["scaling_factor"] == 0.25 and entry["train_minutes"] == 1.0
    assert checkpoints.verified_path("vae.safetensors", manifest=manifest) == path
    loaded = torch.nn.Linear(3, 2)
    assert checkpoints.load_state(path, loaded, kind="vae") == 0
    assert torch.equal(loaded.weight, model.weight)


def test_training_time_is_summed_over_resumed_runs(tmp_path, monkeypatch):
    tiny_stage(tmp_path, 4, monkeypatch, save_every=2)
    first = checkpoints.saved_seconds(tmp_path / "toy.safetensors")
    tiny_stage(tmp_path, 6, monkeypatch, save_every=2)
    assert checkpoints.saved_seconds(tmp_path / "toy.safetensors") > first > 0


def test_clip_decoded_stage_tunes_the_image_tower_only(tmp_path, monkeypatch):
    """Stage 3 trains the image tower on real and decoded images; the text tower (the teacher's
    text encoder) stays bit-identical, and the manifest sums both stages' minutes."""
    weights = tmp_path / "weights"
    monkeypatch.setattr(train, "CHECKPOINT_DIR", tmp_path / "train")
    monkeypatch.setattr(checkpoints, "WEIGHTS_DIR", weights)
    monkeypatch.setattr(checkpoints, "MANIFEST", weights / "manifest.json")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    clip = build_clip(tokenizer)
    train.ship("clip", clip, "python -m icd_lite.world.train --stage clip", train_minutes=2.0)
    text_before = copy.deepcopy(clip.text_model.state_dict())
    vision_before = copy.deepcopy(clip.vision_model.state_dict())
    images, captions, _ = make_dataset(8, seed=5)

    train.finetune_clip_on_decoded(clip, build_vae().eval(), images, captions, tokenizer,
                                   steps=2, batch=4, save_every=2, command="stage 3")
    for name, value in clip.text_model.state_dict().items():
        assert torch.equal(value, text_before[name]), name
    assert any(not torch.equal(value, vision_before[name])
               for name, value in clip.vision_model.state_dict().items())
    entry = checkpoints.read_manifest()["clip.safetensors"]
    assert entry["command"] == "python -m icd_lite.world.train --stage clip"
    assert entry["decoded_command"] == "stage 3" and entry["contrastive_minutes"] == 2.0
    assert entry["train_minutes"] == round(2.0 + entry["decoded_minutes"], 1)

    (tmp_path / "train" / "clip_decoded.safetensors").unlink()
    with pytest.raises(RuntimeError, match="already fine-tuned.*--stage clip"):
        train.finetune_clip_on_decoded(clip, build_vae().eval(), images, captions, tokenizer,
                                       steps=2, batch=4, save_every=2, command="again")
