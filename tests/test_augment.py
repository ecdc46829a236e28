import pytest
import torch

from common.augment import DSA, FAMILIES, strategy_for_dataset


@pytest.mark.parametrize("family", FAMILIES)
def test_siamese_params_apply_the_same_transform_to_two_batches(family):
    dsa = DSA(family)
    g = torch.Generator().manual_seed(3)
    real = torch.randn(16, 3, 32, 32)
    syn = torch.cat([real[:4].clone(), torch.randn(2, 3, 32, 32)])
    params = dsa.sample(1, 32, g)
    out_real, out_syn = dsa.apply(real, params), dsa.apply(syn, params)
    assert out_real.shape == real.shape and out_syn.shape == syn.shape
    # the images the two batches share are transformed identically
    assert torch.allclose(out_real[:4], out_syn[:4], atol=1e-6)
    assert not torch.allclose(out_real, real)


def test_per_sample_params_differ_and_are_reproducible():
    dsa = DSA("rotate")
    x = torch.ones(8, 1, 16, 16)
    x[:, :, :, :8] = -1
    a = dsa(x, torch.Generator().manual_seed(0))
    b = dsa(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])


def test_dsa_is_differentiable_and_changes_images():
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    for family in FAMILIES:
        y = DSA(family)(x, torch.Generator().manual_seed(1), siamese=True)
        (grad,) = torch.autograd.grad(y.square().sum(), x)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_crop_is_an_exact_integer_translation_with_zero_fill():
    dsa = DSA("crop")
    x = torch.arange(64.0).view(1, 1, 8, 8)
    from common.augment import AugParams

    out = dsa.apply(x, AugParams("crop", {"dx": torch.tensor([1]), "dy": torch.tensor([0])}))
    assert torch.equal(out[0, 0, :, :7], x[0, 0, :, 1:]) and out[0, 0, :, 7].abs().sum() == 0


def test_flip_is_dropped_for_digits():
    assert "flip" not in strategy_for_dataset("mnist").split("_")
    assert "flip" in strategy_for_dataset("cifar10").split("_")


def test_composed_augment_with_nothing_to_do_is_the_identity_and_each_part_does_its_job():
    from common.augment import ComposedAugment

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 16, 16)
    assert torch.allclose(ComposedAugment(0, 0, 0, 0)(x, g), x, atol=1e-6)
    assert torch.allclose(ComposedAugment(0, 0, 1.0, 0)(x, g), x.flip(3), atol=1e-6)  # always flip
    shifted = ComposedAugment(0.25, 0, 0, 0)(torch.ones(64, 1, 16, 16), g)
    # zero fill: a shift leaves some border pixels empty, and never more than a quarter of a side
    assert bool((shifted.flatten(1).min(1).values < 0.5).any())
    assert float(shifted[:, :, 4:12, 4:12].min()) > 0.99
    noisy = ComposedAugment(0, 0, 0, 0.1)(x, g)
    assert 0.08 < float((noisy - x).std()) < 0.12
    a = ComposedAugment()(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, ComposedAugment()(x, torch.Generator().manual_seed(5)))  # seeded
    assert ComposedAugment().for_dataset("mnist").flip == 0.0 and ComposedAugment().for_dataset("cifar10").flip == 0.5
