"""Natural-English captions for the moving-digits data set, and a parser that reads the digit and
direction back out of any caption or user prompt.

A caption is a sentence template filled with three phrases, each drawn from a list of synonyms:
  * the digit: numeral or word ("7", "the digit 7", "a handwritten seven", "the number seven"),
    optionally with a colour ("a red 7");
  * the motion verb ("moving", "drifting", "sliding", ...; "moves", "drifts", ... after a subject);
  * the direction ("to the left", "leftward", "up and to the right", "towards the bottom left").

`TRAIN_TEMPLATES` are used for the `caption` feature of every split; `HELDOUT_TEMPLATES` are
different sentence frames (same vocabulary) used only for the test split's `caption_heldout`, so
an evaluation can measure generalisation to paraphrases never seen in training. The `VOCAB_*`
lists go further: words and phrases for the digit, verb, direction and frame that no training
caption uses (`heldout_vocabulary_captions`, eval.py's `caption_vocab` rows).
"""

from __future__ import annotations

import re

import numpy as np

# Index order = angle order (0 = right, counter-clockwise in 45 degree steps, y pointing up on
# screen), so a trajectory's angle maps to an index by round(angle / 45) % 8.
DIRECTIONS = ("right", "up_right", "up", "up_left", "left", "down_left", "down", "down_right")

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Bright, distinct colours for `colour=True` (RGB of the digit's brightest stroke) and their names.
COLOURS = {
    "red": (255, 60, 50),
    "green": (60, 230, 60),
    "blue": (70, 110, 255),
    "yellow": (255, 235, 40),
    "cyan": (40, 230, 240),
    "magenta": (245, 60, 240),
    "orange": (255, 150, 30),
    "white": (255, 255, 255),
}
COLOUR_NAMES = tuple(COLOURS)

# Several phrasings per direction (index-aligned with DIRECTIONS). Each must read well after any
# verb below ("moving to the left", "drifts towards the bottom right").
DIRECTION_PHRASES = (
    ("to the right", "right", "rightward", "rightwards", "towards the right"),
    (
        "up and to the right",
        "diagonally up and to the right",
        "towards the top right",
        "up and right",
        "upward and to the right",
    ),
    ("up", "upward", "upwards", "towards the top"),
    (
        "up and to the left",
        "diagonally up and to the left",
        "towards the top left",
        "up and left",
        "upward and to the left",
    ),
    ("to the left", "left", "leftward", "leftwards", "towards the left"),
    (
        "down and to the left",
        "diagonally down and to the left",
        "towards the bottom left",
        "down and left",
        "downward and to the left",
    ),
    ("down", "downward", "downwards", "towards the bottom"),
    (
        "down and to the right",
        "diagonally down and to the right",
        "towards the bottom right",
        "down and right",
        "downward and to the right",
    ),
)

# (present participle, third person singular)
VERBS = (
    ("moving", "moves"),
    ("drifting", "drifts"),
    ("sliding", "slides"),
    ("gliding", "glides"),
    ("travelling", "travels"),
    ("floating", "floats"),
    ("bouncing", "bounces"),
    ("heading", "heads"),
)

# Noun phrases for the digit: {n} numeral, {w} word, {c} colour adjective + space (or "").
DIGIT_PHRASES = (
    "the {c}digit {n}",
    "the {c}number {w}",
    "the {c}number {n}",
    "a {c}handwritten {w}",
    "a {c}handwritten {n}",
    "a {c}{n}",
    "the {c}{w}",
    "{c}{n}",
    "a {c}{w}",
    "the {c}numeral {n}",
)

# Sentence frames: {d} digit phrase, {ving} participle, {vs} third person verb, {dir} direction.
TRAIN_TEMPLATES = (
    "{d} {ving} {dir}",
    "{d} {vs} {dir}",
    "{d} is {ving} {dir}",
    "a video of {d} {ving} {dir}",
    "{d} {ving} {dir} across the frame",
    "{d} {ving} {dir} on a dark background",
    "{d} that {vs} {dir}",
    "footage of {d} {ving} {dir}",
)
HELDOUT_TEMPLATES = (
    "watch {d} as it {vs} {dir}",
    "in this clip, {d} {vs} {dir}",
    "{d} can be seen {ving} {dir}",
    "an animation where {d} {vs} {dir}",
    "{d} keeps {ving} {dir}",
)

# The held-out VOCABULARY (eval.py's `caption_vocab` rows): direction phrases, verbs, digit
# phrases and sentence frames that no training caption uses, chosen once (2026-12-03) and never
# to be trained on. They measure whether the model understands wording it has not seen (the text
# encoder knows these words; the denoiser never saw them). Colour names are the training ones.
# tests/test_captions.py checks they share no phrase with the training lists.
VOCAB_DIRECTION_PHRASES = (
    ("eastward", "toward the east", "from left to right"),
    ("toward the northeast", "northeastward", "toward the upper right corner"),
    ("northward", "skyward", "toward the ceiling"),
    ("toward the northwest", "northwestward", "toward the upper left corner"),
    ("westward", "toward the west", "from right to left"),
    ("toward the southwest", "southwestward", "toward the lower left corner"),
    ("southward", "toward the floor", "toward the south"),
    ("toward the southeast", "southeastward", "toward the lower right corner"),
)
VOCAB_VERBS = (
    ("creeping", "creeps"),
    ("wandering", "wanders"),
    ("cruising", "cruises"),
    ("sailing", "sails"),
    ("zooming", "zooms"),
    ("shifting", "shifts"),
    ("rolling", "rolls"),
    ("migrating", "migrates"),
)
VOCAB_DIGIT_PHRASES = (
    "the {c}figure {w}",
    "the {c}symbol {n}",
    "a {c}scribbled {w}",
    "the {c}character {n}",
    "a {c}hand-drawn {n}",
    "the {c}glyph {w}",
)
VOCAB_TEMPLATES = (
    "a short clip showing {d} {ving} {dir}",
    "here we see {d} {ving} {dir}",
    "{d} steadily {vs} {dir}",
    "look, {d} {vs} {dir}",
)

# (digit phrases, verbs, direction phrases) of each vocabulary.
VOCABULARIES = {
    "train": (DIGIT_PHRASES, VERBS, DIRECTION_PHRASES),
    "heldout": (VOCAB_DIGIT_PHRASES, VOCAB_VERBS, VOCAB_DIRECTION_PHRASES),
}


# "an 8", "an eight", "an orange 3" but "a one".
_AN = re.compile(r"\ba (?=(?!one\b)[aeiou8])")


def _digit_phrase(form: int, digit: int, colour: str | None, phrases=DIGIT_PHRASES) -> str:
    c = f"{colour} " if colour else ""
    return phrases[form].format(n=digit, w=DIGIT_WORDS[digit], c=c)


def make_caption(
    template: str,
    digit: int,
    direction: int,
    *,
    digit_form: int,
    verb: int,
    direction_form: int,
    colour: str | None = None,
    vocabulary: str = "train",
) -> str:
    """Fills one sentence template.

    Args:
      template: an entry of TRAIN_TEMPLATES or HELDOUT_TEMPLATES.
      digit: 0..9.
      direction: index into DIRECTIONS.
      digit_form: index into DIGIT_PHRASES.
      verb: index into VERBS.
      direction_form: index into DIRECTION_PHRASES[direction] (taken modulo its length).
      colour: a colour name to mention, or None.
      vocabulary: "train" (DIGIT_PHRASES, VERBS, DIRECTION_PHRASES) or "heldout" (the VOCAB_*
        lists no training caption uses); `digit_form` and `verb` index that vocabulary's lists.

    Returns:
      The caption, lower case, with "a"/"an" fixed ("an 8", "an orange 3").
    """
    digit_phrases, verbs, directions = VOCABULARIES[vocabulary]
    d = _digit_phrase(digit_form, digit, colour, digit_phrases)
    phrases = directions[direction]
    ving, vs = verbs[verb]
    text = template.format(d=d, ving=ving, vs=vs, dir=phrases[direction_form % len(phrases)])
    return _AN.sub("an ", text)


def sample_captions(
    rng: np.random.Generator,
    digits: np.ndarray,
    directions: np.ndarray,
    templates: tuple[str, ...],
    colours: list[str | None] | None = None,
    vocabulary: str = "train",
) -> tuple[list[str], np.ndarray]:
    """One caption per example with template and synonyms drawn uniformly from `rng`.

    Args:
      rng: numpy generator (all draws are vectorized, so the result depends only on its state).
      digits: int [N] digit labels.
      directions: int [N] direction indices.
      templates: the template set (TRAIN_TEMPLATES or HELDOUT_TEMPLATES).
      colours: N colour names to mention (None entries mention no colour), or None.
      vocabulary: "train", or "heldout" for the VOCAB_* lists (with VOCAB_TEMPLATES).

    Returns:
      (captions, template_index [N]).
    """
    n = len(digits)
    digit_phrases, verbs, _ = VOCABULARIES[vocabulary]
    tmpl = rng.integers(0, len(templates), n)
    form = rng.integers(0, len(digit_phrases), n)
    verb = rng.integers(0, len(verbs), n)
    dform = rng.integers(0, 1 << 16, n)  # reduced modulo each direction's phrase count
    captions = [
        make_caption(
            templates[tmpl[i]],
            int(digits[i]),
            int(directions[i]),
            digit_form=int(form[i]),
            verb=int(verb[i]),
            direction_form=int(dform[i]),
            colour=None if colours is None else colours[i],
            vocabulary=vocabulary,
        )
        for i in range(n)
    ]
    return captions, tmpl


def heldout_vocabulary_captions(
    digits: np.ndarray, directions: np.ndarray, colours: list[str | None] | None = None
) -> list[str]:
    """Test captions in the held-out vocabulary (VOCAB_TEMPLATES and the VOCAB_* lists), one per
    example, drawn from a fixed generator: the same labels always get the same captions."""
    rng = np.random.default_rng(20261203)
    return sample_captions(rng, digits, directions, VOCAB_TEMPLATES, colours, "heldout")[0]


def _phrase_regex(phrases) -> re.Pattern:
    alternatives = sorted({re.escape(p) for p in phrases}, key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(alternatives) + r")\b")


_DIRECTION_LOOKUP = {p: i for i, ps in enumerate(DIRECTION_PHRASES) for p in ps}
# Extra spellings users type in prompts (not used to generate captions).
_DIRECTION_LOOKUP.update(
    {
        "up-right": 1,
        "upper right": 1,
        "top right": 1,
        "up-left": 3,
        "upper left": 3,
        "top left": 3,
        "down-left": 5,
        "lower left": 5,
        "bottom left": 5,
        "down-right": 7,
        "lower right": 7,
        "bottom right": 7,
        "downward and right": 7,
        "upward and right": 1,
        "upward and left": 3,
        "downward and left": 5,
    }
)
_DIRECTION_RE = _phrase_regex(_DIRECTION_LOOKUP)
_DIGIT_RE = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r"|[0-9])\b")


def parse_caption(text: str) -> dict[str, int | None]:
    """Reads the digit and direction a caption or prompt asks for.

    The longest direction phrase wins, so "up and to the right" is up_right, not up. Used by the
    tests to check generated captions, and usable by evaluation to label free-form prompts.

    Args:
      text: any caption, e.g. "a handwritten three drifting up and to the right".

    Returns:
      {"digit": 0..9 or None, "direction": index into DIRECTIONS or None}.
    """
    low = text.lower()
    digit = None
    m = _DIGIT_RE.search(low)
    if m:
        token = m.group(1)
        digit = int(token) if token.isdigit() else DIGIT_WORDS.index(token)
    direction = None
    matches = list(_DIRECTION_RE.finditer(low))
    if matches:
        best = max(matches, key=lambda x: len(x.group(1)))
        direction = _DIRECTION_LOOKUP[best.group(1)]
    return {"digit": digit, "direction": direction}
