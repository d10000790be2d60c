"""ISPRS class names and colours (docs/data.md#classes-and-colours): colour label images <-> class index maps;
colour images of any dataset's index maps (its palette: its spec's, utils/dataset_spec.py)."""
import numpy as np

CLASS_NAMES = ("clutter", "impervious surfaces", "building", "low vegetation", "tree", "car")
IGNORE_INDEX = 255

# ISPRS label colours (RGB), row = class index. Black (0, 0, 0) is the ignore colour.
PALETTE = np.array([
    [255, 0, 0],      # 0 clutter / background
    [255, 255, 255],  # 1 impervious surfaces
    [0, 0, 255],      # 2 building
    [0, 255, 255],    # 3 low vegetation
    [0, 255, 0],      # 4 tree
    [255, 255, 0],    # 5 car
], dtype=np.uint8)

# After snapping each channel at 128 a colour is one of 8 codes r*4 + g*2 + b; this LUT gives the
# class of each code. The two codes that are not ISPRS classes, black (0) and magenta (5), -> 255.
_CODE_TO_CLASS = np.full(8, IGNORE_INDEX, dtype=np.uint8)
_CODE_TO_CLASS[(PALETTE[:, 0] >= 128) * 4 + (PALETTE[:, 1] >= 128) * 2 + (PALETTE[:, 2] >= 128)] = \
    np.arange(len(PALETTE), dtype=np.uint8)
_BLACK_CODE = 0

# Index map -> colour: classes get their palette colour, 255 and anything else black.
_CLASS_TO_COLOUR = np.zeros((256, 3), dtype=np.uint8)
_CLASS_TO_COLOUR[:len(PALETTE)] = PALETTE


def _codes(rgb):
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] < 3:
        raise ValueError(f"expected an H x W x 3 colour label image, got shape {rgb.shape}")
    bits = (rgb[..., :3] >= 128).view(np.uint8)
    return (bits[..., 0] << 2) | (bits[..., 1] << 1) | bits[..., 2]


def decode_colors(rgb):
    """Colour label image (H, W, 3 uint8) -> (class index map H x W uint8, n_unknown_pixels).

    Each channel is snapped to 0/255 at 128 first, so lossy colours (Potsdam 4_12) and near
    colours (Potsdam 6_7's (252, 255, 0) cars) decode to their class. Black is the ignore colour
    (-> 255, not counted as unknown); a colour that is still no class (magenta) -> 255 and is
    counted in n_unknown_pixels.
    """
    codes = _codes(rgb)
    label = _CODE_TO_CLASS[codes]
    n_unknown = int(np.count_nonzero((label == IGNORE_INDEX) & (codes != _BLACK_CODE)))
    return label, n_unknown


def count_off_palette(rgb):
    """Pixels whose colour is not exactly a palette colour or black (those that needed snapping)."""
    rgb = np.asarray(rgb)[..., :3]
    return int(np.count_nonzero(((rgb != 0) & (rgb != 255)).any(axis=-1)))


def colorize(label, palette=None):
    """Class index map (H, W) -> colour image (H, W, 3 uint8) in `palette` (rows = classes; default the ISPRS
    one); 255 and unknown -> black."""
    table, rows = _CLASS_TO_COLOUR, len(PALETTE)
    if palette is not None:  # another dataset's colours (meta.json's "palette")
        rows = len(palette)
        table = np.zeros((256, 3), dtype=np.uint8)
        table[:rows] = np.asarray(palette, dtype=np.uint8)
    label = np.asarray(label)
    if label.dtype != np.uint8:
        # Keep out-of-range values (e.g. int64 predictions) out of the LUT's valid rows.
        label = np.where((label >= 0) & (label < rows), label, IGNORE_INDEX).astype(np.uint8)
    return table[label]
