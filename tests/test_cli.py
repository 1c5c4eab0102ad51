"""The command line, run in-process through ``cli.main`` on the shipped toy students."""

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from icd_lite.cli import blend_words, main
from icd_lite.world.scenes import Scene, SceneObject, caption, render

SCENE = Scene("gray", "plain", (SceneObject("circle", "red", "small", 16, 16),))
SOURCE = caption(SCENE)  # "a small red circle on a gray background"
TARGET = SOURCE.replace("red", "blue")


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float64)


@pytest.fixture
def image_file(tmp_path):
    """The scene rendered by the toy world and saved as a 32x32 RGB PNG."""
    image = ((render(SCENE)[0] + 1) * 127.5).round().astype(np.uint8).transpose(1, 2, 0)
    path = tmp_path / "in.png"
    Image.fromarray(image).save(path)
    return path


def edit(image, out, *extra):
    return main(["edit", "--image", str(image), "--source", SOURCE, "--target", TARGET,
                 "--out", str(out), *extra])


def test_edit_writes_an_edited_png_and_leaves_the_input_alone(image_file, tmp_path, capsys):
    before = image_file.read_bytes()
    out, rec = tmp_path / "new" / "dir" / "out.png", tmp_path / "rec.png"
    assert edit(image_file, out, "--blend", "circle", "--reconstruction", str(rec)) == 0
    with Image.open(out) as picture:
        assert picture.size == (32, 32) and picture.mode == "RGB"
    assert np.abs(pixels(out) - pixels(image_file)).max() > 50
    assert pixels(rec).shape == (32, 32, 3)
    assert image_file.read_bytes() == before
    line = capsys.readouterr().out
    assert "NFE 8" in line and str(out) in line


def test_three_step_students(image_file, tmp_path, capsys):
    assert edit(image_file, tmp_path / "out.png", "--steps", "3", "--scale", "2") == 0
    assert "NFE 6" in capsys.readouterr().out
    assert Image.open(tmp_path / "out.png").size == (64, 64)


@pytest.mark.parametrize("option", ["--out", "--reconstruction"])
def test_the_input_is_never_overwritten(image_file, tmp_path, capsys, option):
    before = image_file.read_bytes()
    same = tmp_path / "sub" / ".." / image_file.name  # another spelling of the input's path
    outputs = {"--out": str(tmp_path / "out.png"), "--reconstruction": str(tmp_path / "r.png")}
    outputs[option] = str(same)
    assert main(["edit", "--image", str(image_file), "--source", SOURCE, "--target", TARGET,
                 *[item for pair in outputs.items() for item in pair]]) == 1
    assert "input image" in capsys.readouterr().err
    assert image_file.read_bytes() == before
    assert not (tmp_path / "out.png").exists()


def test_rgba_of_another_size_is_converted_with_a_warning(image_file, tmp_path, capsys):
    big = tmp_path / "big.png"
    Image.open(image_file).resize((64, 64), Image.Resampling.NEAREST).convert("RGBA").save(big)
    assert edit(big, tmp_path / "out.png") == 0
    err = capsys.readouterr().err
    assert "RGBA" in err and "64x64" in err and "32x32" in err
    assert Image.open(tmp_path / "out.png").size == (32, 32)


def test_a_file_that_is_not_an_image_is_a_clear_error(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    assert edit(notes, tmp_path / "out.png") == 1  # a file error: status 1
    assert "notes.txt" in capsys.readouterr().err
    assert edit(tmp_path / "missing.png", tmp_path / "out.png") == 1
    assert "missing.png" in capsys.readouterr().err


def test_an_unknown_word_lists_the_vocabulary(image_file, tmp_path, capsys):
    code = main(["edit", "--image", str(image_file), "--source", SOURCE,
                 "--target", "a small red unicorn on a gray background",
                 "--out", str(tmp_path / "out.png")])
    err = capsys.readouterr().err
    assert code == 2 and "vocabulary" in err and "unicorn" in err and "Traceback" not in err


def test_blend_words_are_kept_where_their_prompt_has_them(image_file, tmp_path, capsys):
    square = SOURCE.replace("circle", "square")
    assert blend_words(["Circle", "square"], SOURCE, square) == [(("circle",), ("square",))]
    assert blend_words(None, SOURCE, square) is None
    assert edit(image_file, tmp_path / "out.png", "--blend", "triangle") == 2
    assert "--blend" in capsys.readouterr().err


def test_invert_saves_the_noise_and_a_faithful_reconstruction(image_file, tmp_path, capsys):
    noise, rec = tmp_path / "noise.safetensors", tmp_path / "rec.png"
    assert main(["invert", "--image", str(image_file), "--prompt", SOURCE, "--out", str(noise),
                 "--reconstruction", str(rec)]) == 0
    with safe_open(str(noise), "pt") as file:
        assert list(file.get_tensor("noise").shape) == [1, 4, 8, 8]
        assert file.metadata()["prompt"] == SOURCE and file.metadata()["recipe"] == "G"
    mse = np.mean(((pixels(rec) - pixels(image_file)) / 255) ** 2)
    assert -10 * np.log10(mse) > 20
    assert "PSNR" in capsys.readouterr().out


def test_generate_writes_the_requested_number_of_images(tmp_path):
    out = tmp_path / "gen" / "g.png"
    assert main(["generate", "--prompt", SOURCE, "--out", str(out), "--num-images", "3"]) == 0
    written = sorted(p.name for p in out.parent.iterdir())
    assert written == ["g_0.png", "g_1.png", "g_2.png"]
    assert all(Image.open(out.parent / name).size == (32, 32) for name in written)


def test_a_prompt_outside_the_world_is_drawn_with_a_warning(tmp_path, capsys):
    out = tmp_path / "g.png"
    prompt = "a large red circle and a small blue square on a gray background"
    assert main(["generate", "--prompt", prompt, "--out", str(out)]) == 0
    assert "no caption of the toy world" in capsys.readouterr().err and out.exists()
    main(["generate", "--prompt", SOURCE, "--out", str(out)])
    assert "warning" not in capsys.readouterr().err


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["edit", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--image", "--source", "--target", "--out", "--reconstruction", "--w",
                   "--tau", "--cross", "--self", "--amplify", "--blend", "--steps", "--seed",
                   "--scale", "--threads"):
        assert option in text
    assert text.count("(default:") >= 10
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "Python API" in capsys.readouterr().out


# -- --device on every command -------------------------------------------------------------------
no_cuda = pytest.mark.skipif(__import__("torch").cuda.is_available(),
                             reason="this machine has a CUDA GPU: --device cuda would work")


def test_device_cpu_works(image_file, tmp_path, capsys):
    assert main(["generate", "--prompt", SOURCE, "--out", str(tmp_path / "g.png"),
                 "--device", "cpu", "--threads", "1"]) == 0
    assert edit(image_file, tmp_path / "out.png", "--device", "cpu") == 0
    assert capsys.readouterr().out.count("NFE") == 2


@no_cuda
@pytest.mark.parametrize("command", ["generate", "invert", "edit"])
def test_device_cuda_without_a_gpu_is_one_line_naming_the_fix(command, image_file, tmp_path,
                                                               capsys):
    options = {"generate": ["--prompt", SOURCE, "--out", str(tmp_path / "g.png")],
               "invert": ["--image", str(image_file), "--prompt", SOURCE,
                          "--out", str(tmp_path / "n.safetensors")],
               "edit": ["--image", str(image_file), "--source", SOURCE, "--target", TARGET,
                        "--out", str(tmp_path / "e.png")]}[command]
    assert main([command, *options, "--device", "cuda"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and "Traceback" not in err and captured.out == ""
    assert "--device cuda" in err and "no CUDA GPU" in err and "auto or cpu" in err
    assert not list(tmp_path.glob("[gne].*"))  # nothing written


@no_cuda
def test_bench_and_world_training_refuse_a_missing_gpu_in_one_line(capsys):
    from icd_lite import bench
    from icd_lite.world import train

    for run in (lambda: bench.main(["world", "--device", "cuda"]),
                lambda: train.main(["--stage", "vae", "--device", "cuda"])):
        with pytest.raises(SystemExit) as exit_info:
            run()
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "no CUDA GPU" in err and "Traceback" not in err
        assert len([line for line in err.splitlines() if "error:" in line]) == 1


def test_every_command_documents_device_and_threads(capsys):
    from icd_lite import bench
    from icd_lite.world import train

    for run in (lambda: main(["generate", "--help"]), lambda: bench.main(["--help"]),
                lambda: train.main(["--help"])):
        with pytest.raises(SystemExit):
            run()
        text = capsys.readouterr().out
        assert "--device" in text and "--threads" in text and "cuda" in text
