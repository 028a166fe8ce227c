import io

import numpy as np
import pytest
import torch
from PIL import Image

from ptame.data import ImageDecodeError, decode_image, preprocess
from ptame.models import Preprocessing


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def test_modes_become_rgb() -> None:
    grey = Image.fromarray(np.full((10, 12), 128, np.uint8), "L")
    assert decode_image(encode(grey)).getpixel((0, 0)) == (128, 128, 128)
    rgba = Image.new("RGBA", (5, 5), (255, 0, 0, 0))  # fully transparent red over white
    assert decode_image(encode(rgba)).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("RGB", (6, 6), (0, 0, 255)).convert("P")
    assert decode_image(encode(palette)).getpixel((0, 0)) == (0, 0, 255)
    cmyk = Image.new("CMYK", (6, 6), (0, 255, 255, 0))
    r, g, b = decode_image(encode(cmyk, "JPEG")).getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60
    sixteen = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert decode_image(encode(sixteen)).getpixel((0, 0)) == (255, 255, 255)
    assert decode_image(encode(Image.new("RGB", (1, 1), (9, 9, 9)))).size == (1, 1)


def test_exif_rotation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    assert decode_image(encode(image, "JPEG", exif=exif.tobytes())).size == (20, 40)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", "empty"),
        (b"hello, I am text", "not a recognised image"),
    ],
)
def test_unreadable_bytes_raise_decode_error(payload: bytes, match: str) -> None:
    with pytest.raises(ImageDecodeError, match=match):
        decode_image(payload)


def test_truncated_and_bomb_images_are_refused() -> None:
    jpeg = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(jpeg[: len(jpeg) // 2])
    big = encode(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(ImageDecodeError, match="over the limit"):
        decode_image(big, max_pixels=1_000_000)


def test_preprocess_resizes_crops_and_reports_the_box() -> None:
    image = Image.new("RGB", (400, 200), (255, 0, 0))
    tensor, box = preprocess(image, Preprocessing(input_size=100, resize=120))
    assert tensor.shape == (3, 100, 100)
    assert float(tensor.min()) >= 0 and float(tensor.max()) <= 1
    torch.testing.assert_close(tensor[0], torch.ones(100, 100))
    # shorter side 200 -> 120 (scale 0.6): the 100 px crop covers 166.7 px of the original
    assert box == (117, 17, 283, 183)


def test_slivers_are_cut_before_resizing() -> None:
    sliver = Image.new("RGB", (60000, 1), (0, 0, 255))
    tensor, box = preprocess(sliver, Preprocessing(input_size=64, resize=73))
    assert tensor.shape == (3, 64, 64)
    assert box[1] == 0 and box[3] == 1 and 0 < box[2] - box[0] <= 2
    assert abs((box[0] + box[2]) / 2 - 30000) <= 1


def test_full_view_letterboxes_the_whole_image_padded_with_the_mean() -> None:
    from ptame.data import letterbox_box

    prep = Preprocessing(input_size=100, resize=120, mean=(0.2, 0.4, 0.6))
    image = Image.new("RGB", (400, 200), (255, 0, 0))
    tensor, box = preprocess(image, prep, view="full")
    assert tensor.shape == (3, 100, 100) and box == (0, 0, 400, 200)  # the map covers the whole image
    assert letterbox_box(400, 200, 100) == (0, 25, 100, 75)  # longer side to 100, aspect kept, centred
    torch.testing.assert_close(tensor[:, 25:75], torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1).expand(3, 50, 100))
    pad = torch.cat([tensor[:, :25], tensor[:, 75:]], 1)
    torch.testing.assert_close(pad, torch.tensor(prep.mean).view(3, 1, 1).expand_as(pad))  # zero once normalised
    assert letterbox_box(50, 100, 100) == (25, 0, 75, 100)
    assert letterbox_box(60000, 1, 64) == (0, 31, 64, 32)  # a sliver keeps one row
    tensor, box = preprocess(Image.new("RGB", (60000, 1), (0, 0, 255)), Preprocessing(input_size=64, resize=73), view="full")
    assert tensor.shape == (3, 64, 64) and box == (0, 0, 60000, 1) and float(tensor[2, 31].min()) > 0.99
    with pytest.raises(ValueError, match=r"view must be one of \['crop', 'full'\], got 'wide'"):
        preprocess(image, prep, view="wide")
