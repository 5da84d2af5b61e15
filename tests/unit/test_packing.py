"""Token ids packed at the vocabulary's bit width: the stream's layout, the round trip, the sizes."""

import numpy as np
import pytest

from pipeline.cache.packing import index_bits, pack_ids, packed_bytes, unpack_ids


def test_widths_follow_the_vocabulary():
    assert index_bits(2_048) is None and index_bits(4_096) is None  # uint8 / uint16 columns, unpacked
    assert index_bits(4_097) == 13 and index_bits(32_768) == 15 and index_bits(65_536) == 16
    assert index_bits(65_537) == 17 and index_bits(131_072) == 17 and index_bits(152_064) == 18
    assert packed_bytes(25, 17) == 54 and packed_bytes(1, 17) == 3


def test_the_stream_is_little_endian_id_after_id():
    # ids 1 and 2 at 3 bits: bits 0..2 hold 1 (001), bits 3..5 hold 2 (010) -> 0b010_001 = 17
    assert pack_ids(np.array([[1, 2]]), 3).tolist() == [[17]]
    # 17-bit ids: 0x1FFFF then 1 -> bytes ff ff 03 00 00 (bit 17 of the stream is the second id's bit 0)
    assert pack_ids(np.array([[0x1FFFF, 1]]), 17).tolist() == [[0xFF, 0xFF, 0x03, 0x00, 0x00]]


@pytest.mark.parametrize("bits", [1, 7, 8, 17, 18, 25, 32])
def test_round_trip(bits):
    rng = np.random.default_rng(bits)
    ids = rng.integers(0, 2**bits, size=(6, 5, 7), dtype=np.uint64)
    ids[0, 0, 0], ids[-1, -1, -1] = 2**bits - 1, 0  # the extremes
    packed = pack_ids(ids, bits)
    assert packed.dtype == np.uint8 and packed.shape == (6, packed_bytes(35, bits))
    back = unpack_ids(packed, bits, (5, 7))
    assert back.dtype == np.int64 and np.array_equal(back, ids.astype(np.int64))


def test_an_id_too_wide_or_a_stream_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="does not fit 17 bits"):
        pack_ids(np.array([[2**17]]), 17)
    with pytest.raises(ValueError, match="does not hold 25 ids"):
        unpack_ids(np.zeros((1, 10), np.uint8), 17, (25,))


@pytest.mark.parametrize("bits", [17, 18, 32])
def test_the_student_unpacks_on_its_device_as_the_contract_does(bits):
    import torch

    from pipeline.student.tasks.ids import unpack_ids as unpack_torch

    ids = np.random.default_rng(0).integers(0, 2**bits, size=(3, 16, 5), dtype=np.uint64)
    packed = pack_ids(ids, bits)
    back = unpack_torch(torch.from_numpy(packed), bits, (16, 5))
    assert back.dtype == torch.int64 and np.array_equal(back.numpy(), unpack_ids(packed, bits, (16, 5)))


def test_the_teacher_actor_packs_ids_above_65535(tmp_path):
    import torch

    from pipeline.cache.schema import INPUT_IDS, LENGTH, SAMPLE_ID, SAMPLED_INDICES, SAMPLED_WEIGHTS
    from pipeline.models.factory import save_state
    from pipeline.models.lm import causal_lm
    from pipeline.teacher.predictor import TeacherPredictor

    vocab, length = 70_000, 8
    torch.manual_seed(0)
    save_state(causal_lm(num_classes=vocab, input_shape=(length,), d_model=8, n_layers=1, n_heads=2), str(tmp_path / "t.pt"))
    spec = {"factory": "pipeline.models.lm:causal_lm", "weights": str(tmp_path / "t.pt"),
            "kwargs": {"d_model": 8, "n_layers": 1, "n_heads": 2}}
    predictor = TeacherPredictor({"teacher": spec}, (length,), vocab, logits_spec={"mode": "sampled", "k": 25})
    batch = {SAMPLE_ID: np.array(["a", "b", "c"]), INPUT_IDS: np.random.default_rng(0).integers(0, vocab, (3, length + 1)),
             LENGTH: np.full(3, length + 1)}
    out = predictor(batch)
    assert out[SAMPLED_INDICES].dtype == np.uint8 and out[SAMPLED_INDICES].shape == (3, packed_bytes(length * 25, 17))
    ids = unpack_ids(out[SAMPLED_INDICES], 17, (length, 25))
    drawn = ids[out[SAMPLED_WEIGHTS] > 0]
    assert drawn.max() > 65_535 and drawn.max() < vocab  # a near-uniform teacher draws from the whole vocabulary
