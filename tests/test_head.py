import pytest
import torch

from ptame.head import AttentionHead, minmax_normalize, upsample_to


def features(batch: int = 2) -> list[torch.Tensor]:
    return [torch.randn(batch, 8, 16, 16), torch.randn(batch, 12, 8, 8), torch.randn(batch, 16, 2, 2)]


def test_all_maps_equal_the_fuser_convolution() -> None:
    head = AttentionHead([8, 12, 16], num_classes=10).eval()
    feats = features()
    full = head(feats)
    assert full.shape == (2, 10, 16, 16)
    torch.testing.assert_close(full, head.fuser(head.fuse_input(feats)))


def test_gathered_classes_equal_the_full_maps() -> None:
    head = AttentionHead([8, 12, 16], num_classes=10).eval()
    feats = features(3)
    full = head(feats)
    shared = torch.tensor([7, 2])
    torch.testing.assert_close(head(feats, shared), full[:, [7, 2]])
    per_image = torch.tensor([[1, 3], [9, 0], [4, 4]])
    torch.testing.assert_close(head(feats, per_image), torch.stack([full[i, per_image[i]] for i in range(3)]))


def test_stage_block_is_relu_of_bn_conv_plus_skip() -> None:
    head = AttentionHead([4], num_classes=2).eval()
    x = torch.randn(1, 4, 3, 3)
    block = head.stages[0]
    expected = torch.relu(block.bn(block.conv(x)) + x)
    torch.testing.assert_close(block(x), expected)
    assert head.fuser.bias is None


def test_upsampling_reaches_the_finest_map_by_doublings() -> None:
    assert upsample_to(torch.zeros(1, 1, 7, 7), (56, 56)).shape[-2:] == (56, 56)
    assert upsample_to(torch.zeros(1, 1, 9, 9), (65, 65)).shape[-2:] == (65, 65)
    # a constant map stays constant through bilinear steps
    torch.testing.assert_close(upsample_to(torch.full((1, 1, 2, 2), 3.0), (16, 16)), torch.full((1, 1, 16, 16), 3.0))


def test_minmax_normalises_each_map() -> None:
    maps = torch.tensor([[[[1.0, 3.0], [2.0, 5.0]], [[4.0, 4.0], [4.0, 4.0]]]])
    out = minmax_normalize(maps)
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    torch.testing.assert_close(out[0, 1], torch.zeros(2, 2))


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="channels"):
        AttentionHead([], 3)
    with pytest.raises(ValueError, match="num_classes"):
        AttentionHead([4], 0)
    head = AttentionHead([8, 12, 16], num_classes=10)
    with pytest.raises(ValueError, match="feature maps"):
        head(features()[:2])
    with pytest.raises(ValueError, match="classes"):
        head(features(2), torch.zeros(3, 1, 1, dtype=torch.long))
