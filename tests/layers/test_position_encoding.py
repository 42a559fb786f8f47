import math

import pytest
import torch

from codetr.layers import SinePositionEmbedding, box_sine_embedding


def _encode(value, num_pos_feats, temperature):
    """Hand formula for one coordinate: sin / cos pairs with wavelengths T^(2k/F)."""
    out = []
    for k in range(num_pos_feats // 2):
        angle = value / temperature ** (2 * k / num_pos_feats)
        out += [math.sin(angle), math.cos(angle)]
    return out


def test_sine_embedding_unnormalised_hand_values():
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    pos = SinePositionEmbedding(num_pos_feats=4)(mask)
    assert pos.shape == (1, 8, 2, 3)
    assert pos.dtype == torch.float32
    for row in range(2):
        for col in range(3):
            # y channels first, then x; positions are 1-based counts of valid pixels
            expected = _encode(row + 1, 4, 10000) + _encode(col + 1, 4, 10000)
            torch.testing.assert_close(pos[0, :, row, col], torch.tensor(expected))
    # the wavelengths of channel pairs: (1, 1), (100, 100) for T=10000, F=4
    torch.testing.assert_close(pos[0, 6, 0, 2], torch.tensor(math.sin(3 / 100)))
    torch.testing.assert_close(pos[0, 7, 0, 2], torch.tensor(math.cos(3 / 100)))


def test_sine_embedding_normalised_with_padding_and_offset():
    # image 0: last column and last row padded; image 1: no padding
    mask = torch.zeros(2, 3, 3, dtype=torch.bool)
    mask[0, :, 2] = True
    mask[0, 2, :] = True
    eps, offset, temperature = 1e-6, -0.5, 20.0
    module = SinePositionEmbedding(
        num_pos_feats=4, temperature=temperature, normalize=True, offset=offset
    )
    pos = module(mask)
    assert pos.shape == (2, 8, 3, 3)
    # image 0, valid pixel (row 1, col 1): y count 2 of 2 valid rows, x count 2 of 2 columns
    y = (2 + offset) / (2 + eps) * 2 * math.pi
    x = (2 + offset) / (2 + eps) * 2 * math.pi
    expected = _encode(y, 4, temperature) + _encode(x, 4, temperature)
    torch.testing.assert_close(pos[0, :, 1, 1], torch.tensor(expected))
    # image 0, padded pixel (row 0, col 2): the x count stays 2 (cumulative count of valid
    # pixels); its y part divides by the eps of an all-padding column and is not checked
    x = (2 + offset) / (2 + eps) * 2 * math.pi
    torch.testing.assert_close(pos[0, 4:, 0, 2], torch.tensor(_encode(x, 4, temperature)))
    # image 1, pixel (row 2, col 0): y 3 of 3, x 1 of 3
    y = (3 + offset) / (3 + eps) * 2 * math.pi
    x = (1 + offset) / (3 + eps) * 2 * math.pi
    expected = _encode(y, 4, temperature) + _encode(x, 4, temperature)
    torch.testing.assert_close(pos[1, :, 2, 0], torch.tensor(expected))


def test_sine_embedding_odd_feats_raises():
    with pytest.raises(ValueError, match="num_pos_feats"):
        SinePositionEmbedding(num_pos_feats=3)


def test_sine_embedding_bad_mask_raises():
    with pytest.raises(ValueError, match="mask"):
        SinePositionEmbedding(num_pos_feats=4)(torch.zeros(2, 3, dtype=torch.bool))


def test_box_sine_embedding_yx_first_4d():
    coords = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]])
    out = box_sine_embedding(coords, num_pos_feats=4, temperature=20.0, yx_first=True)
    assert out.shape == (1, 1, 16)
    x, y, w, h = (2 * math.pi * c for c in (0.1, 0.2, 0.3, 0.4))
    expected = sum((_encode(v, 4, 20.0) for v in (y, x, w, h)), [])
    torch.testing.assert_close(out[0, 0], torch.tensor(expected))


def test_box_sine_embedding_xy_order_2d_and_4d():
    coords = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.9, 0.05, 0.5, 0.25]])
    out4 = box_sine_embedding(coords, num_pos_feats=6, yx_first=False)
    out2 = box_sine_embedding(coords[:, :2], num_pos_feats=6, yx_first=False)
    out2_yx = box_sine_embedding(coords[:, :2], num_pos_feats=6, yx_first=True)
    assert out4.shape == (2, 24) and out2.shape == (2, 12)
    for i in range(2):
        per_coord = [_encode(2 * math.pi * float(c), 6, 10000) for c in coords[i]]
        torch.testing.assert_close(out4[i], torch.tensor(sum(per_coord, [])))
        torch.testing.assert_close(out2[i], torch.tensor(per_coord[0] + per_coord[1]))
        torch.testing.assert_close(out2_yx[i], torch.tensor(per_coord[1] + per_coord[0]))


def test_box_sine_embedding_bad_input_raises():
    with pytest.raises(ValueError, match="last dimension"):
        box_sine_embedding(torch.zeros(2, 3), num_pos_feats=4, yx_first=True)
    with pytest.raises(ValueError, match="num_pos_feats"):
        box_sine_embedding(torch.zeros(2, 4), num_pos_feats=5, yx_first=True)
