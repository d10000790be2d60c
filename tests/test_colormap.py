"""dataset/colormap.py: ISPRS colour decoding (snapping, quirks, unknown colours) and colouring."""
import numpy as np

from dataset.colormap import CLASS_NAMES, IGNORE_INDEX, PALETTE, colorize, count_off_palette, decode_colors

ISPRS_COLOURS = {(255, 0, 0): 0, (255, 255, 255): 1, (0, 0, 255): 2, (0, 255, 255): 3,
                 (0, 255, 0): 4, (255, 255, 0): 5}


def reference_decode(rgb):
    """Slow per-pixel reference: snap at 128, look up, everything else 255."""
    out = np.empty(rgb.shape[:2], np.uint8)
    unknown = 0
    for i in range(rgb.shape[0]):
        for j in range(rgb.shape[1]):
            snapped = tuple(255 if v >= 128 else 0 for v in rgb[i, j])
            out[i, j] = ISPRS_COLOURS.get(snapped, 255)
            unknown += snapped not in ISPRS_COLOURS and snapped != (0, 0, 0)
    return out, unknown


def test_palette_and_names():
    assert len(CLASS_NAMES) == 6 and CLASS_NAMES[0] == "clutter" and CLASS_NAMES[5] == "car"
    assert PALETTE.dtype == np.uint8 and PALETTE.shape == (6, 3)
    assert {tuple(c): i for i, c in enumerate(PALETTE.tolist())} == ISPRS_COLOURS
    assert IGNORE_INDEX == 255


def test_exact_colours_and_black():
    rgb = np.array([list(ISPRS_COLOURS) + [(0, 0, 0)]], np.uint8)
    label, unknown = decode_colors(rgb)
    assert label.dtype == np.uint8
    assert label.tolist() == [[0, 1, 2, 3, 4, 5, 255]]
    assert unknown == 0  # black is the ignore colour, not an unknown one
    assert count_off_palette(rgb) == 0


def test_potsdam_quirks_decode_to_their_class():
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 6, size=(40, 50))
    jittered = np.clip(PALETTE[classes].astype(int) + rng.integers(-20, 21, (40, 50, 3)), 0, 255)
    label, unknown = decode_colors(jittered.astype(np.uint8))  # tile 4_12: lossy colours
    assert np.array_equal(label, classes) and unknown == 0
    changed = (jittered != PALETTE[classes]).any(axis=-1).sum()
    assert count_off_palette(jittered.astype(np.uint8)) == changed > 0.5 * classes.size
    cars = np.full((2, 3, 3), (252, 255, 0), np.uint8)  # tile 6_7
    label, unknown = decode_colors(cars)
    assert (label == 5).all() and unknown == 0 and count_off_palette(cars) == 6


def test_snapping_threshold_and_unknown_colours():
    rgb = np.array([[(128, 127, 127), (127, 128, 128), (255, 0, 255), (200, 30, 220), (10, 10, 10)]],
                   np.uint8)
    label, unknown = decode_colors(rgb)
    assert label.tolist() == [[0, 3, 255, 255, 255]]
    assert unknown == 2  # the two magenta-like pixels; near-black is ignore, not unknown


def test_matches_slow_reference_on_random_colours():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    label, unknown = decode_colors(rgb)
    ref_label, ref_unknown = reference_decode(rgb)
    assert np.array_equal(label, ref_label) and unknown == ref_unknown


def test_colorize_round_trip_and_ignore_black():
    rng = np.random.default_rng(2)
    label = rng.choice([0, 1, 2, 3, 4, 5, 255], size=(17, 23)).astype(np.uint8)
    rgb = colorize(label)
    assert rgb.shape == (17, 23, 3) and rgb.dtype == np.uint8
    assert (rgb[label == 255] == 0).all()
    assert np.array_equal(decode_colors(rgb)[0], label)
    wide = np.array([[0, 5, 6, -1, 255]], np.int64)  # predictions as int64, out-of-range values
    assert colorize(wide).tolist() == [[[255, 0, 0], [255, 255, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]]]
