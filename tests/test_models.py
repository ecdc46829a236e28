import pytest
import torch

from common.errors import ConfigError
from common.models import build_model, list_models

EMBED_DIMS_32 = {"convnet3": 2048, "resnet10": 512, "resnet18": 512, "alexnet": 3072, "vgg11": 512}


def test_registry_lists_the_card_models():
    assert set(EMBED_DIMS_32) <= set(list_models())


@pytest.mark.parametrize("name", sorted(EMBED_DIMS_32))
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_forward_embedding_and_features(name, channels, size):
    torch.manual_seed(0)
    model = build_model(name, channels, 10, size).eval()
    x = torch.randn(3, channels, size, size)
    logits, emb = model(x), model.embed(x)
    assert logits.shape == (3, 10)
    assert emb.shape == (3, EMBED_DIMS_32[name]) == (3, model.embed_dim)
    assert torch.allclose(model.forward_head(emb), logits, atol=1e-5)
    for layer in model.stage_names:
        feat = model.features(x, layer)
        assert feat.ndim == 4 and feat.shape[0] == 3
    mid, logits2 = model.features_and_logits(x, model.stage_names[1])
    assert torch.allclose(logits2, logits, atol=1e-5)
    assert torch.allclose(mid, model.features(x, model.stage_names[1]))


def test_convnet_embedding_is_2048_at_28x28_and_options_change_the_net():
    assert build_model("convnet3", 1, 10, 28).embed_dim == 2048  # 28 is padded to 32
    assert build_model("convnet3", 1, 10, 28, fit="floor").embed_dim == 128 * 3 * 3  # 28 -> 14 -> 7 -> 3
    small = build_model("convnet3", 1, 10, 8)
    assert small.embed_dim == 128
    deeper = build_model("convnet3", 3, 10, 32, depth=4, width=64, norm="batchnorm")
    assert deeper.embed_dim == 64 * 2 * 2 and len(deeper.stage_names) == 4


def test_bad_model_requests_are_config_errors():
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("resnet9000", 3, 10, 32)
    with pytest.raises(ConfigError, match="no layer"):
        build_model("convnet3", 3, 10, 32).features(torch.zeros(1, 3, 32, 32), "layer9")
    with pytest.raises(ConfigError, match="norm"):
        build_model("convnet3", 3, 10, 32, norm="fancy")


@pytest.mark.parametrize("size", [28, 14, 7, 3])
def test_convnet_pooling_fast_path_equals_avg_pool_in_every_layout_and_with_autograd(size):
    from common.models import AvgPool2x2

    pool, x = AvgPool2x2(), torch.randn(3, 4, size, size)
    expected = torch.nn.functional.avg_pool2d(x, 2)  # floors odd sides: 7 -> 3
    with torch.no_grad():
        assert torch.allclose(pool(x), expected, atol=1e-6)  # the strided-add path
        assert torch.allclose(pool(x.contiguous(memory_format=torch.channels_last)), expected, atol=1e-6)
    leaf = x.clone().requires_grad_(True)
    pool(leaf).sum().backward()
    ones = torch.zeros_like(x)
    ones[..., : size // 2 * 2, : size // 2 * 2] = 0.25
    assert torch.equal(leaf.grad, ones)
