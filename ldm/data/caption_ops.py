"""Caption processing at training time (pure): tag shuffle, kept tags, tag dropout.

In kohya's order (sd-scripts `process_caption`), for each sample:
1. whole-caption dropout: with probability `conditional_dropout` the caption becomes ""
   and nothing below happens (the dataset draws this; see `training_caption`);
2. the caption is split on "," into tags, each stripped, empty ones dropped;
   the first `keep_tokens` tags are fixed, or, when the caption holds
   `keep_tokens_separator`, the tags before it are fixed (and those after a second
   separator are fixed at the end);
3. `shuffle_tags`: the other tags are shuffled;
4. `tag_dropout`: each of the other tags is dropped with that probability;
5. the tags are joined again with ", ".

Steps 2-5 run only when shuffling or tag dropout is on, or the caption holds the
separator (which is then always removed, so it never reaches the text encoder; kohya
leaves it in the text when neither option is on). A caption with no "," is one tag.
Every draw comes from the `rng` passed in, which the dataset seeds from the sample's seed,
so a sample's caption is the same however the epoch is loaded or resumed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

JOIN = ", "


@dataclass(frozen=True)
class CaptionOptions:
    shuffle_tags: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    tag_dropout: float = 0.0

    def __post_init__(self):
        if not isinstance(self.shuffle_tags, bool):
            raise ValueError(f"shuffle_tags: expected true or false, got {self.shuffle_tags!r}")
        if not isinstance(self.keep_tokens, int) or isinstance(self.keep_tokens, bool) or self.keep_tokens < 0:
            raise ValueError(f"keep_tokens: expected a whole number of tags >= 0, got {self.keep_tokens!r}")
        if not isinstance(self.keep_tokens_separator, str) or "," in self.keep_tokens_separator:
            raise ValueError(f"keep_tokens_separator: expected a text without \",\" (such as \"|||\"), "
                             f"got {self.keep_tokens_separator!r}")
        if not 0.0 <= self.tag_dropout <= 1.0:
            raise ValueError(f"tag_dropout: expected a probability in [0, 1], got {self.tag_dropout}")

    @property
    def random(self) -> bool:
        """Whether the options draw anything (shuffle or tag dropout)."""
        return self.shuffle_tags or self.tag_dropout > 0


def _tags(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def split_tags(caption: str, keep_tokens: int = 0, separator: str = "") -> tuple[list[str], list[str], list[str]]:
    """(fixed in front, free, fixed at the end) tags of `caption` (step 2 of the module notes)."""
    if separator and separator in caption:
        front, rest = caption.split(separator, 1)
        free, _, end = rest.partition(separator)
        return _tags(front), _tags(free), _tags(end.replace(separator, ","))
    tags = _tags(caption)
    return tags[:keep_tokens], tags[keep_tokens:], []


def process_tags(caption: str, options: CaptionOptions, rng: random.Random | None) -> str:
    """Steps 2-5 of the module notes. `rng` may be None when `options.random` is false."""
    separated = bool(options.keep_tokens_separator) and options.keep_tokens_separator in caption
    if not options.random and not separated:
        return caption
    fixed, free, end = split_tags(caption, options.keep_tokens, options.keep_tokens_separator)
    if options.shuffle_tags:
        rng.shuffle(free)
    if options.tag_dropout > 0:
        free = [t for t in free if rng.random() >= options.tag_dropout]
    return JOIN.join(fixed + free + end)


def training_caption(caption: str, drop: bool, options: CaptionOptions, rng: random.Random | None) -> str:
    """The caption a sample trains with: "" when dropped (step 1), else `process_tags`."""
    return "" if drop else process_tags(caption, options, rng)
