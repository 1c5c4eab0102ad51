r"""The command line: ``python -m icd_lite edit | invert | generate`` on the toy world.

Every command loads the shipped student pair of the toy world (``--steps 4``: recipe "G", the
full method; ``--steps 3``: recipe "G3"), makes one call of the library and writes files:

* ``edit``: iCD editing with Prompt-to-Prompt (``editing.icd_edit``), about 8 NFE;
* ``invert``: encode an image to noise x_999 with the forward student (``ICDPipeline.encode``)
  and save it as safetensors; optionally decode it back, unguided, to check the inversion;
* ``generate``: images from a prompt (``ICDPipeline.generate``).

Images are read with PIL. The toy world only knows 32x32 RGB pictures, so any other mode is
converted to RGB and any other size resized to 32x32, each with a warning on stderr. The picture
read is the one a viewer shows: an EXIF orientation is applied (with a warning); images of more
than 8 bits per channel (modes I;16*, I) are scaled by their real range, e.g. 0..65535, and float
images (mode F) are read only with values in [0, 1], each with a warning naming the mode; an
animation or a multi-page file gives its first frame, with a warning. An image larger than
4096 px on a side is refused from its header, before it is decoded. PNGs are
written as 32x32 RGB uint8, pixel = round((x + 1) * 127.5) for x in [-1, 1]; ``--scale K``
enlarges them by nearest neighbour, for viewing only.

Outputs: every output path is checked before any work (not a directory, in a directory that
exists or can be made and is writable, not the input image, not another output, and not an
existing file unless ``--overwrite`` is given). A command writes all of its files or none: each
is written to a temporary file beside it, and they are renamed into place together at the end.

Each command prints one line: the network evaluations (NFE), the seconds of the library call
(model loading not included) and the files written. Every error is one line on stderr, with no
traceback: a bad argument (a number out of its range, NaN or inf included; a word the toy world
does not know; prompts that cannot be aligned; a ``--device`` this machine lacks) exits with
status 2, a file that cannot be read or written with status 1.

``--device`` (default auto: CUDA when available, else the CPU) picks where the models run. The
seeded noise is drawn on the CPU either way, so a seed gives the same picture on both, within
float tolerance.
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from safetensors.torch import save_file

from .attention import controlled_steps
from .checks import ImageRangeWarning
from .device import add_device_arguments, configure_threads, resolve_device
from .editing import P2PSettings, icd_edit
from .metrics import psnr
from .pipeline import load_pipeline
from .world.checkpoints import CheckpointError
from .world.scenes import caption_problem
from .world.text import build_tokenizer, check_prompt

PROG = "python -m icd_lite"
RECIPE_FOR_STEPS = {4: "G", 3: "G3"}

EPILOG = """\
Only the toy world is supported here: the commands load its shipped weights (no download).
Stable Diffusion 1.5 is used through the Python API, with students you distil yourself (no SD1.5
students ship): load_components("sd15") -> ICDPipeline(...) -> icd_lite.editing.icd_edit(...)
Run `python -m icd_lite <command> --help` for the options of each command."""


# Limits of the command line, each checked before any work (see the module docstring).
MAX_SIDE = 4096  # input images: px on a side (16.8 Mpixels); the toy world reads 32 x 32
MAX_SCALE = 64  # --scale: saved PNGs of at most 32 * 64 = 2048 px, readable again (< MAX_SIDE)
MAX_IMAGES = 1024  # generate --num-images
MAX_SEED = 2**63 - 1  # the largest seed torch.Generator.manual_seed takes as a signed int64
MAX_GUIDANCE = 100.0  # --w: the paper uses <= 20; far beyond, the decoded latents overflow
MAX_AMPLIFY = 100.0  # --amplify: P2P reweighting factors are single digits
GENERATE_CHUNK = 64  # generate decodes at most this many images at once


class UsageError(ValueError):
    """A command line that cannot be carried out: exit status 2."""


class FileError(UsageError):
    """A file that cannot be read or written (bad image, output in the way...): exit status 1."""


def one_line(error: BaseException | str) -> str:
    return " ".join(str(error).split())


# -- reading images ----------------------------------------------------------------------------
def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def too_large(path: Path, size: str) -> FileError:
    return FileError(f"image too large: {path} is {size}; downscale it to at most {MAX_SIDE} x "
                     f"{MAX_SIDE} px first (the toy world reads 32 x 32)")


def open_rgb(path: Path) -> Image.Image:
    """Read an image file with PIL as the RGB picture a viewer shows.

    Refused (FileError, one line): a missing, empty or unreadable file, a directory, an image
    larger than MAX_SIDE on a side (from its header, before decoding), pixels of unknown range.
    Converted, with a warning: an EXIF orientation (applied), more than one frame (the first is
    read), more than 8 bits per channel (scaled by the real range), any mode but RGB.
    """
    if not path.exists():
        raise FileError(f"cannot read the image {path}: no such file")
    if path.is_dir():
        raise FileError(f"cannot read the image {path}: it is a directory; give an image file")
    if not path.is_file():
        raise FileError(f"cannot read the image {path}: not a regular file (a pipe or a device);"
                        f" give an image file")
    if path.stat().st_size == 0:
        raise FileError(f"cannot read the image {path}: the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL warns of an image over 89 Mpixels and raises over 179: both are "too large"
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as file:  # lazy: reads the header only
                if max(file.size) > MAX_SIDE:
                    raise too_large(path, f"{file.width} x {file.height} px")
                frames = getattr(file, "n_frames", 1)
                bits = bits_per_sample(file)
                orientation = exif_orientation(file, path)
                if orientation in range(2, 9):
                    image = ImageOps.exif_transpose(file)  # decodes; a broken file fails here
                else:
                    image = file.copy()
    except FileError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise too_large(path, header_size(path)) from None
    except Image.UnidentifiedImageError:
        raise FileError(f"cannot read the image {path}: not an image file PIL can read; give a "
                        f"PNG or JPEG") from None
    except Exception as error:  # truncated, an unsupported variant...
        raise FileError(f"cannot read the image {path}: {one_line(error)}") from None
    if frames > 1:
        warn(f"{path} has {frames} frames (an animation or a multi-page file); read the first "
             f"frame only")
    if orientation in range(2, 9):
        warn(f"{path} has the EXIF orientation {orientation} "
             f"({ORIENTATIONS[orientation]}); turned it upright, as image viewers show it")
    return rgb_picture(image, path, bits)


def header_size(path: Path) -> str:
    """'W x H px' of an image PIL refused as a decompression bomb, from its header alone (PIL's
    check is off for this one lazy open; nothing is decoded)."""
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None
        with Image.open(path) as file:
            return f"{file.width} x {file.height} px"
    except Exception:
        return f"over {limit} pixels"
    finally:
        Image.MAX_IMAGE_PIXELS = limit


ORIENTATIONS = {2: "mirrored", 3: "rotated 180 degrees", 4: "mirrored vertically",
                5: "mirrored and rotated", 6: "rotated 90 degrees", 7: "mirrored and rotated",
                8: "rotated 270 degrees"}


def exif_orientation(file: Image.Image, path: Path) -> int:
    """The EXIF orientation tag (1 = upright, also when absent); unreadable EXIF data gets a
    warning and counts as upright."""
    try:
        value = file.getexif().get(ExifTags.Base.Orientation, 1)
        return int(value)
    except Exception as error:  # a broken EXIF block: the pixels may still be fine
        warn(f"{path}: cannot read its EXIF data ({one_line(error)}); its orientation, if any, "
             f"is not applied")
        return 1


def bits_per_sample(file: Image.Image) -> int | None:
    """The bit depth of an integer image's samples as the file declares it: TIFF's
    BitsPerSample tag; 16 for PNG and PPM, whose mode I images PIL scales to 16 bits."""
    if file.format in ("PNG", "PPM"):
        return 16
    tags = getattr(file, "tag_v2", None)
    if tags is not None and 258 in tags:  # BitsPerSample, one value per channel
        value = tags[258]
        return int(value[0] if isinstance(value, tuple) else value)
    return None


def rgb_picture(image: Image.Image, path: Path, bits: int | None) -> Image.Image:
    """Any PIL image -> an 8-bit RGB image of the same picture (a warning when converted)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        return Image.fromarray(integer_to_8bit(np.asarray(image), mode, path, bits)).convert("RGB")
    if mode == "F":
        return Image.fromarray(float_to_8bit(np.asarray(image), path)).convert("RGB")
    warn(f"{path} has mode {mode}; converted it to RGB (any alpha channel or transparency is "
         f"dropped)")
    try:
        if "transparency" in image.info and mode in ("P", "L", "1"):
            image = image.convert("RGBA")  # what PIL asks for, and the same RGB values
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise FileError(f"cannot read the image {path}: mode {mode} cannot be converted to "
                        f"RGB ({one_line(error)}); save it as an RGB PNG") from None


def integer_to_8bit(values: np.ndarray, mode: str, path: Path, bits: int | None) -> np.ndarray:
    """Mode I;16* or I pixels -> uint8, scaled by the range of their declared bit depth."""
    if mode.startswith("I;16"):
        bits = bits if bits is not None and 8 < bits <= 16 else 16
    if bits is None or not 8 < bits <= 16:
        raise FileError(f"cannot read the image {path}: mode {mode} (32-bit integer pixels, "
                        f"{bits or 'unknown'} bits per sample) has no known range; save it "
                        f"as an 8- or 16-bit PNG")
    top = 2**bits - 1
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > top:
        raise FileError(f"cannot read the image {path}: mode {mode} pixels span [{low}, {high}],"
                        f" outside the {bits}-bit range [0, {top}] the file declares; save it "
                        f"as an 8- or 16-bit PNG")
    warn(f"{path} has mode {mode} ({bits} bits per channel); scaled it by its range 0..{top} "
         f"to 8-bit RGB")
    return np.round(values.astype(np.float64) * (255 / top)).astype(np.uint8)


def float_to_8bit(values: np.ndarray, path: Path) -> np.ndarray:
    """Mode F pixels in [0, 1] -> uint8; other values have no known range and are refused."""
    if not np.isfinite(values).all():
        raise FileError(f"cannot read the image {path}: mode F (32-bit float) with NaN or "
                        f"infinite pixels; save it as an 8- or 16-bit PNG")
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 1:
        raise FileError(f"cannot read the image {path}: mode F (32-bit float) pixels span "
                        f"[{low:g}, {high:g}]; only float images in [0, 1] are read, save it "
                        f"as an 8- or 16-bit PNG")
    warn(f"{path} has mode F (32-bit float, values in [0, 1]); scaled it by 255 to 8-bit RGB")
    return np.round(values.astype(np.float64) * 255).astype(np.uint8)


def to_tensor(image: Image.Image, size: int, path: Path) -> torch.Tensor:
    """An RGB PIL image -> [1, 3, size, size] in [-1, 1], resized (with a warning) if needed."""
    if image.size != (size, size):
        warn(f"{path} is {image.width}x{image.height}; resized it to {size}x{size}, the toy "
             f"world's image size (Lanczos filter, aspect ratio not kept)")
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32))
    return (pixels / 127.5 - 1).permute(2, 0, 1)[None]


def save_png(image: torch.Tensor, path: Path, scale: int = 1) -> None:
    """One [3, H, W] image in [-1, 1] -> RGB uint8 PNG, enlarged scale times (nearest)."""
    pixels = ((image.detach().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    picture = Image.fromarray(pixels.permute(1, 2, 0).numpy())  # uint8 [H, W, 3]: RGB
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale),
                                 Image.Resampling.NEAREST)
    picture.save(path, format="PNG")


# -- checks made before any work -----------------------------------------------------------------
def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same file (links included, or, if absent, the same path)."""
    if a.exists() and b.exists():
        return a.samefile(b)
    return a.resolve() == b.resolve()


def check_writable(option: str, path: Path, suffix: str, overwrite: bool) -> None:
    """FileError unless ``path`` can be written: not a directory, not an existing file unless
    ``overwrite``, and its folder exists or can be made, and takes a new file (tried)."""
    if path.is_dir():
        raise FileError(f"{option} {path} is a directory; give a file name ending in {suffix}")
    if os.path.lexists(path):
        if not (path.is_file() or path.is_symlink()):
            raise FileError(f"{option} {path} exists and is not a regular file; choose another "
                            f"file name")
        if not overwrite:
            raise FileError(f"{option} {path} exists; give --overwrite to replace it, or choose "
                            f"another file name")
    folder = Path(os.path.abspath(path)).parent
    while not os.path.lexists(folder):  # the folders still to be made, as save does
        folder = folder.parent
    if not folder.is_dir():
        raise FileError(f"{option} {path}: {folder} is not a directory; choose another path")
    probe = folder / f".{path.name}.{secrets.token_hex(4)}.probe"
    try:
        probe.open("xb").close()
        probe.unlink()
    except OSError as error:
        raise FileError(f"{option} {path}: cannot write in {folder} "
                        f"({error.strerror or one_line(error)}); choose a writable directory"
                        ) from None


def check_outputs(image: Path | None, outputs: list[tuple[str, Path | None, str]],
                  overwrite: bool = False) -> None:
    """Each output (option, path, suffix) has its suffix, is not the input image, is not
    another output and can be written (``check_writable``); options that were not given (path
    None) are skipped."""
    checked = []
    for option, path, suffix in outputs:
        if path is None:
            continue
        if path.suffix.lower() != suffix:
            raise FileError(f"{option} {path}: the file name must end in {suffix}")
        if image is not None and same_file(path, image):
            raise FileError(f"{option} {path} is the input image; choose another file name, "
                            f"the input is never overwritten")
        for other_option, other in checked:
            if same_file(path, other):
                raise FileError(f"{other_option} and {option} name the same file {path}")
        check_writable(option, path, suffix, overwrite)
        checked.append((option, path))


class AllOrNothing:
    """A command's outputs, written all or none: ``temporary(path)`` gives a new file beside
    ``path`` to write to; leaving the ``with`` block normally renames every temporary over its
    path (``os.replace``), leaving it by an exception deletes them all."""

    def __init__(self):
        self.pending: list[tuple[Path, Path]] = []

    def temporary(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
            try:
                temporary.open("xb").close()  # the umask's permissions, as a plain write
                break
            except FileExistsError:
                continue
        self.pending.append((temporary, path))
        return temporary

    def __enter__(self) -> AllOrNothing:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if kind is None:
                while self.pending:
                    temporary, path = self.pending[0]
                    os.replace(temporary, path)
                    self.pending.pop(0)
        finally:
            for temporary, _ in self.pending:
                temporary.unlink(missing_ok=True)
            self.pending.clear()


def checked_prompts(*prompts: str) -> list[str]:
    """Prompts in the toy world's form (lower case, words only); unknown words are an error,
    and a prompt that is no caption of the world gets a warning (its image will not follow it)."""
    tokenizer = build_tokenizer()
    checked = [check_prompt(prompt, tokenizer) for prompt in prompts]
    for prompt in checked:
        problem = caption_problem(prompt)
        if problem is not None:
            warn(f"{prompt!r} is no caption of the toy world ({problem}); its teacher never "
                 f"saw such a scene, so the image will likely not follow the prompt")
    return checked


def blend_words(words: list[str] | None, source: str, target: str):
    """``[(source words, target words)]`` for ``icd_edit``: each blend word is used for the
    prompts that contain it; None when no --blend was given."""
    if not words:
        return None
    words = [word.lower() for word in words]
    kept = tuple(tuple(w for w in words if w in prompt.split()) for prompt in (source, target))
    if not any(kept):
        raise UsageError(f"none of the --blend words {words} is in the source prompt {source!r} "
                         f"or the target prompt {target!r}; give the edited object's noun")
    return [kept]


# -- the commands ------------------------------------------------------------------------------
def run_edit(args) -> None:
    check_outputs(args.image, [("--out", args.out, ".png"),
                               ("--reconstruction", args.reconstruction, ".png")],
                  args.overwrite)
    source, target = checked_prompts(args.source, args.target)
    words = blend_words(args.blend, source, target)
    picture = open_rgb(args.image)
    pipeline = load_pipeline(RECIPE_FOR_STEPS[args.steps], device=args.device)
    image = to_tensor(picture, pipeline.base.image_size, args.image).to(pipeline.device)
    p2p = P2PSettings(cross_fraction=args.cross, self_fraction=args.self_fraction,
                      amplify=args.amplify)
    edit = icd_edit(pipeline, image, source, target, w=args.w, tau=args.tau, p2p=p2p,
                    blend_words=words, seed=args.seed)
    with AllOrNothing() as files:
        save_png(edit.images[0], files.temporary(args.out), args.scale)
        written = str(args.out)
        if args.reconstruction is not None:
            save_png(edit.reconstructions[0], files.temporary(args.reconstruction), args.scale)
            written += f" (reconstruction {args.reconstruction})"
    steps = pipeline.boundaries.m
    print(f"edit: NFE {edit.nfe}, {edit.seconds:.2f} s, wrote {written}; P2P controlled "
          f"cross-attention on {controlled_steps(args.cross, steps)} and self-attention on "
          f"{controlled_steps(args.self_fraction, steps)} of {steps} steps")


def run_invert(args) -> None:
    check_outputs(args.image, [("--out", args.out, ".safetensors"),
                               ("--reconstruction", args.reconstruction, ".png")],
                  args.overwrite)
    (prompt,) = checked_prompts(args.prompt)
    picture = open_rgb(args.image)
    recipe = RECIPE_FOR_STEPS[args.steps]
    pipeline = load_pipeline(recipe, device=args.device)
    image = to_tensor(picture, pipeline.base.image_size, args.image).to(pipeline.device)
    with AllOrNothing() as files:
        encoded = pipeline.encode(image, prompt, seed=args.seed)
        save_file({"noise": encoded.latents.cpu().contiguous()}, str(files.temporary(args.out)),
                  metadata={"prompt": prompt, "recipe": recipe, "seed": str(args.seed)})
        line = f"invert: NFE {encoded.nfe}, {encoded.seconds:.2f} s, wrote {args.out}"
        if args.reconstruction is not None:
            decoded = pipeline.decode(encoded.latents, prompt)  # unguided, w = 1
            save_png(decoded.images[0], files.temporary(args.reconstruction), args.scale)
            quality = psnr(decoded.images, image).item()
            line += (f"; reconstruction: NFE {decoded.nfe}, {decoded.seconds:.2f} s, "
                     f"PSNR {quality:.2f} dB, wrote {args.reconstruction}")
    print(line)


def numbered(path: Path, count: int) -> list[Path]:
    """out.png for one image; out_0.png, out_1.png, ... for several."""
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(count)]


def generate_in_chunks(pipeline, prompt: str, w: float, tau: float, seed: int, count: int,
                       chunk: int = GENERATE_CHUNK):
    """``pipeline.generate(prompt, w, tau, seed, num_images=count)`` decoded at most ``chunk``
    images at a time: the same noise (one draw from the seeded CPU generator), so up to
    ``chunk`` images it is the very same call. Returns (images on the CPU, NFE per image,
    seconds)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((count, *pipeline.latent_shape), generator=generator)  # CPU
    images, nfe, seconds = [], 0, 0.0
    for start in range(0, count, chunk):
        part = noise[start:start + chunk]
        output = pipeline.decode(part.to(pipeline.device), [prompt] * len(part), w, tau)
        images.append(output.images.cpu())
        nfe, seconds = output.nfe, seconds + output.seconds
    return torch.cat(images), nfe, seconds


def run_generate(args) -> None:
    paths = numbered(args.out, args.num_images)
    check_outputs(None, [("--out", path, ".png") for path in paths], args.overwrite)
    (prompt,) = checked_prompts(args.prompt)
    pipeline = load_pipeline(RECIPE_FOR_STEPS[args.steps], device=args.device)
    images, nfe, seconds = generate_in_chunks(pipeline, prompt, args.w, args.tau, args.seed,
                                              args.num_images, GENERATE_CHUNK)
    with AllOrNothing() as files:
        for image, path in zip(images, paths):
            save_png(image, files.temporary(path), args.scale)
    shown = ", ".join(map(str, paths)) if len(paths) <= 8 else (
        f"{paths[0]} ... {paths[-1]} ({len(paths)} files)")
    print(f"generate: NFE {nfe} per image, {seconds:.2f} s, wrote {shown}")


# -- the parser --------------------------------------------------------------------------------
class OneLineParser(argparse.ArgumentParser):
    """argparse, with every error of use as one line (no usage block) naming --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def number(low: float, high: float, *, low_open: bool = False, note: str = ""):
    """An argparse type: a finite float in [low, high] (``(low, high]`` with low_open); NaN,
    inf and other text are refused with the range in the message."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > low if low_open else value >= low)
                and value <= high):
            raise argparse.ArgumentTypeError(f"must be a finite number in {interval}{note}, "
                                             f"got {text!r}")
        return value

    return parse


def whole_number(low: int, high: int, note: str = ""):
    """An argparse type: an integer in [low, high], the range in the message otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number in [{low}, {high}]{note}, "
                                             f"got {text!r}")
        return value

    return parse


fraction = number(0.0, 1.0)
guidance_scale = number(1.0, MAX_GUIDANCE, note=" (1 = unguided)")
amplify_factor = number(0.0, MAX_AMPLIFY, low_open=True, note=" (1 = no reweighting)")
scale_factor = whole_number(1, MAX_SCALE, note=f" (PNGs of at most {32 * MAX_SCALE} px)")
seed_number = whole_number(0, MAX_SEED, note=" (2**63 - 1)")
image_count = whole_number(1, MAX_IMAGES)


def add_common_options(parser: argparse.ArgumentParser, seed_help: str) -> None:
    parser.add_argument("--steps", type=int, choices=sorted(RECIPE_FOR_STEPS), default=4,
                        help="steps of each student: 4 loads the shipped pair 'G' (fCD4 + L_f / "
                             "CD4 + L_r, the paper's full method), 3 loads 'G3' (Table 5) "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=seed_number, default=0,
                        help=f"{seed_help}, 0 to 2**63 - 1 (default: %(default)s)")
    add_device_arguments(parser, threads=1,
                         threads_help="CPU threads for torch, ignored on a GPU; the toy tensors "
                                      "are tiny, so one is fastest, and far faster when other "
                                      "programs keep the cores busy")
    parser.add_argument("--scale", type=scale_factor, default=1, metavar="K",
                        help=f"enlarge every saved PNG K times by nearest neighbour, for viewing "
                             f"only, K in [1, {MAX_SCALE}] (a larger PNG is resized back to "
                             f"32x32 when read again) (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace output files that exist (never the input image); without "
                             "it an existing output is an error and nothing is written")


def add_guidance_options(parser: argparse.ArgumentParser, w: float, w_help: str) -> None:
    parser.add_argument("--w", type=guidance_scale, default=w,
                        help=f"classical guidance scale in [1, {MAX_GUIDANCE:g}], 1 = unguided "
                             f"(w_code = w - 1); {w_help} (default: %(default)s)")
    parser.add_argument("--tau", type=fraction, default=0.8,
                        help="dynamic CFG threshold in [0, 1]: guidance only on the steps with "
                             "t / T <= tau, 1 = guidance on every step; the paper's dynamic CFG "
                             "(default: %(default)s)")


ENCODE_SEED = "seeds the noise that the forward student adds to the image latent before encoding"


def edit_parser(commands) -> None:
    parser = commands.add_parser(
        "edit", help="edit an image with a target prompt (iCD + Prompt-to-Prompt)",
        description="Encode the image with the source prompt (forward student, unguided), then "
                    "decode twice in one batch: the source branch (unguided) reconstructs the "
                    "image, the target branch follows the target prompt under dynamic CFG, and "
                    "Prompt-to-Prompt lends it the source branch's attention maps.",
        epilog="example: python -m icd_lite edit --image in.png --source \"a large green "
               "square on a white background\" --target \"a large purple square on a white "
               "background\" --blend square --out out.png")
    parser.add_argument("--image", type=Path, required=True, help="the image to edit (any "
                        "format PIL reads; converted to 32x32 RGB with a warning if needed)")
    parser.add_argument("--source", required=True, help="a prompt that describes the image, "
                        "in the toy world's words")
    parser.add_argument("--target", required=True, help="the same prompt with the edit made, "
                        "e.g. one word changed")
    parser.add_argument("--out", type=Path, required=True, help="the edited image (.png)")
    parser.add_argument("--reconstruction", type=Path, help="also save the source branch's "
                        "reconstruction of the image (.png)")
    add_guidance_options(parser, 4.0, "the authors' SD1.5 benchmark scripts use 20; the toy "
                                      "students edit best near 4 on ToyBench")
    parser.add_argument("--cross", type=fraction, default=0.3,
                        help="P2P cross-attention injection: the fraction of the decoding "
                             "steps on which the target branch takes the source's word maps, "
                             "rounded down as P2P does (0.3 of 4 steps = 1 step, of 3 steps = "
                             "none; the printed line says how many) (default: %(default)s)")
    parser.add_argument("--self", dest="self_fraction", type=fraction, default=0.6,
                        help="P2P self-attention injection: the fraction of the decoding steps "
                             "on which the target branch takes the source's self-attention "
                             "(default: %(default)s)")
    parser.add_argument("--amplify", type=amplify_factor, default=4.0,
                        help=f"P2P reweighting: factor in (0, {MAX_AMPLIFY:g}] on the "
                             f"cross-attention of the target's changed words, 1 = none; it acts "
                             f"on the --cross steps only (default: %(default)s)")
    parser.add_argument("--blend", nargs="+", metavar="WORD",
                        help="P2P local blend: the edited object's noun, e.g. '--blend circle' "
                             "(or '--blend circle square' for a shape change); only the region "
                             "these words attend to may change. Each word is used for the "
                             "prompts that contain it; it is an error if neither prompt has one "
                             "(default: no blend, the whole image may change)")
    add_common_options(parser, ENCODE_SEED)
    parser.set_defaults(run=run_edit)


def invert_parser(commands) -> None:
    parser = commands.add_parser(
        "invert", help="encode an image to noise x_999 (the forward student)",
        description="Encode the image with the forward student (unguided) and save the noise "
                    "x_999, shape [1, 4, 8, 8], as safetensors: key 'noise', metadata prompt, "
                    "recipe and seed. With --reconstruction, also decode it back with the "
                    "reverse student, unguided, and print the PSNR against the input.")
    parser.add_argument("--image", type=Path, required=True, help="the image to invert (any "
                        "format PIL reads; converted to 32x32 RGB with a warning if needed)")
    parser.add_argument("--prompt", required=True, help="a prompt that describes the image")
    parser.add_argument("--out", type=Path, required=True, help="the noise (.safetensors)")
    parser.add_argument("--reconstruction", type=Path, help="also decode the noise, unguided, "
                        "and save the image (.png)")
    add_common_options(parser, ENCODE_SEED)
    parser.set_defaults(run=run_invert)


def generate_parser(commands) -> None:
    parser = commands.add_parser(
        "generate", help="generate images from a prompt (the reverse student)",
        description="Decode seeded Gaussian noise with the reverse student under dynamic CFG.")
    parser.add_argument("--prompt", required=True, help="what to draw, in the toy world's words")
    parser.add_argument("--out", type=Path, required=True,
                        help="the image (.png); with --num-images N > 1, the files are named "
                             "out_0.png, out_1.png, ... after it")
    parser.add_argument("--num-images", type=image_count, default=1, metavar="N",
                        help=f"how many images, 1 to {MAX_IMAGES}, from one draw of noise, "
                             f"decoded {GENERATE_CHUNK} at a time (default: %(default)s)")
    add_guidance_options(parser, 8.0, "the paper generates with 8, as does the Python API's "
                                      "pipe.generate")
    add_common_options(parser, "seeds the initial noise")
    parser.set_defaults(run=run_generate)


def build_parser() -> argparse.ArgumentParser:
    description = __doc__.split("\n")[0].replace("``", "")
    parser = OneLineParser(prog=PROG, description=description, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    for add in (edit_parser, invert_parser, generate_parser):
        add(commands)
    return parser


def main(argv=None) -> int:
    """Run one command; return 0, 1 after a file error or 2 after another error of use, each
    printed as one line on stderr (an error in the arguments exits with 2 from argparse)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        try:
            args.device = resolve_device(args.device)
        except ValueError as error:
            raise UsageError(f"--device {args.device}: {error}") from None
        configure_threads(args.device, args.threads)
        with warnings.catch_warnings():
            # The pictures were read from files and mapped to [-1, 1] here, so a pale one (all
            # white, mid-gray) is legal, not a [0, 1] tensor passed by mistake.
            warnings.simplefilter("ignore", ImageRangeWarning)
            args.run(args)
    except (FileError, OSError) as error:
        print(f"{PROG} {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 1
    except (ValueError, CheckpointError) as error:
        # ValueError covers UsageError, UnknownWordError, AlignmentError and the library's
        # checks of its arguments
        print(f"{PROG} {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2
    return 0
