"""The registry of model families: adding one is a new module plus one line here."""

from __future__ import annotations

from trainer.families.base import Family
from trainer.families.contrastive import ContrastiveFamily
from trainer.families.dalle import DalleFamily
from trainer.families.dctransformer import DCTransformerFamily
from trainer.families.dvae import DVAEFamily
from trainer.families.image_gpt import ImageGPTFamily
from trainer.families.slsa_gan import SLSAGanFamily

FAMILIES: dict[str, type[Family]] = {
    ContrastiveFamily.name: ContrastiveFamily,
    DalleFamily.name: DalleFamily,
    DCTransformerFamily.name: DCTransformerFamily,
    DVAEFamily.name: DVAEFamily,
    ImageGPTFamily.name: ImageGPTFamily,
    SLSAGanFamily.name: SLSAGanFamily,
}


def family_class(name: str) -> type[Family]:
    if name not in FAMILIES:
        raise ValueError(f"family: unknown family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]
