r"""A procedural image-caption world: coloured shapes on plain or striped backgrounds, 32x32 RGB.

The tiny text-to-image model of icd_lite trains on this world instead of LAION, so that every
caption is exactly true of its image and every edit has an exact ground truth. A scene is a
background (a colour, plain or striped) and one or two objects (shape, colour, size, centre).
Captions come from a small grammar::

    caption    := objects " on a " background " background"
    objects    := object | object " and " object          (objects in left-to-right order)
    object     := "a " size " " color " " shape
    background := bg_color | "striped " bg_color

e.g. "a small red circle and a small yellow diamond on a striped gray background". An object's
colour name is never its background's colour name: "a blue square on a blue background" would be
ambiguous, as the object blue and the (navy) background blue are different colours.

Geometry is in pixels, (0, 0) at the image's top-left corner, y pointing down. An object of
radius r lies inside its box [x - r, x + r] x [y - r, y + r]; boxes lie inside the image with at
least MIN_GAP px of background between them, so objects never touch. Objects are large for the
image, radius 7 or 10 px (3.5-5 cells of the 8x8 latent): with radii 5 / 7 (2.5-3.5 cells) the
teacher drew 55 % of shapes right, with 7 / 10 it drew 94.6 % (measured, same training). So a
large object leaves no room for a second one, and the two objects of a scene are always small.
Shapes are drawn with exact inside-tests on a 4x finer grid and averaged down (anti-aliasing);
an object's mask holds the pixels it covers by more than half. Edits return a new Scene, and
edit_mask(source, target) is the ground truth of an edit: render(source) and render(target)
agree exactly outside it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np
import torch

IMAGE_SIZE = 32
SUPERSAMPLE = 4  # sub-pixels per pixel side, for anti-aliasing
MIN_GAP = 2  # pixels of background between the boxes of two objects
MAX_OBJECTS = 2

SHAPES = ("circle", "square", "triangle", "diamond")
OBJECT_COLORS = {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (30, 80, 240),
                 "yellow": (245, 215, 20), "purple": (150, 40, 200)}
BACKGROUND_COLORS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128),
                     "blue": (15, 25, 90), "green": (15, 70, 25)}
SIZES = {"small": 7, "large": 10}  # radius in pixels = half the side of the object's box
PATTERNS = ("plain", "striped")
STRIPE_SHIFT = 48  # stripes are this much lighter than a dark background, darker than a light one
EDIT_TYPES = ("color", "shape", "background", "size", "add", "remove")

_SUB = (np.arange(IMAGE_SIZE * SUPERSAMPLE) + 0.5) / SUPERSAMPLE  # sub-pixel centres, 0.125 ...
# Diagonal stripes 4 px wide: 2 px stripes cost the 4x-downsampling VAE ~5 dB of PSNR.
_STRIPES = np.add(*np.indices((IMAGE_SIZE, IMAGE_SIZE))) // 4 % 2 == 1


def _check_word(kind: str, word, allowed) -> None:
    if word not in allowed:
        raise ValueError(f"unknown {kind} {word!r}; choose one of: {', '.join(allowed)}")


@dataclass(frozen=True)
class SceneObject:
    """One shape, centred at (x, y) in pixels; it must lie fully inside the image."""

    shape: str
    color: str
    size: str
    x: float
    y: float

    def __post_init__(self):
        _check_word("shape", self.shape, SHAPES)
        _check_word("object color", self.color, OBJECT_COLORS)
        _check_word("size", self.size, SIZES)
        object.__setattr__(self, "x", float(self.x))
        object.__setattr__(self, "y", float(self.y))
        r, far = SIZES[self.size], IMAGE_SIZE - SIZES[self.size]
        if not (r <= self.x <= far and r <= self.y <= far):  # also rejects NaN
            raise ValueError(f"a {self.size} object centred at ({self.x:.1f}, {self.y:.1f}) would "
                             f"leave the {IMAGE_SIZE}x{IMAGE_SIZE} image: its centre must lie in "
                             f"[{r}, {far}] on both axes; move it or make it smaller")


def _apart(xy, radius: float, other: SceneObject):
    """Whether boxes of half-side `radius` centred at xy [..., 2] leave MIN_GAP px to `other`."""
    distance = np.abs(np.asarray(xy) - (other.x, other.y)).max(axis=-1)  # Chebyshev distance
    return distance >= radius + SIZES[other.size] + MIN_GAP


@dataclass(frozen=True)
class Scene:
    """A background colour and pattern, and 1 or 2 objects drawn over it in order."""

    background: str
    pattern: str
    objects: tuple[SceneObject, ...]

    def __post_init__(self):
        _check_word("background color", self.background, BACKGROUND_COLORS)
        _check_word("pattern", self.pattern, PATTERNS)
        objects = tuple(self.objects)
        object.__setattr__(self, "objects", objects)
        if not (1 <= len(objects) <= MAX_OBJECTS
                and all(isinstance(obj, SceneObject) for obj in objects)):
            raise ValueError(f"a scene needs 1 to {MAX_OBJECTS} SceneObjects, got {objects!r}")
        if self.background in {obj.color for obj in objects}:
            raise ValueError(f"a {self.background} object on a {self.background} background would "
                             f"be ambiguous; choose another object color or background")
        a, b = objects[0], objects[-1]
        if len(objects) == 2 and not _apart((a.x, a.y), SIZES[a.size], b):
            raise ValueError(f"the objects at ({a.x:.1f}, {a.y:.1f}) and ({b.x:.1f}, {b.y:.1f}) "
                             f"are too close: their boxes (half-side = radius) need {MIN_GAP} px "
                             f"of background between them; move one away or make it smaller")


def _coverage(obj: SceneObject) -> np.ndarray:
    """Fraction of each pixel inside the object, float64 [32, 32]: exact tests on the fine grid."""
    dx, dy, r = _SUB[None, :] - obj.x, _SUB[:, None] - obj.y, SIZES[obj.size]
    if obj.shape == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif obj.shape == "square":  # half-side 0.85 r: area 2.9 r^2, close to the circle's 3.1 r^2
        inside = np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    elif obj.shape == "diamond":  # a square turned by 45 degrees, corners touching the box
        inside = np.abs(dx) + np.abs(dy) <= r
    else:  # triangle: apex at the middle of the box's top edge, base along its bottom edge
        inside = (dy <= r) & (2 * np.abs(dx) <= dy + r)
    return inside.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE).mean(axis=(1, 3))


def _background(scene: Scene) -> np.ndarray:
    """The background alone, float64 [3, 32, 32] in 0 ... 255."""
    base = np.array(BACKGROUND_COLORS[scene.background], dtype=np.float64)
    image = np.broadcast_to(base[:, None, None], (3, IMAGE_SIZE, IMAGE_SIZE)).copy()
    if scene.pattern == "striped":
        shift = STRIPE_SHIFT if base.mean() < 128 else -STRIPE_SHIFT
        image[:, _STRIPES] = (base + shift)[:, None]
    return image


def render(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """The image, float32 [3, 32, 32] in [-1, 1], and the object masks, bool [n_objects, 32, 32]."""
    image = _background(scene)
    coverage = np.stack([_coverage(obj) for obj in scene.objects])
    for obj, alpha in zip(scene.objects, coverage):
        color = np.array(OBJECT_COLORS[obj.color], dtype=np.float64)[:, None, None]
        image = image * (1 - alpha) + color * alpha  # coverage as opacity: exact colour inside
    return (image / 127.5 - 1).astype(np.float32), coverage > 0.5


def caption(scene: Scene) -> str:
    """The scene described by the grammar of the module docstring, objects left to right."""
    ordered = sorted(scene.objects, key=lambda obj: (obj.x, obj.y))
    objects = " and ".join(f"a {obj.size} {obj.color} {obj.shape}" for obj in ordered)
    background = ("striped " if scene.pattern == "striped" else "") + scene.background
    return f"{objects} on a {background} background"


_OBJECT = rf"a ({'|'.join(SIZES)}) ({'|'.join(OBJECT_COLORS)}) ({'|'.join(SHAPES)})"
_CAPTION = re.compile(rf"{_OBJECT}(?: and {_OBJECT})? on a (?:striped )?"
                      rf"({'|'.join(BACKGROUND_COLORS)}) background")  # the grammar above


def caption_problem(prompt: str) -> str | None:
    """Why no scene of this world has the caption ``prompt`` (lower case), or None if one has.

    The text encoder reads any string of vocabulary words, but the teacher only ever saw
    captions of the grammar above, so it draws anything else poorly: a prompt outside the
    grammar, a large object beside another one, or an object of its background's colour name.
    """
    match = _CAPTION.fullmatch(prompt)
    if match is None:
        return ("not a caption of the world's grammar: 'a <size> <colour> <shape> "
                "[and a <size> <colour> <shape>] on a [striped] <colour> background'")
    sizes, colors, background = match.group(1, 4), match.group(2, 5), match.group(7)
    if sizes[1] is not None and "large" in sizes:
        return "a large object leaves no room for a second one: both objects must be small"
    if background in colors:
        return f"an object is never the colour of its background ({background})"
    return None


def vocabulary() -> list[str]:
    """Every word a caption can contain, sorted and without duplicates."""
    return sorted({"a", "and", "on", "background", "striped",
                   *SHAPES, *SIZES, *OBJECT_COLORS, *BACKGROUND_COLORS})


def _check_index(scene: Scene, index: int) -> None:
    if not (isinstance(index, (int, np.integer)) and 0 <= index < len(scene.objects)):
        raise ValueError(f"object index must be in [0, {len(scene.objects) - 1}] for a scene of "
                         f"{len(scene.objects)} object(s), got {index!r}")


def _replace_object(scene: Scene, index: int, **changes) -> Scene:
    _check_index(scene, index)
    objects = list(scene.objects)
    objects[index] = replace(objects[index], **changes)
    return replace(scene, objects=tuple(objects))


def change_color(scene: Scene, index: int, color: str) -> Scene:
    """Recolour object `index` (never to the background's colour name)."""
    return _replace_object(scene, index, color=color)


def change_shape(scene: Scene, index: int, shape: str) -> Scene:
    """Give object `index` another shape; its centre, size and colour stay."""
    return _replace_object(scene, index, shape=shape)


def change_size(scene: Scene, index: int, size: str) -> Scene:
    """Resize object `index` about its centre; raises if it would leave the image or come close."""
    return _replace_object(scene, index, size=size)


def change_background(scene: Scene, background: str, pattern: str | None = None) -> Scene:
    """Another background colour, and pattern if given (None keeps the current pattern)."""
    return replace(scene, background=background,
                   pattern=scene.pattern if pattern is None else pattern)


def add_object(scene: Scene, obj: SceneObject) -> Scene:
    """Add an object, drawn last; it must fit beside the one already there."""
    if len(scene.objects) >= MAX_OBJECTS:
        raise ValueError(f"a scene holds at most {MAX_OBJECTS} objects; remove one first")
    return replace(scene, objects=scene.objects + (obj,))


def remove_object(scene: Scene, index: int) -> Scene:
    """Remove object `index`; the scene must keep at least one object."""
    _check_index(scene, index)
    if len(scene.objects) == 1:
        raise ValueError("cannot remove the only object: a scene needs at least one")
    return replace(scene, objects=scene.objects[:index] + scene.objects[index + 1:])


def edit_mask(source: Scene, target: Scene) -> np.ndarray:
    """Bool [32, 32]: the pixels an edit from `source` to `target` may change.

    An object in only one of the scenes (added, removed or changed) may change every pixel it
    touches, its anti-aliased rim included (up to a pixel wider than its mask). A new background
    changes every pixel but those fully covered by an object kept in both scenes.
    """
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for obj in set(source.objects) ^ set(target.objects):  # added, removed or changed objects
        mask |= _coverage(obj) > 0
    if (source.background, source.pattern) != (target.background, target.pattern):
        kept = set(source.objects) & set(target.objects)  # np.any([]) is False: all pixels
        mask |= ~np.any([_coverage(obj) == 1 for obj in kept], axis=0)
    return mask


def _random_object(rng: np.random.Generator, background: str, others=(), size=None):
    """A random object (of `size` if given) apart from `others`, or None if 256 centres fail."""
    size = size or str(rng.choice(list(SIZES)))
    radius = SIZES[size]
    centres = rng.uniform(radius, IMAGE_SIZE - radius, size=(256, 2))  # rejection sampling
    fits = np.ones(len(centres), dtype=bool)
    for other in others:
        fits &= _apart(centres, radius, other)
    if not fits.any():
        return None
    color = str(rng.choice([name for name in OBJECT_COLORS if name != background]))
    return SceneObject(str(rng.choice(SHAPES)), color, size, *centres[fits.argmax()])


def random_scene(rng: np.random.Generator, p_two_objects: float = 0.3,
                 p_striped: float = 0.3) -> Scene:
    """A random scene: every attribute uniform, 2 objects with probability p_two_objects."""
    for name, p in (("p_two_objects", p_two_objects), ("p_striped", p_striped)):
        if not 0 <= p <= 1:
            raise ValueError(f"{name} is a probability and must lie in [0, 1], got {p}")
    background = str(rng.choice(list(BACKGROUND_COLORS)))
    pattern = "striped" if rng.random() < p_striped else "plain"
    first = _random_object(rng, background)
    if rng.random() >= p_two_objects:
        return Scene(background, pattern, (first,))
    second = _random_object(rng, background, (first,))
    while second is None:  # no room beside `first` (a large one in the middle): redraw both
        first = _random_object(rng, background)
        second = _random_object(rng, background, (first,))
    return Scene(background, pattern, (first, second))


def random_edit(scene: Scene, rng: np.random.Generator, edit_type: str) -> Scene:
    """A random edit of this type, to new values; ValueError when the scene allows none."""
    _check_word("edit type", edit_type, EDIT_TYPES)
    n = len(scene.objects)
    index = int(rng.integers(n))
    obj = scene.objects[index]
    if edit_type == "color":
        free = [name for name in OBJECT_COLORS if name not in (obj.color, scene.background)]
        return change_color(scene, index, str(rng.choice(free)))
    if edit_type == "shape":
        return change_shape(scene, index, str(rng.choice([s for s in SHAPES if s != obj.shape])))
    if edit_type == "background":
        taken = {scene.background} | {o.color for o in scene.objects}
        free = [name for name in BACKGROUND_COLORS if name not in taken]
        return change_background(scene, str(rng.choice(free)), str(rng.choice(PATTERNS)))
    if edit_type == "size":
        for i in (index, 1 - index)[:n]:  # shrinking always works, growing may not
            try:
                return change_size(scene, i, next(s for s in SIZES if s != scene.objects[i].size))
            except ValueError:
                continue
        raise ValueError("no object of this scene can change size without leaving the image "
                         "or coming too close to the other object")
    if edit_type == "add":
        if n >= MAX_OBJECTS:
            raise ValueError(f"cannot add to a scene that already has {MAX_OBJECTS} objects")
        for size in rng.permutation(list(SIZES)):
            new = _random_object(rng, scene.background, scene.objects, size=str(size))
            if new is not None:
                return add_object(scene, new)
        raise ValueError("no room for another object in this scene, not even a small one")
    return remove_object(scene, index)


def make_dataset(n: int, seed: int) -> tuple[torch.Tensor, list[str], list[Scene]]:
    """n random scenes from default_rng(seed): images float32 [n, 3, 32, 32], captions, scenes."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (the number of scenes) must be a positive integer, got {n!r}")
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    images = torch.from_numpy(np.stack([render(scene)[0] for scene in scenes]))
    return images, [caption(scene) for scene in scenes], scenes
