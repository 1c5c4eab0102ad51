"""The procedural scene world: rendering, masks, captions, edits and their ground-truth masks."""

import math

import numpy as np
import pytest
import torch

from icd_lite.world.scenes import (BACKGROUND_COLORS, EDIT_TYPES, IMAGE_SIZE, OBJECT_COLORS,
                                   PATTERNS, SHAPES, SIZES, Scene, SceneObject, add_object,
                                   caption, caption_problem, change_background, change_color,
                                   change_shape, change_size, edit_mask, make_dataset, random_edit,
                                   random_scene, remove_object, render, vocabulary)


def rgb(color: tuple[int, int, int]) -> np.ndarray:
    """A 0-255 colour in the [-1, 1] scale of rendered images, shape [3]."""
    return np.array(color, dtype=np.float64) / 127.5 - 1


def one(shape="circle", color="red", size="large", x=16.0, y=16.0, background="black",
        pattern="plain") -> Scene:
    return Scene(background, pattern, (SceneObject(shape, color, size, x, y),))


@pytest.fixture(scope="module")
def dataset():
    return make_dataset(2000, seed=0)


def test_make_dataset_is_deterministic_by_seed():
    images, captions, scenes = make_dataset(30, seed=7)
    again = make_dataset(30, seed=7)
    assert torch.equal(images, again[0]) and captions == again[1] and scenes == again[2]
    other_images, other_captions, _ = make_dataset(30, seed=8)
    assert not torch.equal(images, other_images) and captions != other_captions


def test_image_and_mask_format(dataset):
    images, _, scenes = dataset
    assert images.shape == (2000, 3, IMAGE_SIZE, IMAGE_SIZE) and images.dtype == torch.float32
    assert images.min() == -1 and images.max() == 1  # black and white backgrounds reach both
    image, masks = render(scenes[0])
    assert image.dtype == np.float32 and masks.dtype == bool
    assert masks.shape == (len(scenes[0].objects), IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(images[0], torch.from_numpy(image), rtol=0, atol=0)


def test_masks_hold_the_object_and_nothing_else():
    rng = np.random.default_rng(0)
    for _ in range(40):
        scene = random_scene(rng, p_two_objects=0, p_striped=0)
        obj, background = scene.objects[0], rgb(BACKGROUND_COLORS[scene.background])
        image, (mask,) = render(scene)
        color = rgb(OBJECT_COLORS[obj.color])
        centre = image[:, int(obj.y), int(obj.x)]  # a pixel fully inside every shape
        np.testing.assert_allclose(centre, color, atol=1e-6)
        assert mask[int(obj.y), int(obj.x)]
        to_object = np.linalg.norm(image - color[:, None, None], axis=0)
        to_background = np.linalg.norm(image - background[:, None, None], axis=0)
        assert np.all(to_object[mask] < to_background[mask])  # coverage > 1/2 inside the mask
        assert np.all(to_object[~mask] >= to_background[~mask] - 1e-5)  # and <= 1/2 outside


@pytest.mark.parametrize("size", SIZES)
def test_shape_areas(size):
    r, offsets = SIZES[size], [(0, 0), (0.25, 0.5), (0.5, 0.7), (0.3, 0.1)]
    expected = {"circle": math.pi * r**2, "square": (1.7 * r) ** 2, "diamond": 2 * r**2,
                "triangle": 2 * r**2}
    for shape in SHAPES:
        masks = [render(one(shape, size=size, x=16 + dx, y=16 + dy))[1][0] for dx, dy in offsets]
        areas = [mask.sum() for mask in masks]
        if shape == "circle":  # every circle mask has about the area pi r^2
            assert areas == pytest.approx([expected[shape]] * len(offsets), rel=0.15)
        assert np.mean(areas) == pytest.approx(expected[shape], rel=0.1), shape
    centred = {render(one(shape, size=size))[1][0].tobytes() for shape in SHAPES}
    assert len(centred) == len(SHAPES)  # four different masks


def test_stripes_use_two_shades_of_the_background():
    for background, base in BACKGROUND_COLORS.items():
        plain = render(one(size="small", x=7, y=7, background=background))[0]
        striped = render(one(size="small", x=7, y=7, background=background, pattern="striped"))[0]
        corner = (slice(None), slice(16, None), slice(16, None))  # far from the object
        assert len(np.unique(plain[corner].reshape(3, -1), axis=1).T) == 1
        shades = np.unique(striped[corner].reshape(3, -1), axis=1).T
        assert len(shades) == 2 and any(np.allclose(s, rgb(base)) for s in shades)
        assert np.abs(shades[0] - shades[1]).max() > 0.3  # noticeably different


def test_captions_follow_the_grammar():
    left = SceneObject("triangle", "yellow", "small", 7, 20)
    right = SceneObject("diamond", "purple", "small", 24, 10)
    assert caption(Scene("gray", "plain", (left,))) == ("a small yellow triangle on a gray "
                                                        "background")
    assert (caption(Scene("green", "striped", (right, left)))  # listed left to right
            == "a small yellow triangle and a small purple diamond on a striped green background")


def test_every_caption_of_the_world_is_accepted_and_others_are_explained():
    rng = np.random.default_rng(3)
    assert all(caption_problem(caption(random_scene(rng, p_two_objects=0.5))) is None
               for _ in range(300))
    grammar = caption_problem("a red circle on a gray background")  # no size
    assert grammar is not None and "grammar" in grammar
    assert "grammar" in caption_problem("a small red circle on a gray")
    crowded = caption_problem("a large red circle and a small blue square on a gray background")
    assert crowded is not None and "both objects must be small" in crowded
    same = caption_problem("a small blue square on a striped blue background")
    assert same is not None and "colour of its background" in same


def test_captions_only_use_vocabulary_words():
    words = vocabulary()
    assert words == sorted(set(words))
    rng = np.random.default_rng(1)
    used = set()
    for _ in range(500):
        scene = random_scene(rng)
        text = caption(scene)
        used.update(text.split())
        ordered = sorted(scene.objects, key=lambda o: o.x)
        phrases = [f"a {o.size} {o.color} {o.shape}" for o in ordered]
        assert text.startswith(" and ".join(phrases) + " on a ")
    assert used == set(words)  # every caption word is known, and every known word is used


def test_object_color_never_names_the_background(dataset):
    assert all(o.color != s.background for s in dataset[2] for o in s.objects)
    with pytest.raises(ValueError, match="blue object on a blue background"):
        one(color="blue", background="blue")


def test_dataset_covers_the_vocabulary(dataset):
    scenes = dataset[2]
    objects = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.color for o in objects} == set(OBJECT_COLORS)
    assert {o.size for o in objects} == set(SIZES)
    assert {s.background for s in scenes} == set(BACKGROUND_COLORS)
    assert {s.pattern for s in scenes} == set(PATTERNS)
    assert 0.25 < np.mean([len(s.objects) == 2 for s in scenes]) < 0.35
    # A large object (a 20 px box) leaves no room for a second one 2 px away in 32 px, so the
    # two objects of a scene are always small.
    pairs = {tuple(sorted(o.size for o in s.objects)) for s in scenes if len(s.objects) == 2}
    assert pairs == {("small", "small")}


@pytest.mark.parametrize("make, allowed", [
    (lambda: one(shape="hexagon"), "circle, square, triangle, diamond"),
    (lambda: one(color="orange"), "red, green, blue, yellow, purple"),
    (lambda: one(size="huge"), "small, large"),
    (lambda: one(background="red"), "black, white, gray, blue, green"),
    (lambda: one(pattern="dotted"), "plain, striped"),
    (lambda: random_edit(one(), np.random.default_rng(0), "rotate"), "color, shape, background"),
])
def test_unknown_words_name_the_allowed_ones(make, allowed):
    with pytest.raises(ValueError, match=f"unknown .*; choose one of: {allowed}"):
        make()


def test_geometry_is_validated():
    with pytest.raises(ValueError, match="would leave the 32x32 image"):
        SceneObject("circle", "red", "large", 6, 16)
    a = SceneObject("circle", "red", "small", 8, 8)
    with pytest.raises(ValueError, match="too close"):
        Scene("black", "plain", (a, SceneObject("square", "blue", "small", 23, 8)))
    Scene("black", "plain", (a, SceneObject("square", "blue", "small", 24, 8)))  # 2 px apart
    with pytest.raises(ValueError, match="1 to 2 SceneObjects"):
        Scene("black", "plain", ())


def words_changed(before: str, after: str) -> list[tuple[str, str]]:
    before, after = before.split(), after.split()
    assert len(before) == len(after)
    return [(b, a) for b, a in zip(before, after) if b != a]


def check_caption(edit_type: str, before: str, after: str):
    objects_before, background_before = before.split(" on a ")
    objects_after, background_after = after.split(" on a ")
    if edit_type in ("color", "shape", "size"):
        vocabulary_of_edit = {"color": OBJECT_COLORS, "shape": SHAPES, "size": SIZES}[edit_type]
        (old, new), = words_changed(before, after)
        assert old in vocabulary_of_edit and new in vocabulary_of_edit
    elif edit_type == "background":
        assert objects_before == objects_after and background_before != background_after
    else:
        fewer, more = (before, after) if edit_type == "add" else (after, before)
        assert more.count(" and ") == 1 and fewer.count(" and ") == 0
        assert background_before == background_after
        assert fewer.split(" on a ")[0] in more.split(" on a ")[0]


@pytest.mark.parametrize("edit_type", EDIT_TYPES)
def test_random_edits_change_caption_and_stay_inside_edit_mask(edit_type):
    rng = np.random.default_rng(2)
    done = 0
    # a second object fits only beside a small one near the border: "add" needs more tries
    for _ in range(400 if edit_type == "add" else 100):
        source = random_scene(rng, p_two_objects=0.5, p_striped=0.5)
        try:
            target = random_edit(source, rng, edit_type)
        except ValueError:
            assert edit_type in ("size", "add", "remove")  # the others are always possible
            continue
        done += 1
        check_caption(edit_type, caption(source), caption(target))
        (image_s, masks_s), (image_t, _) = render(source), render(target)
        changed = np.abs(image_s - image_t).max(axis=0) > 1e-6
        mask = edit_mask(source, target)
        assert changed.any() and not (changed & ~mask).any()
        if edit_type == "background":
            assert mask.mean() > 0.5
            for obj in source.objects:  # object interiors are preserved
                assert not mask[int(obj.y), int(obj.x)]
        else:
            assert mask.mean() < 0.5
    assert done >= 15


def test_edit_mask_of_identical_scenes_is_empty():
    scene = one(shape="triangle")
    assert not edit_mask(scene, scene).any()
    assert not edit_mask(scene, change_color(scene, 0, "red")).any()  # a no-op edit


def test_explicit_edits():
    scene = one("circle", "red", "small", 7, 7, background="gray")
    assert caption(change_shape(scene, 0, "square")).startswith("a small red square")
    assert caption(change_size(one(size="small"), 0, "large")).startswith("a large red circle")
    assert caption(change_background(scene, "white")) == "a small red circle on a white background"
    striped = change_background(scene, "white", "striped")
    assert caption(striped) == "a small red circle on a striped white background"
    two = add_object(scene, SceneObject("diamond", "blue", "small", 25, 25))
    assert caption(two) == "a small red circle and a small blue diamond on a gray background"
    assert remove_object(two, 0) == Scene("gray", "plain", (two.objects[1],))


def test_impossible_edits_raise():
    rng = np.random.default_rng(0)
    centre = one(size="large")  # a large object in the middle leaves no room
    edge = one(size="small", x=7, y=7)
    two = add_object(edge, SceneObject("circle", "blue", "small", 23, 23))
    cases = [
        (lambda: remove_object(centre, 0), "cannot remove the only object"),
        (lambda: random_edit(centre, rng, "remove"), "cannot remove the only object"),
        (lambda: add_object(two, SceneObject("circle", "red", "small", 25, 7)), "at most 2"),
        (lambda: random_edit(two, rng, "add"), "already has 2"),
        (lambda: add_object(centre, SceneObject("circle", "blue", "small", 7, 7)), "too close"),
        (lambda: random_edit(centre, rng, "add"), "no room"),
        (lambda: change_color(centre, 0, "black"), "unknown object color"),
        (lambda: change_color(one(background="blue"), 0, "blue"), "ambiguous"),
        (lambda: change_background(change_color(centre, 0, "green"), "green"), "ambiguous"),
        (lambda: change_size(edge, 0, "large"), "would leave"),
        (lambda: change_size(two, 1, "large"), "would leave"),  # never room to grow beside one
        (lambda: random_edit(edge, rng, "size"), "no object of this scene can change size"),
        (lambda: change_shape(two, 2, "square"), "object index must be in"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()
