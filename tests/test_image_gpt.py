"""The image GPT family's input checks and the shared token sampler's edge cases."""

import numpy as np
import pytest
import torch

from trainer.families.image_gpt import ImageGPTConfig, ImageGPTFamily
from trainer.sampling import filter_logits, sample_logits
from trainer.transformer import TransformerConfig


def family(**config) -> ImageGPTFamily:
    cfg = ImageGPTConfig(transformer=TransformerConfig(n_layer=1, n_head=2, d_model=16), **config)
    return ImageGPTFamily(cfg, {"image_shape": [8, 8, 1]})


def sample(label=3, shape=(8, 8, 1), key="digits-0007") -> dict:
    out = {"image": np.zeros(shape, np.uint8), "key": key}
    if label is not None:
        out["label"] = label
    return out


@pytest.mark.parametrize("label", [None, 10, -1])
def test_a_class_conditional_batch_needs_a_label_of_one_of_its_classes(label):
    """A missing label used to train the unconditional start token, leaving the class rows sampling draws from
    untrained; label 10 (= num_classes) was taken for unconditional, -1 failed later in the embedding."""
    with pytest.raises(ValueError, match=rf"sample digits-0007: label {label!r}, .* needs one in 0\.\.9"):
        family().collate([sample(), sample(label=label)])
    batch = family(class_conditional=False).collate([sample(label=label)])
    assert batch["start"].tolist() == [10]  # an unconditional model ignores labels
    assert family().collate([sample(label=4)])["start"].tolist() == [4]


def test_images_of_another_size_than_the_models_are_refused_by_name():
    """A held-out split prepared at another size used to score a plausible, meaningless loss."""
    with pytest.raises(ValueError, match=r"sample digits-0007: image of shape \(4, 4, 1\), this model reads 8x8x1"):
        family().collate([sample(shape=(4, 4, 1))])


def test_a_class_conditional_model_needs_classes():
    with pytest.raises(ValueError, match="model.num_classes must be >= 1 for a class-conditional model"):
        ImageGPTConfig(num_classes=0)
    with pytest.raises(ValueError, match="model.num_classes"):
        ImageGPTConfig(num_classes=-1, class_conditional=False)
    ImageGPTConfig(num_classes=0, class_conditional=False)


def test_labels_for_sampling_are_one_per_sample():
    fam = family()
    model = fam.build_modules()["model"]
    with pytest.raises(ValueError, match=r"labels \[1, 2\]: one label per sample, 5 samples"):
        fam.sample_images({"model": model}, 5, torch.Generator().manual_seed(0), labels=[1, 2])
    assert fam.sample_images({"model": model}, 2, torch.Generator().manual_seed(0), labels=[1, 2]).shape == (2, 1, 8, 8)


def test_top_k_keeps_exactly_k_even_with_ties():
    """A threshold on the k-th value kept every tied logit: top_k=1 was not greedy on bf16 ties."""
    logits = torch.tensor([[5.0, 5.0, 1.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=1))
    assert kept.sum().item() == 1
    draws = {int(sample_logits(logits, 1.0, top_k=1, generator=torch.Generator().manual_seed(s))) for s in range(20)}
    assert len(draws) == 1
    assert torch.isfinite(filter_logits(logits, top_k=2)).sum().item() == 2


def test_top_p_keeps_the_smallest_set_holding_that_mass_even_with_ties():
    """Four equal logits at top_p=0.5: two hold the mass; the third was kept as well."""
    logits = torch.zeros(1, 4)
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).sum().item() == 2
    assert torch.isfinite(filter_logits(logits, top_p=0.51)).sum().item() == 3
    assert torch.isfinite(filter_logits(torch.tensor([[9.0, 0.0, 0.0]]), top_p=0.01)).sum().item() == 1  # top kept
    assert torch.isfinite(filter_logits(logits, top_p=1.0)).all()


@pytest.mark.parametrize("settings, said", [
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"), (dict(top_p=float("nan")), "top_p must be in"),
    (dict(top_p=1.5), "top_p must be in"), (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(temperature=float("inf")), "temperature must be"), (dict(temperature=float("nan")), "temperature must be"),
    (dict(top_k=-2), "top_k must be an integer >= 0"), (dict(top_k=1.5), "top_k must be an integer")])
def test_draw_settings_the_draw_cannot_honour_are_refused_by_name(settings, said):
    """The Python API took them: top_p 0 and a NaN or infinite temperature died in torch.multinomial ("probability
    tensor contains either inf, nan or element < 0"), a negative temperature drew greedily without a word."""
    from trainer.dct.sampling import DrawSettings

    with pytest.raises(ValueError, match=said):
        sample_logits(torch.zeros(1, 3), **{"temperature": 1.0, **settings})
    with pytest.raises(ValueError, match=said):
        DrawSettings(**settings)
    if "top_k" not in settings:  # the value decoder's own settings are named as such
        with pytest.raises(ValueError, match=f"value_{said}"):
            DrawSettings(**{f"value_{k}": v for k, v in settings.items()})


def test_a_model_giving_nan_logits_is_named_not_a_torch_error():
    """A diverged run's export died in torch.multinomial with a traceback; -inf (a masked token) stays valid."""
    with pytest.raises(ValueError, match=r"the model gives non-finite outputs \(NaN or \+inf logits\)"):
        sample_logits(torch.tensor([[0.0, float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="non-finite outputs"):
        sample_logits(torch.tensor([[0.0, float("inf")]]), temperature=0.0)
    assert int(sample_logits(torch.tensor([[float("-inf"), 2.0]]))) == 1


def test_a_tiny_temperature_is_greedy_not_nan():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    assert int(sample_logits(logits, 1e-40, generator=torch.Generator().manual_seed(0))) == 1


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_draws_follow_the_softmax_of_the_logits_over_the_temperature(temperature):
    """Tests drew at temperature 0, 1e-40 or 1 only: ignoring the temperature passed them all."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(20000, 4)
    draws = sample_logits(logits, temperature, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws.flatten(), minlength=4).float() / draws.numel()
    want = torch.softmax(logits[0] / temperature, dim=-1)
    assert torch.allclose(freq, want, atol=0.015), (freq, want)
