"""Bad input on the command line (issue 18): each kind of fault, table-driven.

A. non-finite or out-of-range numbers: refused when the arguments are parsed (exit 2, one line);
B. image files: read as the picture a viewer shows (EXIF, > 8 bits, frames) or refused;
C. oversized requests: refused from the header / at parse time; large batches in chunks;
D. outputs: checked before any work, never overwritten without --overwrite, all or nothing.

Most cases stop before the model: ``no_model`` makes loading it a test failure. They call
``cli.main`` in-process; the few that run the model take about a second each.
"""

import io
import os
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from icd_lite import cli
from icd_lite.cli import main, open_rgb, to_tensor
from icd_lite.world.scenes import Scene, SceneObject, caption, render

# an object off-centre, so that a turned or mirrored picture is another picture
SCENE = Scene("gray", "plain", (SceneObject("circle", "red", "small", 9, 10),))
SOURCE = caption(SCENE)
TARGET = SOURCE.replace("red", "blue")


def scene_pixels() -> np.ndarray:
    return ((render(SCENE)[0] + 1) * 127.5).round().astype(np.uint8).transpose(1, 2, 0)


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(scene_pixels()).save(path)
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Loading the model fails the test: the case must be refused before any work."""
    def load_pipeline(*args, **kwargs):
        pytest.fail("the model was loaded: the input should have been refused before any work")
    monkeypatch.setattr(cli, "load_pipeline", load_pipeline)


def run(capsys, argv):
    """(exit status, stdout, stderr) of ``main(argv)``, parse errors included."""
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def the_error(err: str) -> str:
    """The one error line of stderr (warnings aside); no traceback, no usage block."""
    lines = [line for line in err.splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1, err
    assert "error:" in lines[0] and "Traceback" not in err
    return lines[0]


def edit_args(image, out, *extra):
    return ["edit", "--image", str(image), "--source", SOURCE, "--target", TARGET,
            "--out", str(out), *extra]


def read(path) -> torch.Tensor:
    """What the command line gives the model for an image file: [1, 3, 32, 32] in [-1, 1]."""
    return to_tensor(open_rgb(path), 32, path)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean(((a.astype(np.float64) - b.astype(np.float64)) / 255) ** 2)
    return float(-10 * np.log10(max(mse, 1e-12)))


# -- A. numbers: finite and in range, checked when the arguments are parsed ----------------------
NUMBER_CASES = [  # (command, option, value, text of the range in the message)
    ("generate", "--w", "nan", "[1, 100]"),
    ("generate", "--w", "inf", "[1, 100]"),
    ("generate", "--w", "-inf", "[1, 100]"),
    ("edit", "--w", "NaN", "[1, 100]"),
    ("edit", "--w", "1e309", "[1, 100]"),  # float("1e309") is inf
    ("generate", "--w", "0.5", "[1, 100]"),
    ("generate", "--w", "1e6", "[1, 100]"),
    ("generate", "--w", "four", "[1, 100]"),
    ("generate", "--tau", "nan", "[0, 1]"),
    ("edit", "--tau", "1.5", "[0, 1]"),
    ("edit", "--cross", "nan", "[0, 1]"),
    ("edit", "--self", "-inf", "[0, 1]"),
    ("edit", "--amplify", "nan", "(0, 100]"),
    ("edit", "--amplify", "inf", "(0, 100]"),
    ("edit", "--amplify", "0", "(0, 100]"),
    ("edit", "--scale", "nan", "[1, 64]"),
    ("generate", "--scale", "100000", "[1, 64]"),
    ("invert", "--scale", "0", "[1, 64]"),
    ("generate", "--scale", "2.5", "[1, 64]"),
    ("generate", "--seed", "nan", "[0, 9223372036854775807]"),
    ("generate", "--seed", "-1", "[0, 9223372036854775807]"),
    ("edit", "--seed", str(2**63), "[0, 9223372036854775807]"),
    ("invert", "--seed", "1e3", "[0, 9223372036854775807]"),
    ("generate", "--num-images", "nan", "[1, 1024]"),
    ("generate", "--num-images", "inf", "[1, 1024]"),
    ("generate", "--num-images", "0", "[1, 1024]"),
    ("generate", "--num-images", "100000", "[1, 1024]"),
    ("generate", "--threads", "100000", "[1, 1024]"),
    ("generate", "--threads", "nan", "[1, 1024]"),
    ("edit", "--threads", "0", ""),
]


@pytest.mark.parametrize("command, option, value, interval", NUMBER_CASES)
def test_numbers_are_finite_and_in_range_when_parsed(command, option, value, interval,
                                                     image_file, tmp_path, capsys, no_model):
    out = tmp_path / ("n.safetensors" if command == "invert" else "o.png")
    argv = {"generate": ["generate", "--prompt", SOURCE, "--out", str(out)],
            "invert": ["invert", "--image", str(image_file), "--prompt", SOURCE,
                       "--out", str(out)],
            "edit": edit_args(image_file, out)}[command]
    code, stdout, err = run(capsys, [*argv, f"{option}={value}"])
    line = the_error(err)
    assert code == 2 and stdout == "" and option in line and value in line
    assert interval in line
    assert not out.exists()


@pytest.mark.parametrize("option, value", [("--w", "1"), ("--w", "100"), ("--tau", "0"),
                                           ("--amplify", "1e-3"), ("--amplify", "100"),
                                           ("--cross", "1"), ("--scale", "64"),
                                           ("--seed", str(2**63 - 1)), ("--seed", "0"),
                                           ("--threads", "1024")])
def test_the_ends_of_each_range_are_accepted(option, value):
    args = cli.build_parser().parse_args(edit_args("in.png", "out.png", option, value))
    assert str(getattr(args, option[2:])) in (value, str(float(value)))
    args = cli.build_parser().parse_args(["generate", "--prompt", SOURCE, "--out", "g.png",
                                          "--num-images", "1024"])
    assert args.num_images == 1024


def test_the_issues_example_w_nan_and_inf_exit_2_in_one_line(tmp_path, capsys, no_model):
    for value in ("nan", "inf"):
        code, _, err = run(capsys, ["generate", "--prompt", SOURCE, "--w", value,
                                    "--out", str(tmp_path / "g.png")])
        assert code == 2 and "--w" in the_error(err) and "finite" in err
    assert not (tmp_path / "g.png").exists()


# -- B. image files: the picture a viewer shows, or a clear refusal ------------------------------
def png_by_hand(path, pixels: np.ndarray, bit_depth: int, color_type: int) -> None:
    """A PNG PIL cannot write (16-bit RGB, 16-bit gray + alpha), big-endian samples."""
    height, width = pixels.shape[:2]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def gray16(value):
    return np.full((32, 32), value, np.uint16)


def make(tmp_path, name, kind):
    """Write one test image of ``kind`` and return its path."""
    path = tmp_path / name
    if kind == "I;16 mid-gray png":  # the issue's example
        Image.fromarray(gray16(128 * 257)).save(path)
    elif kind == "I;16 white png":
        Image.fromarray(gray16(65535)).save(path)
    elif kind == "I;16 small values png":  # 0..255 stored in 16 bits: nearly black
        Image.fromarray(gray16(255)).save(path)
    elif kind == "I;16B tiff":
        Image.frombytes("I;16B", (32, 32), gray16(128 * 257).astype(">u2").tobytes()).save(path)
    elif kind == "16-bit pgm":  # PIL reads it as mode I
        path.write_bytes(b"P5 32 32 65535\n" + gray16(128 * 257).astype(">u2").tobytes())
    elif kind == "12-bit pgm":
        path.write_bytes(b"P5 32 32 4095\n" + gray16(2048).astype(">u2").tobytes())
    elif kind == "16-bit RGB png":
        png_by_hand(path, np.full((32, 32, 3), 128 * 257), 16, 2)
    elif kind == "16-bit gray+alpha png":
        png_by_hand(path, np.full((32, 32, 2), 128 * 257), 16, 4)
    elif kind == "F [0, 1] tiff":
        Image.fromarray(np.full((32, 32), 128 / 255, np.float32)).save(path)
    elif kind == "1 png":
        Image.fromarray(np.tile([True, False], (32, 16))).save(path)
    elif kind == "LA png":
        Image.new("LA", (32, 32), (128, 0)).save(path)
    elif kind == "P with transparency png":
        image = Image.new("P", (32, 32), 1)
        image.putpalette([0, 0, 0, 128, 128, 128] + [0] * 762)
        image.save(path, transparency=0)
    elif kind == "CMYK jpeg":
        Image.new("CMYK", (32, 32), (0, 0, 0, 127)).save(path, quality=95)
    return path


READ_CASES = [  # (kind, file name, expected mean in [-1, 1], words of the warning)
    ("I;16 mid-gray png", "g16.png", 0.0, ["I;16", "65535"]),
    ("I;16 white png", "w16.png", 1.0, ["I;16"]),
    ("I;16 small values png", "s16.png", -0.992, ["I;16"]),
    ("I;16B tiff", "g16b.tiff", 0.0, ["I;16B"]),
    ("16-bit pgm", "g16.pgm", 0.0, ["mode I ", "65535"]),
    ("12-bit pgm", "g12.pgm", 0.0, ["mode I "]),
    ("16-bit RGB png", "rgb16.png", 0.0, []),  # PIL keeps the 8 high bits: the same picture
    ("16-bit gray+alpha png", "la16.png", 0.0, ["RGBA"]),
    ("F [0, 1] tiff", "f.tiff", 0.0, ["mode F"]),
    ("1 png", "bits.png", 0.0, ["mode 1"]),
    ("LA png", "la.png", 0.0, ["mode LA"]),
    ("P with transparency png", "p.png", 0.0, ["mode P", "transparency"]),
    ("CMYK jpeg", "cmyk.jpg", 0.0, ["mode CMYK"]),
]


@pytest.mark.parametrize("kind, name, mean, words", READ_CASES)
def test_images_of_every_mode_are_read_as_the_picture_they_show(kind, name, mean, words,
                                                                  tmp_path, capsys, recwarn):
    image = read(make(tmp_path, name, kind))
    assert image.shape == (1, 3, 32, 32) and bool(torch.isfinite(image).all())
    assert abs(image.mean().item() - mean) < 0.02, kind  # e.g. never white for mid-gray
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (kind, err)
    assert not [w for w in recwarn if "Image" in str(w.filename)]  # no raw PIL warnings


def test_the_issues_16_bit_mid_gray_png_is_mid_gray(tmp_path, capsys):
    path = tmp_path / "g16.png"
    Image.fromarray(np.full((32, 32), 128 * 257, np.uint16)).save(path)
    image = read(path)
    assert abs(image.mean().item()) < 0.1 and image.std().item() < 1e-6
    assert "I;16" in capsys.readouterr().err
    # end to end: a pale picture read from a file is legal (no "[0, 1] image" refusal)
    assert main(["invert", "--image", str(path), "--prompt", SOURCE,
                 "--out", str(tmp_path / "n.safetensors"),
                 "--reconstruction", str(tmp_path / "r.png")]) == 0
    assert "no negative value" not in capsys.readouterr().err


def test_a_16_bit_image_edits_exactly_as_its_8_bit_twin(tmp_path, capsys):
    """End to end: a 16-bit grayscale scene and its 8-bit copy give the same files."""
    gray = np.asarray(Image.fromarray(scene_pixels()).convert("L"))
    Image.fromarray(gray).save(tmp_path / "g8.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    for bits in ("8", "16"):
        assert main(["invert", "--image", str(tmp_path / f"g{bits}.png"), "--prompt", SOURCE,
                     "--out", str(tmp_path / f"n{bits}.safetensors"),
                     "--reconstruction", str(tmp_path / f"r{bits}.png")]) == 0
    assert "I;16" in capsys.readouterr().err
    assert (tmp_path / "r8.png").read_bytes() == (tmp_path / "r16.png").read_bytes()


# EXIF orientation -> the transpose that stores an upright picture under that tag
STORED_AS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
             4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
             6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_270}


def with_orientation(upright: Image.Image, orientation: int, path, **save) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    upright.transpose(STORED_AS[orientation]).save(path, exif=exif, **save)


@pytest.mark.parametrize("orientation", sorted(STORED_AS))
@pytest.mark.parametrize("suffix", [".png", ".webp", ".tiff"])
def test_an_exif_orientation_is_applied_with_a_warning(orientation, suffix, tmp_path, capsys):
    upright = Image.fromarray(scene_pixels())
    path = tmp_path / f"turned{suffix}"
    with_orientation(upright, orientation, path, **({"lossless": True} if suffix == ".webp"
                                                    else {}))
    picture = open_rgb(path)
    assert np.array_equal(np.asarray(picture), np.asarray(upright))
    assert f"EXIF orientation {orientation}" in capsys.readouterr().err


def test_the_issues_rotated_jpeg_is_edited_upright(tmp_path, capsys):
    upright = Image.fromarray(scene_pixels())
    with_orientation(upright, 6, tmp_path / "turned.jpg", quality=95)  # "rotate 90 degrees"
    rec = tmp_path / "rec.png"
    assert main(edit_args(tmp_path / "turned.jpg", tmp_path / "out.png",
                          "--reconstruction", str(rec))) == 0
    assert "EXIF orientation 6" in capsys.readouterr().err
    shown = np.asarray(upright)
    assert psnr(np.asarray(Image.open(rec)), shown) > 20  # 11.9 dB when read sideways
    assert psnr(np.asarray(Image.open(rec)), np.asarray(upright.transpose(
        Image.Transpose.ROTATE_90))) < 15


def test_an_image_without_orientation_is_read_bit_for_bit(image_file, capsys):
    assert np.array_equal(np.asarray(open_rgb(image_file)), scene_pixels())
    assert capsys.readouterr().err == ""


def animated(path, frames, **save):
    frames[0].save(path, save_all=True, append_images=frames[1:], **save)


@pytest.mark.parametrize("suffix", [".gif", ".tiff", ".webp", ".png"])
def test_several_frames_give_the_first_with_a_warning(suffix, tmp_path, capsys):
    red, blue = (Image.new("RGB", (32, 32), color) for color in ((200, 0, 0), (0, 0, 200)))
    path = tmp_path / f"frames{suffix}"
    animated(path, [red, blue], **({"lossless": True} if suffix == ".webp" else {}))
    picture = np.asarray(open_rgb(path), dtype=int)
    assert picture[..., 0].mean() > 150 and picture[..., 2].mean() < 50  # the red frame
    assert "2 frames" in capsys.readouterr().err


def truncated_png(path):
    buffer = io.BytesIO()
    Image.fromarray(scene_pixels()).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue()[:200])


REFUSED_CASES = [  # (what, make the file, words of the one-line error)
    ("missing", lambda p: None, ["no such file"]),
    ("empty", lambda p: p.write_bytes(b""), ["empty"]),
    ("directory", lambda p: p.mkdir(), ["directory"]),
    ("named pipe", os.mkfifo, ["not a regular file"]),  # reading it would wait forever
    ("text", lambda p: p.write_text("not a picture"), ["not an image"]),
    ("truncated png", truncated_png, ["cannot read"]),
    ("png signature only", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n"), ["cannot read"]),
    ("32-bit integer tiff", lambda p: Image.fromarray(np.full((8, 8), 7, np.int32)).save(
        p, format="TIFF"), ["mode I", "8- or 16-bit"]),
    ("float tiff of 0..255", lambda p: Image.fromarray(np.full((8, 8), 200, np.float32)).save(
        p, format="TIFF"), ["mode F", "[200, 200]", "[0, 1]"]),
    ("float tiff with nan", lambda p: Image.fromarray(np.full((8, 8), np.nan, np.float32)).save(
        p, format="TIFF"), ["mode F", "NaN"]),
]


@pytest.mark.parametrize("what, write, words", REFUSED_CASES)
def test_unreadable_images_are_one_line_errors_before_any_work(what, write, words, tmp_path,
                                                               capsys, no_model):
    path = tmp_path / "in.png"
    write(path)
    code, stdout, err = run(capsys, edit_args(path, tmp_path / "out.png"))
    line = the_error(err)
    assert code == 1 and stdout == "" and str(path) in line
    for word in words:
        assert word in line, (what, line)
    assert not (tmp_path / "out.png").exists()


# -- C. oversized requests: refused from the header, or at parse time; batches in chunks ---------
@pytest.mark.parametrize("size, mode", [((20000, 20000), "1"),  # the issue's (PIL: a bomb)
                                        ((10000, 10000), "1"),  # PIL: only a warning
                                        ((4097, 8), "L"),  # just over this CLI's limit
                                        ((8, 60000), "L")])
def test_an_oversized_image_is_refused_in_one_line(size, mode, tmp_path, capsys, no_model):
    path = tmp_path / "huge.png"
    Image.new(mode, size).save(path)
    assert path.stat().st_size < 2_000_000  # cheap to make, huge to decode
    begin = time.perf_counter()
    code, _, err = run(capsys, edit_args(path, tmp_path / "out.png"))
    line = the_error(err)
    assert code == 1 and "image too large" in line and "downscale it to at most 4096 x 4096" in line
    assert f"{size[0]} x {size[1]} px" in line
    assert time.perf_counter() - begin < 2
    assert not (tmp_path / "out.png").exists()


def test_the_largest_image_side_allowed_is_read(tmp_path, capsys):
    path = tmp_path / "wide.png"
    Image.new("L", (4096, 4)).save(path)
    assert read(path).shape == (1, 3, 32, 32)
    assert "4096x4" in capsys.readouterr().err  # the resize warning


def test_generate_scale_100000_is_refused_when_parsed(tmp_path, capsys, no_model):
    code, _, err = run(capsys, ["generate", "--prompt", SOURCE, "--out",
                                str(tmp_path / "g.png"), "--scale", "100000"])
    assert code == 2 and "--scale" in the_error(err) and "[1, 64]" in err


def test_large_batches_are_decoded_in_chunks_with_the_same_images(tmp_path, monkeypatch):
    from icd_lite.pipeline import ICDPipeline

    sizes = []
    decode = ICDPipeline.decode

    def counting(self, noise, *args, **kwargs):
        sizes.append(len(noise))
        return decode(self, noise, *args, **kwargs)
    monkeypatch.setattr(ICDPipeline, "decode", counting)
    argv = ["generate", "--prompt", SOURCE, "--num-images", "5", "--seed", "3"]
    assert main([*argv, "--out", str(tmp_path / "whole" / "g.png")]) == 0
    monkeypatch.setattr(cli, "GENERATE_CHUNK", 2)
    assert main([*argv, "--out", str(tmp_path / "chunks" / "g.png")]) == 0
    assert sizes == [5, 2, 2, 1]
    for i in range(5):
        whole, chunked = (np.asarray(Image.open(tmp_path / part / f"g_{i}.png"), dtype=int)
                          for part in ("whole", "chunks"))
        assert np.abs(whole - chunked).max() <= 1


def test_generate_gives_the_images_of_the_library(tmp_path, capsys):
    """The CLI draws the noise as ICDPipeline.generate does: the same pictures."""
    from icd_lite.pipeline import load_pipeline

    assert main(["generate", "--prompt", SOURCE, "--num-images", "3", "--seed", "11",
                 "--out", str(tmp_path / "g.png")]) == 0
    expected = load_pipeline("G").generate(SOURCE, w=8.0, tau=0.8, seed=11, num_images=3)
    for i, image in enumerate(expected.images):
        pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"g_{i}.png")), pixels.numpy())


# -- D. outputs: checked first, never overwritten silently, all or nothing -----------------------
def test_the_issues_example_keep_png_is_refused_then_replaced_with_overwrite(
        image_file, tmp_path, capsys):
    keep = tmp_path / "keep.png"
    keep.write_bytes(image_file.read_bytes())  # cp in.png keep.png
    before = keep.read_bytes()
    code, _, err = run(capsys, edit_args(image_file, keep))
    line = the_error(err)
    assert code == 1 and str(keep) in line and "--overwrite" in line
    assert keep.read_bytes() == before
    assert main(edit_args(image_file, keep, "--overwrite")) == 0
    assert keep.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "keep.png"]  # no temporaries


def commands(image, tmp_path, out=None, rec=None, noise=None):
    """The three commands with the given output paths (defaults: fresh files)."""
    out = out or tmp_path / "out.png"
    noise = noise or tmp_path / "noise.safetensors"
    rec = ["--reconstruction", str(rec)] if rec else []
    return {"edit": edit_args(image, out, *rec),
            "invert": ["invert", "--image", str(image), "--prompt", SOURCE, "--out", str(noise),
                       *rec],
            "generate": ["generate", "--prompt", SOURCE, "--out", str(out)]}


def setup_output(case, tmp_path, image_file):
    """Make the situation of ``case``; return (keyword for commands(), path, words)."""
    if case == "existing out":
        path = tmp_path / "old.png"
        path.write_bytes(b"old")
        return "out", path, ["exists", "--overwrite"]
    if case == "existing reconstruction":
        path = tmp_path / "old.png"
        path.write_bytes(b"old")
        return "rec", path, ["exists", "--overwrite"]
    if case == "existing noise":
        path = tmp_path / "old.safetensors"
        path.write_bytes(b"old")
        return "noise", path, ["exists", "--overwrite"]
    if case == "dangling link":
        path = tmp_path / "link.png"
        path.symlink_to(tmp_path / "nowhere.png")
        return "out", path, ["exists", "--overwrite"]
    if case == "directory":
        path = tmp_path / "dir.png"
        path.mkdir()
        return "out", path, ["is a directory"]
    if case == "folder is a file":
        (tmp_path / "file").write_text("x")
        return "out", tmp_path / "file" / "out.png", ["not a directory"]
    if case == "same as input via a link":
        path = tmp_path / "alias.png"
        path.symlink_to(image_file)
        return "out", path, ["input image"]
    if case == "same as input via a hard link":
        path = tmp_path / "hard.png"
        os.link(image_file, path)
        return "rec", path, ["input image"]
    if case == "not a regular file":  # a named pipe; /dev/null would be another
        path = tmp_path / "pipe.png"
        os.mkfifo(path)
        return "out", path, ["not a regular file"]
    raise AssertionError(case)


OUTPUT_CASES = [  # (case, command)
    ("existing out", "edit"), ("existing out", "generate"), ("existing reconstruction", "edit"),
    ("existing reconstruction", "invert"), ("existing noise", "invert"),
    ("dangling link", "edit"), ("directory", "edit"), ("directory", "generate"),
    ("folder is a file", "edit"), ("folder is a file", "generate"),
    ("same as input via a link", "edit"), ("same as input via a hard link", "invert"),
    ("not a regular file", "generate"),
]


@pytest.mark.parametrize("case, command", OUTPUT_CASES)
def test_bad_outputs_are_refused_before_any_work(case, command, image_file, tmp_path, capsys,
                                                 no_model):
    keyword, path, words = setup_output(case, tmp_path, image_file)
    before = {p.name: (p.read_bytes() if p.is_file() else p.is_dir()) for p in tmp_path.iterdir()}
    argv = commands(image_file, tmp_path, **{keyword: path})[command]
    if case in ("same as input via a link", "not a regular file"):
        argv.append("--overwrite")  # refused even so
    begin = time.perf_counter()
    code, stdout, err = run(capsys, argv)
    line = the_error(err)
    assert code == 1 and stdout == "" and str(path) in line
    for word in words:
        assert word in line, (case, line)
    assert time.perf_counter() - begin < 2
    after = {p.name: (p.read_bytes() if p.is_file() else p.is_dir()) for p in tmp_path.iterdir()}
    assert after == before  # nothing written, nothing replaced


def test_two_outputs_of_one_command_are_not_the_same_file(image_file, tmp_path, capsys,
                                                          no_model):
    out = tmp_path / "x.png"
    code, _, err = run(capsys, edit_args(image_file, out, "--reconstruction",
                                         str(tmp_path / "sub" / ".." / "x.png")))
    assert code == 1 and "same file" in the_error(err)


def test_generate_refuses_if_any_numbered_file_exists(tmp_path, capsys, no_model):
    (tmp_path / "g_1.png").write_bytes(b"old")
    code, _, err = run(capsys, ["generate", "--prompt", SOURCE, "--num-images", "3",
                                "--out", str(tmp_path / "g.png")])
    assert code == 1 and "g_1.png" in the_error(err) and "--overwrite" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g_1.png"]


UNWRITABLE = [pytest.param("/proc/icd_lite_out.png", id="proc",
                           marks=pytest.mark.skipif(not os.path.isdir("/proc"), reason="no /proc")),
              pytest.param("read-only", id="chmod",
                           marks=pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                                                    reason="root writes anywhere"))]


@pytest.mark.parametrize("where", UNWRITABLE)
def test_an_unwritable_folder_is_refused_before_any_work(where, image_file, tmp_path, capsys,
                                                         no_model):
    if where == "read-only":
        folder = tmp_path / "locked"
        folder.mkdir()
        folder.chmod(0o500)
        out = folder / "new" / "out.png"  # a folder that would have to be made there
    else:
        out = where
    try:
        code, _, err = run(capsys, edit_args(image_file, out))
    finally:
        if where == "read-only":
            folder.chmod(0o700)
    line = the_error(err)
    assert code == 1 and "cannot write in" in line and "writable directory" in line


@pytest.mark.parametrize("fails", ["second file", "model"])
def test_a_failure_after_the_checks_writes_nothing(fails, image_file, tmp_path, capsys,
                                                   monkeypatch):
    calls = []
    save_png = cli.save_png

    def failing_save(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return save_png(*args, **kwargs)

    def failing_edit(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")
    if fails == "second file":
        monkeypatch.setattr(cli, "save_png", failing_save)
    else:
        monkeypatch.setattr(cli, "icd_edit", failing_edit)
    out, rec = tmp_path / "new" / "out.png", tmp_path / "new" / "rec.png"
    try:
        code, _, err = run(capsys, edit_args(image_file, out, "--reconstruction", str(rec)))
    except RuntimeError:
        code, err = None, ""
    if fails == "second file":
        assert code == 1 and "No space left" in the_error(err)
        assert len(calls) == 2 and calls[0].parent == out.parent  # a temporary beside it
    assert not out.exists() and not rec.exists()
    assert not list(tmp_path.rglob(".*.tmp"))  # the temporaries are gone


def test_new_output_folders_are_still_made(image_file, tmp_path):
    out = tmp_path / "a" / "b" / "out.png"
    assert main(edit_args(image_file, out)) == 0 and out.exists()
