import math
from unittest import mock

import pytest
import torch
from torch import nn

from codetr.layers import MLP, check_level_shapes, inverse_sigmoid, ms_deform_attn
from codetr.modeling.transformer import multi_level
from codetr.modeling.transformer import (
    DeformableDecoder,
    DeformableEncoder,
    MultiLevelSequence,
    encoder_proposals,
    encoder_reference_points,
    flatten_levels,
    level_masks,
)

from ..host_reads import record_host_reads

CHANNELS = 16
SHAPES = ((4, 4), (2, 2))


def _sequence(batch_size=2, shapes=SHAPES, channels=CHANNELS, padded=None, seed=0):
    """
    Random maps flattened with their masks. ``padded``: per image (valid_h, valid_w) of the
    finest level, the coarser level masks follow by nearest resizing of an image mask.
    """
    generator = torch.Generator().manual_seed(seed)
    maps = [torch.randn(batch_size, channels, h, w, generator=generator) for h, w in shapes]
    height, width = shapes[0]
    image_mask = torch.zeros(batch_size, height, width, dtype=torch.bool)
    for index, (valid_h, valid_w) in enumerate(padded or []):
        image_mask[index, valid_h:, :] = True
        image_mask[index, :, valid_w:] = True
    return flatten_levels(maps, level_masks(image_mask, maps)), maps


def _dino_sine_embedding(boxes, num_feats):
    """The authors' DINO query-position sine embedding of (..., 4) cxcywh boxes, written out:
    temperature 10000, scale 2 pi, per coordinate interleaved sin / cos, order (y, x, w, h)."""
    dim_t = torch.arange(num_feats, dtype=torch.float32)
    dim_t = 10000 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    parts = []
    for coord in (1, 0, 2, 3):
        pos = boxes[..., coord, None] * (2 * math.pi) / dim_t
        parts.append(torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), -1).flatten(-2))
    return torch.cat(parts, -1)


# ------------------------------------------------------------------------------ multi_level
def test_flatten_levels_layout_and_round_trip():
    sequence, maps = _sequence(shapes=((3, 4), (2, 2)), channels=5)
    assert sequence.tokens.shape == (2, 16, 5)
    assert sequence.spatial_shapes.dtype == torch.long
    assert sequence.spatial_shapes.tolist() == [[3, 4], [2, 2]]
    # the same sizes as Python ints, from the maps' shapes
    assert sequence.level_shapes == ((3, 4), (2, 2))
    assert all(type(size) is int for shape in sequence.level_shapes for size in shape)
    assert sequence.level_start_index.dtype == torch.long
    assert sequence.level_start_index.tolist() == [0, 12]
    # row-major positions of each level, levels one after the other
    torch.testing.assert_close(sequence.tokens[1, 5], maps[0][1, :, 1, 1], rtol=0, atol=0)
    torch.testing.assert_close(sequence.tokens[0, 12 + 2], maps[1][0, :, 1, 0], rtol=0, atol=0)
    for restored, original in zip(sequence.to_maps(), maps):
        torch.testing.assert_close(restored, original, rtol=0, atol=0)
    assert sequence.padding_mask.shape == (2, 16) and not sequence.padding_mask.any()
    torch.testing.assert_close(sequence.valid_ratios, torch.ones(2, 2, 2))

    other = sequence.with_tokens(sequence.tokens * 2)
    assert other.spatial_shapes is sequence.spatial_shapes
    assert other.level_shapes == sequence.level_shapes
    assert other.padding_mask is sequence.padding_mask
    torch.testing.assert_close(other.to_maps()[1], maps[1] * 2)


def _inconsistent_layouts(sequence):
    """(what is wrong, the error message) of sequences that contradict their level shapes."""
    fields = vars(sequence)
    return [
        (
            MultiLevelSequence(**dict(fields, tokens=sequence.tokens[:, :-1])),
            r"S=19 positions but the level shapes \[\(4, 4\), \(2, 2\)\] sum to 20",
        ),
        (
            MultiLevelSequence(**dict(fields, level_shapes=((4, 4), (2, 1)))),
            r"S=20 positions but the level shapes \[\(4, 4\), \(2, 1\)\] sum to 18",
        ),
        (
            MultiLevelSequence(**dict(fields, level_start_index=torch.tensor([0]))),
            r"level_start_index must have shape \(2,\) .* got \(1,\)",
        ),
        (
            MultiLevelSequence(**dict(fields, padding_mask=sequence.padding_mask[:1])),
            r"padding_mask must have shape \(2, 20\) .* got \(1, 20\)",
        ),
        (
            MultiLevelSequence(**dict(fields, valid_ratios=sequence.valid_ratios[:, :1])),
            r"valid_ratios must have shape \(2, 2, 2\), got \(2, 1, 2\)",
        ),
        (
            MultiLevelSequence(**dict(fields, tokens=sequence.tokens[0])),
            r"tokens must have shape \(B, S, C\), got \(20, 16\)",
        ),
    ]


def test_flatten_levels_rejects_mismatched_masks():
    maps = [torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 1, 1)]
    with pytest.raises(ValueError, match="2 feature maps but 1 masks"):
        flatten_levels(maps, [torch.zeros(1, 2, 2, dtype=torch.bool)])


def test_level_masks_and_valid_ratios_of_a_padded_image():
    # batched input 8x8; image 1 has 6 valid rows and 4 valid columns
    padding = torch.zeros(2, 8, 8, dtype=torch.bool)
    padding[1, 6:, :] = True
    padding[1, :, 4:] = True
    maps = [torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 2, 2)]
    masks = level_masks(padding, maps)
    # nearest resizing samples input rows / columns 0, 2, 4, 6 (4x4) and 0, 4 (2x2)
    expected_fine = torch.tensor(
        [[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool
    )
    expected_coarse = torch.tensor([[0, 1], [0, 1]], dtype=torch.bool)
    assert torch.equal(masks[0][1], expected_fine)
    assert torch.equal(masks[1][1], expected_coarse)
    assert not masks[0][0].any() and not masks[1][0].any()

    sequence = flatten_levels(maps, masks)
    # (w, h) order
    expected = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.5, 0.75], [0.5, 1.0]]])
    torch.testing.assert_close(sequence.valid_ratios, expected)
    assert torch.equal(sequence.padding_mask[1, :16], expected_fine.flatten())
    assert torch.equal(sequence.padding_mask[1, 16:], expected_coarse.flatten())


def test_encoder_reference_points_two_level_hand_case():
    # image 0: level 0 half valid in width; image 1: no padding
    valid_ratios = torch.tensor([[[0.5, 1.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]])
    points = encoder_reference_points(((2, 2), (1, 2)), valid_ratios)
    assert points.shape == (2, 6, 2, 2)
    # token centre normalised by its own level's valid extent, then scaled by each level's
    # valid ratio: level 0 token (i, j) -> x = (j + .5) / (0.5 * 2), y = (i + .5) / 2
    expected_0 = torch.tensor(
        [
            [[0.25, 0.25], [0.5, 0.25]],
            [[0.75, 0.25], [1.5, 0.25]],
            [[0.25, 0.75], [0.5, 0.75]],
            [[0.75, 0.75], [1.5, 0.75]],
            [[0.125, 0.5], [0.25, 0.5]],
            [[0.375, 0.5], [0.75, 0.5]],
        ]
    )
    centres_1 = torch.tensor(
        [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75], [0.25, 0.5], [0.75, 0.5]]
    )
    torch.testing.assert_close(points[0], expected_0)
    torch.testing.assert_close(points[1], centres_1[:, None].expand(-1, 2, -1))


# ------------------------------------------------------------------------------ two_stage
def test_encoder_proposals_hand_case_with_padding():
    # level 0 is 2x2, level 1 is 1x1; image 1 has its right column of level 0 padded
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3) + 1
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, [1, 3]] = True
    memory = MultiLevelSequence(
        tokens=tokens,
        padding_mask=padding,
        spatial_shapes=torch.tensor([[2, 2], [1, 1]]),
        level_start_index=torch.tensor([0, 4]),
        valid_ratios=torch.ones(2, 2, 2),  # not used by the proposals
        level_shapes=((2, 2), (1, 1)),
    )
    out_tokens, proposals = encoder_proposals(memory)
    assert proposals.shape == (2, 5, 4)
    expected_0 = torch.tensor(
        [
            [0.25, 0.25, 0.05, 0.05],
            [0.75, 0.25, 0.05, 0.05],
            [0.25, 0.75, 0.05, 0.05],
            [0.75, 0.75, 0.05, 0.05],
            [0.5, 0.5, 0.1, 0.1],
        ]
    )
    torch.testing.assert_close(proposals[0].sigmoid(), expected_0)
    torch.testing.assert_close(
        proposals[0], torch.log(expected_0 / (1 - expected_0)), rtol=1e-5, atol=1e-5
    )
    # image 1: level 0 has 1 valid column, so centres are (j + .5) / 1 horizontally
    torch.testing.assert_close(proposals[1, 0].sigmoid(), torch.tensor([0.5, 0.25, 0.05, 0.05]))
    torch.testing.assert_close(proposals[1, 2].sigmoid(), torch.tensor([0.5, 0.75, 0.05, 0.05]))
    torch.testing.assert_close(proposals[1, 4].sigmoid(), torch.tensor([0.5, 0.5, 0.1, 0.1]))
    assert torch.isinf(proposals[1, [1, 3]]).all() and (proposals[1, [1, 3]] > 0).all()
    assert torch.isfinite(proposals[0]).all()

    assert (out_tokens[1, [1, 3]] == 0).all()
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[1, [1, 3]] = False
    torch.testing.assert_close(out_tokens[keep], tokens[keep], rtol=0, atol=0)


def test_encoder_proposals_outside_valid_range_without_padding():
    # six 1x1 levels: sizes 0.05 * 2^l, level 5 (1.6) is outside (0.01, 0.99)
    six_levels = MultiLevelSequence(
        tokens=torch.ones(1, 6, 2),
        padding_mask=torch.zeros(1, 6, dtype=torch.bool),
        spatial_shapes=torch.ones(6, 2, dtype=torch.long),
        level_start_index=torch.arange(6),
        valid_ratios=torch.ones(1, 6, 2),
        level_shapes=((1, 1),) * 6,
    )
    tokens, proposals = encoder_proposals(six_levels)
    sizes = proposals[0, :5, 2].sigmoid()
    torch.testing.assert_close(sizes, torch.tensor([0.05, 0.1, 0.2, 0.4, 0.8]))
    assert torch.isinf(proposals[0, 5]).all()
    assert (tokens[0, 5] == 0).all() and (tokens[0, :5] == 1).all()

    # one row of 60 cells: centres 0.5 / 60 and 59.5 / 60 fall outside (0.01, 0.99)
    row = MultiLevelSequence(
        tokens=torch.ones(1, 60, 2),
        padding_mask=torch.zeros(1, 60, dtype=torch.bool),
        spatial_shapes=torch.tensor([[1, 60]]),
        level_start_index=torch.tensor([0]),
        valid_ratios=torch.ones(1, 1, 2),
        level_shapes=((1, 60),),
    )
    tokens, proposals = encoder_proposals(row)
    invalid = torch.isinf(proposals[0]).all(-1)
    assert invalid.tolist() == [True] + [False] * 58 + [True]
    assert torch.isinf(proposals[0]).any(-1).tolist() == invalid.tolist()
    assert (tokens[0, invalid] == 0).all() and (tokens[0, ~invalid] == 1).all()
    torch.testing.assert_close(proposals[0, 1, 0].sigmoid(), torch.tensor(1.5 / 60))


# ------------------------------------------------------------------------------ decoder
def _decoder(seed=0, **kwargs):
    torch.manual_seed(seed)
    args = dict(
        num_layers=2, embed_dim=CHANNELS, num_heads=2, num_levels=2, num_points=2, ffn_dim=32
    )
    args.update(kwargs)
    decoder = DeformableDecoder(**args)
    box_heads = nn.ModuleList(
        MLP(input_dim=CHANNELS, hidden_dim=CHANNELS, output_dim=4, num_layers=3)
        for _ in range(args["num_layers"])
    )
    return decoder, box_heads


def _queries(batch_size=2, num_queries=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    content = torch.randn(batch_size, num_queries, CHANNELS, generator=generator)
    centres = torch.rand(batch_size, num_queries, 2, generator=generator) * 0.6 + 0.2
    sizes = torch.rand(batch_size, num_queries, 2, generator=generator) * 0.2 + 0.1
    return content, torch.cat([centres, sizes], -1)


def test_decoder_shapes_and_dino_refinement_math():
    memory, _ = _sequence(padded=[(4, 4), (3, 2)])
    decoder, box_heads = _decoder()
    # an output norm that is not the identity on the layers' (normalised) outputs
    with torch.no_grad():
        decoder.norm.weight.uniform_(0.5, 1.5)
        decoder.norm.bias.uniform_(-0.5, 0.5)
    content, reference = _queries()
    layer_inputs = []
    for layer in decoder.layers:
        layer.register_forward_hook(
            lambda module, args, output: layer_inputs.append((args, output))
        )
    hidden, boxes = decoder(content, reference, memory, box_heads)
    assert hidden.shape == (2, 2, 3, CHANNELS)
    assert boxes.shape == (2, 2, 3, 4)
    assert ((boxes > 0) & (boxes < 1)).all()

    valid_ratios = torch.cat([memory.valid_ratios, memory.valid_ratios], -1)[:, None]
    (args0, raw0), (args1, _) = layer_inputs
    # layer 0: reference boxes scaled by the valid ratios; position from the sine embedding
    torch.testing.assert_close(args0[2], reference[:, :, None] * valid_ratios)
    expected_pos = decoder.ref_point_head(_dino_sine_embedding(args0[2][:, :, 0], CHANNELS // 2))
    torch.testing.assert_close(args0[1], expected_pos)
    # the hidden state is the normalised layer output; its box refines the reference
    torch.testing.assert_close(hidden[0], decoder.norm(raw0))
    expected_box0 = (box_heads[0](hidden[0]) + inverse_sigmoid(reference, eps=1e-3)).sigmoid()
    torch.testing.assert_close(boxes[0], expected_box0)
    # the next reference refines with the un-normalised output (as the authors' decoder)
    refined = (box_heads[0](raw0) + inverse_sigmoid(reference, eps=1e-3)).sigmoid()
    torch.testing.assert_close(args1[2], refined[:, :, None] * valid_ratios)
    expected_box1 = (box_heads[1](hidden[1]) + inverse_sigmoid(refined, eps=1e-3)).sigmoid()
    torch.testing.assert_close(boxes[1], expected_box1)


@pytest.mark.parametrize("look_forward_twice", [True, False])
def test_look_forward_twice_gradient_to_previous_box_head(look_forward_twice):
    memory, _ = _sequence()
    decoder, box_heads = _decoder(look_forward_twice=look_forward_twice)
    content, reference = _queries()
    hidden, boxes = decoder(content, reference, memory, box_heads)
    boxes[1].sum().backward()
    grads = [p.grad for p in box_heads[0].parameters()]
    reached = any(g is not None and g.abs().sum() > 0 for g in grads)
    assert reached == look_forward_twice
    # the current layer's box head is trained either way
    assert box_heads[1][-1].weight.grad.abs().sum() > 0


def test_look_forward_twice_keeps_forward_values():
    memory, _ = _sequence()
    content, reference = _queries()
    with_lft, heads = _decoder(look_forward_twice=True)
    without, _ = _decoder(look_forward_twice=False)
    without.load_state_dict(with_lft.state_dict())
    out_a = with_lft(content, reference, memory, heads)
    out_b = without(content, reference, memory, heads)
    for a, b in zip(out_a, out_b):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_self_attention_mask_blocks_information():
    memory, _ = _sequence()
    decoder, box_heads = _decoder()
    decoder.eval()
    content, reference = _queries()
    mask = torch.zeros(3, 3, dtype=torch.bool)
    # query 0 sees only itself (over two layers it would otherwise learn of query 1 through
    # query 2); queries 1 and 2 see everything
    mask[0, 1:] = True
    perturbed = content.clone()
    perturbed[:, 1] += 3.0
    moved = reference.clone()
    moved[:, 1, :2] += 0.1

    def run(query, boxes, attn_mask):
        with torch.no_grad():
            return decoder(query, boxes, memory, box_heads, self_attn_mask=attn_mask)

    base_hidden, base_boxes = run(content, reference, mask)
    hidden, boxes = run(perturbed, moved, mask)
    torch.testing.assert_close(hidden[:, :, 0], base_hidden[:, :, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(boxes[:, :, 0], base_boxes[:, :, 0], rtol=0, atol=1e-6)
    # query 2 may see query 1, and without the mask query 0 is affected too
    assert (hidden[:, :, 2] - base_hidden[:, :, 2]).abs().max() > 1e-3
    unmasked, _ = run(perturbed, moved, None)
    reference_unmasked, _ = run(content, reference, None)
    assert (unmasked[:, :, 0] - reference_unmasked[:, :, 0]).abs().max() > 1e-3


def test_decoder_requires_query_pos_without_box_positions():
    memory, _ = _sequence()
    decoder, box_heads = _decoder(query_pos_from_boxes=False, output_norm=False)
    assert decoder.ref_point_head is None
    content, reference = _queries()
    with pytest.raises(ValueError, match="query_pos"):
        decoder(content, reference, memory, box_heads)
    hidden, boxes = decoder(
        content, reference, memory, box_heads, query_pos=torch.zeros_like(content)
    )
    assert hidden.shape == (2, 2, 3, CHANNELS)
    # without an output norm a layer's prediction is its next reference
    expected = (box_heads[1](hidden[1]) + inverse_sigmoid(boxes[0], eps=1e-3)).sigmoid()
    torch.testing.assert_close(boxes[1], expected)


# ------------------------------------------------------------------------------ encoder
def _encoder(num_checkpointed_layers, seed=0):
    torch.manual_seed(seed)
    return DeformableEncoder(
        num_layers=3,
        embed_dim=CHANNELS,
        num_heads=2,
        num_levels=2,
        num_points=2,
        ffn_dim=32,
        num_checkpointed_layers=num_checkpointed_layers,
    )


def _count_layer_calls(encoder):
    counts = [0] * len(encoder.layers)

    def hook(index):
        def count(module, args):
            counts[index] += 1

        return count

    for index, layer in enumerate(encoder.layers):
        layer.register_forward_pre_hook(hook(index))
    return counts


def test_encoder_checkpointing_matches_plain_and_recomputes():
    sequence, _ = _sequence(padded=[(4, 4), (2, 3)])
    pos = torch.randn(sequence.tokens.shape, generator=torch.Generator().manual_seed(3))
    plain, checkpointed = _encoder(0), _encoder(2, seed=5)
    checkpointed.load_state_dict(plain.state_dict())
    results = []
    for encoder in (plain, checkpointed):
        encoder.train()
        counts = _count_layer_calls(encoder)
        tokens = sequence.tokens.clone().requires_grad_(True)
        memory = encoder(sequence.with_tokens(tokens), pos)
        calls_forward = list(counts)
        (memory * torch.linspace(-1, 1, memory.numel()).view_as(memory)).sum().backward()
        grads = [p.grad.clone() for p in encoder.parameters()]
        results.append((memory.detach(), tokens.grad, grads, calls_forward, list(counts)))

    (out_a, in_grad_a, grads_a, fwd_a, total_a), (out_b, in_grad_b, grads_b, fwd_b, total_b) = (
        results
    )
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    torch.testing.assert_close(in_grad_a, in_grad_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b)
    assert fwd_a == fwd_b == [1, 1, 1]
    assert total_a == [1, 1, 1]
    # the first two layers are run again in the backward pass
    assert total_b == [2, 2, 1]


def _bytes_saved_for_backward(encoder, sequence, pos):
    """Bytes of the tensors autograd keeps for the backward pass of one training forward."""
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    tokens = sequence.tokens.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        encoder.train()(sequence.with_tokens(tokens), pos)
    return sum(saved)


def test_encoder_checkpointing_lowers_activation_memory():
    sequence, _ = _sequence(padded=[(4, 4), (2, 3)])
    pos = torch.randn(sequence.tokens.shape, generator=torch.Generator().manual_seed(3))
    held = [_bytes_saved_for_backward(_encoder(n), sequence, pos) for n in (0, 2, 3)]
    # each checkpointed layer keeps only its inputs instead of all its activations
    assert held[0] > held[1] > held[2]
    assert held[2] < 0.25 * held[0]


def test_encoder_checkpointing_only_in_training():
    sequence, _ = _sequence()
    encoder = _encoder(3).eval()
    counts = _count_layer_calls(encoder)
    tokens = sequence.tokens.clone().requires_grad_(True)
    encoder(sequence.with_tokens(tokens), torch.zeros_like(tokens)).sum().backward()
    assert counts == [1, 1, 1]


@pytest.mark.parametrize("value", [-1, 4])
def test_encoder_rejects_invalid_checkpoint_count(value):
    with pytest.raises(ValueError, match="num_checkpointed_layers"):
        _encoder(value)


def test_encoder_ignores_features_at_padding():
    sequence, _ = _sequence(padded=[(4, 4), (2, 2)])
    encoder = _encoder(0).eval()
    pos = torch.zeros_like(sequence.tokens)
    padding = sequence.padding_mask
    assert padding[1].any()
    changed = sequence.tokens.masked_fill(padding[..., None], 100.0)
    with torch.no_grad():
        base = encoder(sequence, pos)
        other = encoder(sequence.with_tokens(changed), pos)
    torch.testing.assert_close(other[~padding], base[~padding], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------- level shapes checked once per forward
def _attention_calls(module_list, attribute):
    """The ``level_shapes`` every deformable attention of the layers is called with."""
    calls = []
    for layer in module_list:
        getattr(layer, attribute).register_forward_pre_hook(
            lambda module, args, kwargs: calls.append(kwargs.get("level_shapes")),
            with_kwargs=True,
        )
    return calls


def _count_level_checks(monkeypatch):
    """Calls of check_level_shapes from now on: by the sequence, or by an attention layer."""
    checks = mock.Mock(wraps=check_level_shapes)
    monkeypatch.setattr(multi_level, "check_level_shapes", checks)
    monkeypatch.setattr(ms_deform_attn, "check_level_shapes", checks)
    return checks


@pytest.mark.parametrize("num_checkpointed_layers", [0, 2])
def test_encoder_checks_level_shapes_once_and_hands_them_to_every_layer(
    monkeypatch, num_checkpointed_layers
):
    sequence, _ = _sequence(padded=[(4, 4), (2, 3)])
    encoder = _encoder(num_checkpointed_layers).train()
    calls = _attention_calls(encoder.layers, "self_attn")
    checks, reads = _count_level_checks(monkeypatch), record_host_reads(monkeypatch)
    tokens = sequence.tokens.clone().requires_grad_(True)
    memory = encoder(sequence.with_tokens(tokens), torch.zeros_like(tokens))
    assert checks.call_count == 1
    assert calls == [((4, 4), (2, 2))] * 3
    assert reads == []
    memory.sum().backward()  # the checkpointed layers run again, with the same shapes
    assert checks.call_count == 1
    assert calls == [((4, 4), (2, 2))] * (3 + num_checkpointed_layers)


def test_decoder_checks_level_shapes_once_and_hands_them_to_every_layer(monkeypatch):
    memory, _ = _sequence(padded=[(4, 4), (3, 2)])
    decoder, box_heads = _decoder(num_layers=3)
    calls = _attention_calls(decoder.layers, "cross_attn")
    checks, reads = _count_level_checks(monkeypatch), record_host_reads(monkeypatch)
    content, reference = _queries()
    decoder(content, reference, memory, box_heads)
    assert checks.call_count == 1
    assert calls == [((4, 4), (2, 2))] * 3
    assert reads == []


def test_encoder_and_decoder_read_no_tensor_data_on_the_host():
    # Fake tensors (what torch.export traces with) have shapes but no data: reading a value to
    # Python (.tolist(), .item(), int(), the device-to-host syncs on GPU) raises
    fake_tensor = pytest.importorskip("torch._subclasses.fake_tensor")
    real, _ = _sequence(padded=[(4, 4), (2, 3)])
    encoder = _encoder(0).eval()
    decoder, box_heads = _decoder()
    content, reference = _queries()
    with fake_tensor.FakeTensorMode(allow_non_fake_inputs=True) as mode:
        maps = [mode.from_tensor(m) for m in real.to_maps()]
        image_mask = mode.from_tensor(torch.zeros(2, 4, 4, dtype=torch.bool))
        sequence = flatten_levels(maps, level_masks(image_mask, maps))
        with pytest.raises(fake_tensor.DataDependentOutputException):
            sequence.spatial_shapes.sum().item()
        memory = encoder(sequence, torch.zeros(sequence.tokens.shape))
        hidden, boxes = decoder(content, reference, sequence.with_tokens(memory), box_heads)
    assert sequence.level_shapes == ((4, 4), (2, 2))
    assert memory.shape == real.tokens.shape and hidden.shape == (2, 2, 3, CHANNELS)


def test_encoder_traces_with_torch_jit_trace():
    # torch.jit.trace (fvcore's FLOP count) gives tensor.shape as 0-dim tensors: the level
    # shapes are read as ints, constants of the trace
    _, maps = _sequence()
    image_mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    image_mask[1, :, 3:] = True
    pos = torch.randn(2, 20, CHANNELS, generator=torch.Generator().manual_seed(3))

    class Encode(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = _encoder(0)

        def forward(self, fine, coarse):
            masks = level_masks(image_mask, [fine, coarse])
            return self.encoder(flatten_levels([fine, coarse], masks), pos)

    encode = Encode().eval()
    with torch.no_grad():
        traced = torch.jit.trace(encode, tuple(maps), check_trace=False)
        torch.testing.assert_close(traced(*maps), encode(*maps), rtol=0, atol=0)


def test_encoder_and_decoder_reject_inconsistent_layouts_before_computing():
    sequence, _ = _sequence()
    encoder = _encoder(0)
    decoder, box_heads = _decoder()
    counts = _count_layer_calls(encoder) + _count_layer_calls(decoder)
    content, reference = _queries()
    for wrong, message in _inconsistent_layouts(sequence):
        with pytest.raises(ValueError, match=message):
            encoder(wrong, torch.zeros_like(sequence.tokens))
        with pytest.raises(ValueError, match=message):
            decoder(content, reference, wrong, box_heads)
    assert counts == [0] * 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_encoder_forward_and_attention_do_not_synchronize_cuda():
    sequence, maps = _sequence(padded=[(4, 4), (2, 3)])
    encoder = _encoder(0).eval().cuda()
    attention = encoder.layers[0].self_attn
    maps = [m.cuda() for m in maps]
    image_mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    image_mask[1, :, 3:] = True
    image_mask = image_mask.cuda()
    pos = torch.zeros(sequence.tokens.shape, device="cuda")
    queries = torch.randn(2, 3, CHANNELS, device="cuda")
    boxes = torch.rand(2, 3, 2, 4, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            memory = flatten_levels(maps, level_masks(image_mask, maps))
            memory = memory.with_tokens(encoder(memory, pos))
            for reference_points in (boxes, boxes[..., :2]):  # decoder boxes, encoder points
                attention(
                    queries,
                    memory.tokens,
                    reference_points,
                    memory.spatial_shapes,
                    memory.level_start_index,
                    memory.padding_mask,
                    level_shapes=memory.level_shapes,
                )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert memory.tokens.is_cuda
