"""Label schema contract: stable ids, priority, cardiac subset, encodings with exact inverses."""
import numpy as np
import pytest
import torch

from fcas import labels as L

SCHEMA = L.default_schema()
ALL_IDS = sorted(SCHEMA.classes.values())


def test_schema_has_the_eight_cardiac_classes_and_surroundings():
    assert set(L.CARDIAC_CLASSES) == set(SCHEMA.cardiac)
    assert len(SCHEMA.cardiac_ids) == 8
    for tissue in ("lung", "bone", "soft_tissue"):
        assert SCHEMA.id(tissue) not in SCHEMA.cardiac_ids
    # stable ids: these are written into every label file; changing them breaks old outputs
    assert SCHEMA.id("left_ventricle") == 1 and SCHEMA.id("coronary_arteries") == 8
    assert SCHEMA.n_bits == 4  # ceil(log2(11 + 1))


def test_priority_puts_thin_structures_first():
    pri = SCHEMA.priority_ids
    assert pri[0] == SCHEMA.id("coronary_arteries")
    assert pri.index(SCHEMA.id("lv_myocardium")) < pri.index(SCHEMA.id("left_ventricle"))
    assert pri[-1] == SCHEMA.id("soft_tissue")


@pytest.mark.parametrize("label_id", ALL_IDS)
@pytest.mark.parametrize("mode", ["bits", "onehot"])
def test_encoding_round_trips_every_id(label_id, mode):
    mask = torch.full((3, 4, 5), label_id, dtype=torch.uint8)
    mask[0, 0, 0] = 0
    enc = L.encode(mask, SCHEMA, mode)
    assert enc.shape == (L.encoded_channels(SCHEMA, mode), 3, 4, 5)
    assert set(torch.unique(enc).tolist()) <= {0.0, 1.0}
    dec = L.from_bits(enc) if mode == "bits" else L.from_onehot(enc)
    assert torch.equal(dec, mask.long())


def test_bits_are_lsb_first_like_maisi():
    enc = L.to_bits(torch.tensor([[[5]]]), n_bits=4)  # 5 = 0b0101
    assert enc[:, 0, 0, 0].tolist() == [1.0, 0.0, 1.0, 0.0]


def test_round_trip_on_a_random_batch_with_channel_dim_1():
    rng = np.random.default_rng(0)
    mask = rng.choice(ALL_IDS, size=(2, 6, 7, 8)).astype(np.uint8)
    for mode, inverse in (("bits", L.from_bits), ("onehot", L.from_onehot)):
        enc = L.encode(mask, SCHEMA, mode, channel_dim=1)
        assert enc.shape[:2] == (2, L.encoded_channels(SCHEMA, mode))
        assert np.array_equal(inverse(enc, channel_dim=1).numpy(), mask)


def test_soft_bits_threshold_at_half():
    planes = L.to_bits(torch.tensor([[[11]]]), 4) * 0.8 + 0.1  # 0.9 / 0.1
    assert L.from_bits(planes).item() == 11


@pytest.mark.parametrize("bad", [torch.tensor([16]), torch.tensor([-1])])
def test_bits_refuse_ids_that_do_not_fit(bad):
    with pytest.raises(ValueError, match="label ids"):
        L.to_bits(bad, 4)


def test_float_labels_are_refused():
    with pytest.raises(ValueError, match="integer"):
        L.to_bits(torch.zeros(3), 4)


def test_cardiac_only_keeps_only_cardiac_ids_numpy_and_torch():
    mask = np.array(ALL_IDS, dtype=np.uint8)
    kept = SCHEMA.cardiac_only(mask)
    assert kept.dtype == np.uint8
    assert set(kept.tolist()) == {0, *SCHEMA.cardiac_ids}
    assert torch.equal(SCHEMA.cardiac_only(torch.from_numpy(mask)), torch.from_numpy(kept))


def test_union_respects_priority():
    lv = np.zeros((4, 4), bool)
    lv[:3] = True
    cor = np.zeros((4, 4), bool)
    cor[2:] = True
    lung = np.ones((4, 4), bool)
    out = SCHEMA.union({SCHEMA.id("lung"): lung, SCHEMA.id("left_ventricle"): lv, SCHEMA.id("coronary_arteries"): cor})
    assert (out[:2] == 1).all() and (out[2:] == 8).all()


@pytest.mark.parametrize(
    "source, src_ids, ours",
    [
        ("mmwhs", [0, 500, 600, 420, 550, 205, 820, 850], [0, 1, 2, 3, 4, 5, 6, 7]),
        ("imagecas", [0, 1], [0, 8]),
        ("totalsegmentator_heartchambers", [1, 2, 3, 4, 5, 6, 7], [5, 3, 1, 4, 2, 6, 7]),
        ("maisi", [0, 6, 28, 32, 115], [0, 6, 9, 9, 11]),  # 115 (heart) -> default soft tissue
        # TotalSegmentator total: lung lobes, vertebrae, ribs, sternum; costal cartilage, heart, aorta -> soft tissue
        ("totalsegmentator_total", [0, 10, 14, 26, 92, 115, 116, 117, 51, 52], [0, 9, 9, 10, 10, 10, 10, 11, 11, 11]),
    ],
)
def test_source_mappings(source, src_ids, ours):
    mask = np.array(src_ids, dtype=np.int32)
    assert SCHEMA.map_source(mask, source).tolist() == ours


def test_unmapped_source_ids_are_refused_with_the_ids():
    with pytest.raises(ValueError, match=r"\[3\].*mmwhs"):
        SCHEMA.map_source(np.array([0, 500, 3]), "mmwhs")
    with pytest.raises(ValueError, match="not in schema"):
        SCHEMA.map_source(np.array([0, 200]), None)
    with pytest.raises(ValueError, match="unknown label mapping"):
        SCHEMA.source("nope")


def test_invalid_schema_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nclasses: {background: 0, a: 1, b: 1}\npriority: [a, b]\n")
    with pytest.raises(ValueError, match="unique"):
        L.load_schema(str(bad))


def test_totalsegmentator_mappings_name_their_structure_files():
    chambers, total = SCHEMA.source("totalsegmentator_heartchambers"), SCHEMA.source("totalsegmentator_total")
    assert chambers.files["heart_myocardium"] == SCHEMA.id("lv_myocardium") and len(chambers.files) == 7
    assert len(total.files) == 117 and total.files["lung_middle_lobe_right"] == SCHEMA.id("lung")
    assert total.files["rib_right_12"] == SCHEMA.id("bone") and total.files["heart"] == SCHEMA.id("soft_tissue")
    with pytest.raises(ValueError, match="not in mapping"):
        SCHEMA.map_source(np.array([0, 1, 118]), total)


def test_a_binary_mask_is_refused_by_a_multilabel_mapping():
    with pytest.raises(ValueError, match="binary mask"):
        SCHEMA.map_source(np.array([0, 1, 1, 0]), "totalsegmentator_heartchambers")
    assert SCHEMA.map_source(np.array([0, 1, 0]), "imagecas").tolist() == [0, 8, 0]   # binary by nature


def test_merge_of_label_maps_is_the_union_of_their_classes():
    rng = np.random.default_rng(1)
    maps = [rng.choice(ALL_IDS, size=(5, 6, 7)).astype(np.uint8) for _ in range(3)]
    binaries = {c: np.any([m == c for m in maps], axis=0) for c in ALL_IDS if c}
    assert np.array_equal(SCHEMA.merge(maps), SCHEMA.union(binaries, maps[0].shape))


def test_a_structure_without_a_class_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nclasses: {background: 0, a: 1}\npriority: [a]\n"
                   "sources: {s: {names: {1: foo, 2: bar}, classes: {foo: a}}}\n")
    with pytest.raises(ValueError, match="'bar'.*matches no pattern"):
        L.load_schema(str(bad))
