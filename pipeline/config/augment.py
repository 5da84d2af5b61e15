"""Stage 2's augmentation: a typed list of image transforms in the train config, applied in order
to each training batch (never to evaluation), drawn per step from the run's seed."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from pipeline.config.base import Strict


class RandomResizedCrop(Strict):
    """A box of `scale` of the image's area and `ratio` aspect, resized back to the input size."""

    kind: Literal["random_resized_crop"] = "random_resized_crop"
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    @model_validator(mode="after")
    def _ranges(self) -> "RandomResizedCrop":
        if not (0 < self.scale[0] <= self.scale[1] <= 1) or not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError("`scale` needs 0 < min <= max <= 1 and `ratio` 0 < min <= max")
        return self


class Flip(Strict):
    """A horizontal mirror with probability p."""

    kind: Literal["flip"] = "flip"
    p: float = Field(0.5, ge=0, le=1)


class Shift(Strict):
    """A translation by up to `pixels` in each direction, zeros shifted in."""

    kind: Literal["shift"] = "shift"
    pixels: int = Field(2, ge=1)


class Mixup(Strict):
    """Zhang et al. (2018): lam x_i + (1 - lam) x_j with lam ~ Beta(alpha, alpha); targets mixed alike."""

    kind: Literal["mixup"] = "mixup"
    alpha: float = Field(0.2, gt=0)


class CutMix(Strict):
    """Yun et al. (2019): a box of image j pasted into image i; targets mixed by the box's area."""

    kind: Literal["cutmix"] = "cutmix"
    alpha: float = Field(1.0, gt=0)


Augment = Annotated[Union[RandomResizedCrop, Flip, Shift, Mixup, CutMix], Field(discriminator="kind")]
MIXING = ("mixup", "cutmix")
