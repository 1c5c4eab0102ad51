"""The procedural world the tiny text-to-image model is trained on (see ``scenes``)."""
