r"""Input checks shared by the library: finite numbers in their range, and image tensors.

NaN passes every comparison (``nan < 0`` and ``nan >= 0`` are both False), so a check written as
``if w < 1: raise`` lets NaN through, and inf passes every upper-bound-free check; both then turn
a whole picture into NaN or black. ``check_finite`` tests finiteness first and writes the range
so that NaN fails it. ``check_image_values`` does the same for image tensors and catches the
other silent mistake: images in [0, 1] given where [-1, 1] is expected.

Every error is one line: the parameter, the allowed range and the fix.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch

IMAGE_FIX = "convert [0, 1] images with x * 2 - 1 (uint8 pixels with x / 127.5 - 1)"


class ImageRangeWarning(UserWarning):
    """Images that look like [0, 1] images were given where [-1, 1] is expected."""


def _range_text(low, high, low_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}]"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"<= {high:g}"
    return ""


def _shown(value) -> str:
    """The value for a one-line message: a number, or the first entries of a tensor or array."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return repr(float(value))
    try:
        flat = torch.as_tensor(value).detach().flatten().tolist()
    except (TypeError, ValueError, RuntimeError):
        return " ".join(repr(value).split())[:80]
    if len(flat) == 1:
        return repr(flat[0])
    return repr(flat[:8])[:-1] + (", ...]" if len(flat) > 8 else "]")


def check_finite(name: str, value, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, integer: bool = False, fix: str = "") -> None:
    """Raise a one-line ValueError unless ``value`` is a finite number in [low, high].

    ``value``: a Python or numpy number, a 0-dim tensor, or a tensor / sequence of numbers (all
    are checked, e.g. one guidance scale per sample). ``low``/``high``: inclusive bounds (None:
    none); ``low_open=True`` makes ``low`` exclusive (``> low``); ``integer=True`` asks for a
    Python or numpy integer (a count: steps, iterations). ``fix``: what the value means or how
    to fix it, appended to the message. The value itself is never changed or converted.
    """
    bounds = _range_text(low, high, low_open)
    rule = f"{bounds} and finite" if bounds else "a finite number"
    if integer:
        rule = f"an integer {bounds}".strip()
    if isinstance(value, (bool, str)) or value is None:
        ok = False
    elif integer and not isinstance(value, numbers.Integral):
        ok = False
    elif isinstance(value, numbers.Real):
        x = float(value)
        ok = math.isfinite(x) and (low is None or (x > low if low_open else x >= low)) and (
            high is None or x <= high)
    else:
        try:
            x = torch.as_tensor(value).detach()
        except (TypeError, ValueError, RuntimeError):
            x = None
        ok = x is not None and x.numel() > 0 and not (x.dtype.is_complex or x.dtype == torch.bool)
        if ok:
            ok = bool(torch.isfinite(x).all()) and (
                low is None or bool((x > low).all() if low_open else (x >= low).all())) and (
                high is None or bool((x <= high).all()))
    if not ok:
        raise ValueError(f"{name} must be {rule}, got {_shown(value)}"
                         + (f"; {fix}" if fix else ""))


def check_image_values(images: torch.Tensor, name: str = "images", *,
                       zero_one: str = "warn") -> None:
    """Finite pixels, and no image that looks like a [0, 1] image, in a [B, 3, H, W] batch in
    [-1, 1].

    A NaN or infinite pixel is a ValueError. An image with no negative value at all is how a
    [0, 1] image looks on the [-1, 1] scale (a legal one too: all white, or pale everywhere, so
    ``zero_one`` chooses): "error" raises ValueError, "warn" warns with ``ImageRangeWarning`` (a
    UserWarning), "ignore" skips the test. Checked per image, so one [0, 1] image among valid ones
    is caught. The toy world never draws such an image: every scene has an object, and every
    object colour has a channel below 41 / 255 (checked on 2000 scenes and the 600 ToyBench
    images: no image without a negative value).
    """
    finite = torch.isfinite(images).flatten(1).all(1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise ValueError(f"{name} contain NaN or infinite values ({_which(bad, len(images))})"
                         f"; every pixel must be a finite number in [-1, 1]: "
                         f"check what made them (a division by zero, a NaN from a model)")
    if zero_one == "ignore":
        return
    pale = ~(images < 0).flatten(1).any(1)
    if bool(pale.any()):
        bad = pale.nonzero().flatten().tolist()
        verb = "has" if len(bad) == 1 else "have"
        message = (f"{name} are expected in [-1, 1], but {_which(bad, len(images))} {verb} no "
                   f"negative value, as a [0, 1] image would; {IMAGE_FIX}")
        if zero_one == "error":
            raise ValueError(message)
        warnings.warn(message, ImageRangeWarning, stacklevel=4)  # the caller of the metric


def _which(indices: list[int], total: int) -> str:
    """Images for a message: 'image 2 of 4', or '3 of 4 images: 0, 1, 3' (at most 3 listed)."""
    if len(indices) == 1:
        return f"image {indices[0]} of {total}"
    listed = ", ".join(map(str, indices[:3])) + (", ..." if len(indices) > 3 else "")
    return f"{len(indices)} of {total} images: {listed}"
