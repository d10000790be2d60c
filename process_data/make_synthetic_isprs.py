"""Synthetic ISPRS look-alike archives: small city tiles in the exact raw layout of docs/data.md#raw-layout.

    python process_data/make_synthetic_isprs.py --dataset vaihingen|potsdam|both --dst RAW
        [--seed 0] [--tile_size PX] [--n_train N] [--n_test N] [--zip [--keep_folders]]

Writes what the official archives unpack to (real folder/file names, official tile ids and
train/test membership, a subset of the tiles): Vaihingen `top/` (3-band IR-R-G) and the
COMPLETE / eroded ground truth folders; Potsdam `2_Ortho_RGB`, `3_Ortho_IRRG`, `4_Ortho_RGBIR`
(4 bands, planar C,H,W TIFF that PIL cannot open), `5_Labels_all`, `5_Labels_all_noBoundary`.
`--zip` writes the archives instead (Potsdam.zip holding one zip per product, like the real one).
Quirks of the real data are reproduced: Potsdam 4_12 has lossy label colours (+-20 per channel)
and 6_7 codes cars as (252, 255, 0); both are always among the generated train tiles.

Scenes: a road grid with squares and paved yards (impervious), polygonal buildings with several
roof materials (gabled or flat), grass with dry patches, round tree crowns in clusters and
alleys, cars along road lanes, sparse clutter (soil, water, containers). Each class has its own
spectral signature (vegetation bright in NIR) and texture; shadows, sensor noise and colours
shared between classes keep it from being trivial. Deterministic for a seed.
"""
import argparse
import math
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import tifffile

from dataset.colormap import IGNORE_INDEX, colorize
from process_data.isprs_processing import ISPRS_DATASETS as DATASETS
from process_data.isprs_processing import LAYOUTS, POTSDAM, VAIHINGEN
from utils.errors import UserError, exit_on_user_error

CLUTTER, IMPERVIOUS, BUILDING, LOW_VEG, TREE, CAR = range(6)

# Reflectances (R, G, B, NIR) in 0-255.
GRASS = np.array([100, 138, 72, 195], np.float32)
DRY_GRASS = np.array([150, 148, 100, 160], np.float32)
TREE_COLOUR = np.array([52, 84, 44, 170], np.float32)
ASPHALT = np.array([108, 108, 114, 98], np.float32)
PAVING = np.array([160, 156, 150, 142], np.float32)
ROOFS = np.array([[172, 82, 64, 150],    # red tiles (gabled)
                  [132, 96, 76, 118],    # brown tiles (gabled)
                  [84, 86, 92, 78],      # dark flat roof, close to asphalt
                  [170, 168, 170, 156],  # light flat roof, close to paving
                  [96, 132, 118, 112]],  # green copper / gravel
                 np.float32)
GABLED_ROOFS = 2  # the first two materials are gabled
CAR_COLOURS = np.array([[190, 28, 28, 150], [28, 48, 140, 42], [228, 228, 228, 212],
                        [30, 30, 33, 30], [150, 150, 156, 140], [44, 84, 52, 64]], np.float32)
CLUTTER_COLOURS = np.array([[122, 96, 70, 112],   # bare soil (close to brown roofs)
                            [56, 70, 92, 18],     # water: dark in NIR
                            [205, 120, 40, 160],  # containers / tarps
                            [92, 90, 64, 128]],   # rubble
                           np.float32)

# Per-dataset look: Vaihingen = small detached houses and many trees at 9 cm; Potsdam = larger
# blocks at 5 cm (objects bigger in pixels), more clutter and fewer trees.
STYLES = {
    "vaihingen": dict(scale=2.0, road_spacing=(100, 160), road_width=(12, 22), building_frac=(0.22, 0.30),
                      building_size=(11, 30), tree_frac=(0.19, 0.26), clutter_frac=0.018,
                      yard_frac=0.09, car_frac=0.024, erosion=1, tile_size=480, n_train=6, n_test=4),
    "potsdam": dict(scale=1.3, road_spacing=(120, 190), road_width=(12, 22), building_frac=(0.23, 0.30),
                    building_size=(14, 40), tree_frac=(0.13, 0.19), clutter_frac=0.08,
                    yard_frac=0.13, car_frac=0.03, erosion=2, tile_size=600, n_train=4, n_test=2),
}
QUIRK_LOSSY = "4_12"     # Potsdam tile with lossy (jittered) label colours
QUIRK_CAR_COLOUR = "6_7"  # Potsdam tile whose cars are coded (252, 255, 0)


# ----------------------------------------------------------------------------------------------
# Drawing helpers (vectorised over pixels; loops only over objects)
# ----------------------------------------------------------------------------------------------
def _interp_matrix(n, cell):
    """(n, n // cell + 2) weights of a smoothstep interpolation from a coarse grid to n pixels."""
    position = np.arange(n, dtype=np.float32) / cell
    lower = position.astype(np.int64)
    t = position - lower
    t = t * t * (3 - 2 * t)
    weights = np.zeros((n, n // cell + 2), np.float32)
    weights[np.arange(n), lower] = 1 - t
    weights[np.arange(n), lower + 1] = t
    return weights


def smooth_noise(rng, h, w, cell):
    """Zero-mean, unit-ish smooth random field with features about `cell` pixels wide."""
    cell = max(int(cell), 1)
    grid = rng.standard_normal((h // cell + 2, w // cell + 2), dtype=np.float32)
    return _interp_matrix(h, cell) @ grid @ _interp_matrix(w, cell).T  # separable interpolation


def _window(h, w, cy, cx, radius):
    """Slices of the bounding box of radius `radius` around (cy, cx), clipped to the tile."""
    y0, y1 = max(int(cy - radius), 0), min(int(cy + radius) + 2, h)
    x0, x1 = max(int(cx - radius), 0), min(int(cx + radius) + 2, w)
    if y0 >= y1 or x0 >= x1:
        return None
    return slice(y0, y1), slice(x0, x1)


def _local_coords(win, cy, cx, angle):
    """Coordinates (u along `angle`, v across) of the window's pixels, centred on (cy, cx)."""
    ys = np.arange(win[0].start, win[0].stop, dtype=np.float32)[:, None] - cy
    xs = np.arange(win[1].start, win[1].stop, dtype=np.float32)[None, :] - cx
    cos, sin = np.cos(angle), np.sin(angle)
    return xs * cos + ys * sin, -xs * sin + ys * cos


def shift(mask, dy, dx):
    """mask moved by (dy, dx) >= 0 pixels (down/right), zeros entering."""
    out = np.zeros_like(mask)
    out[dy:, dx:] = mask[:mask.shape[0] - dy, :mask.shape[1] - dx]
    return out


def boundary_mask(label, radius):
    """Pixels with a different class within `radius` (Chebyshev): the band eroded labels drop."""
    padded = np.pad(label, radius, mode="edge")
    h, w = label.shape
    lo, hi = label.copy(), label.copy()
    for dy in range(2 * radius + 1):  # (2r+1)^2 shifted views; r is 1-2
        for dx in range(2 * radius + 1):
            view = padded[dy:dy + h, dx:dx + w]
            np.minimum(lo, view, out=lo)
            np.maximum(hi, view, out=hi)
    return lo != hi


# ----------------------------------------------------------------------------------------------
# Scene
# ----------------------------------------------------------------------------------------------
class Scene:
    """Class map plus what the renderer needs (base colours, shading, shadows) of one tile."""

    def __init__(self, rng, h, w, style):
        self.rng, self.h, self.w, self.style, self.s = rng, h, w, style, style["scale"]
        self.label = np.full((h, w), LOW_VEG, np.uint8)
        self.colour = np.empty((h, w, 4), np.float32)
        self.shade = np.ones((h, w), np.float32)
        self.texture = np.zeros((h, w), np.float32)  # extra per-pixel noise amplitude
        self.yy, self.xx = np.mgrid[0:h, 0:w].astype(np.float32)
        self._ground()
        self._roads()
        self._buildings()
        self._clutter_objects()
        self._cars()
        self._trees()

    # grass with dry patches, paved yards, clutter blobs
    def _ground(self):
        rng, h, w, st = self.rng, self.h, self.w, self.style
        dryness = np.clip(0.5 + 0.6 * smooth_noise(rng, h, w, 40 * self.s), 0, 1)[..., None]
        self.colour[:] = GRASS * (1 - dryness) + DRY_GRASS * dryness
        self.texture[:] = 7
        yards = smooth_noise(rng, h, w, 28 * self.s)
        yard = yards > np.quantile(yards, 1 - st["yard_frac"])
        self._paint(yard, IMPERVIOUS, PAVING, texture=4)
        blobs = smooth_noise(rng, h, w, 9 * self.s)
        clutter = blobs > np.quantile(blobs, 1 - st["clutter_frac"] * 0.5)
        kind = rng.integers(0, len(CLUTTER_COLOURS), size=(h // 16 + 1, w // 16 + 1))
        ys, xs = np.nonzero(clutter)
        self._paint(clutter, CLUTTER, CLUTTER_COLOURS[kind[ys // 16, xs // 16]])

    def _paint(self, mask, cls, colour, texture=None, shade=None):
        self.label[mask] = cls
        self.colour[mask] = colour
        if texture is not None:
            self.texture[mask] = texture
        self.shade[mask] = 1.0 if shade is None else shade

    # a slightly rotated grid of roads with sidewalks, and a few squares
    def _roads(self):
        rng, h, w, st, s = self.rng, self.h, self.w, self.style, self.s
        base = rng.uniform(-0.2, 0.2)
        self.road_angle = base
        roads = []  # (angle of the road direction, offset c of n.p = c, half width)
        for turn in (0.0, np.pi / 2):
            angle = base + turn
            normal = np.array([-np.sin(angle), np.cos(angle)])  # (x, y) components
            corners = np.array([[0, 0], [w, 0], [0, h], [w, h]], np.float32) @ normal
            extent = corners.max() - corners.min()
            # the first road within the tile even when the tile is smaller than the road spacing
            c = corners.min() + rng.uniform(0.15, 0.85) * min(st["road_spacing"][0] * s, extent)
            while c < corners.max():
                roads.append((angle + rng.uniform(-0.03, 0.03), c,
                              rng.uniform(*st["road_width"]) * s / 2))
                c += rng.uniform(*st["road_spacing"]) * s
        self.roads = roads
        angles = np.array([r[0] for r in roads], np.float32)[:, None, None]
        offsets = np.array([r[1] for r in roads], np.float32)[:, None, None]
        halves = np.array([r[2] for r in roads], np.float32)[:, None, None]
        distance = np.abs(-np.sin(angles) * self.xx + np.cos(angles) * self.yy - offsets)  # [R,H,W]
        distance = (distance - halves).min(axis=0)  # < 0 on a road
        road = distance < 0
        self.road = road
        self.near_road = distance < 7 * s  # a setback for buildings
        sidewalk = (distance < 3.5 * s) & ~road
        self._paint(sidewalk, IMPERVIOUS, PAVING - 14, texture=3)
        grain = smooth_noise(rng, h, w, 6 * s)[road, None] * 6
        self._paint(road, IMPERVIOUS, ASPHALT + grain, texture=4)
        # squares: paved plazas / parking places with a tile pattern, joined to the road network
        for _ in range(rng.integers(1, 3)):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            half = rng.uniform(22, 45) * s
            win = _window(h, w, cy, cx, half * 1.5)
            if win is None:
                continue
            u, v = _local_coords(win, cy, cx, base)
            square = (np.abs(u) < half) & (np.abs(v) < half * rng.uniform(0.6, 1.0))
            checker = ((np.floor(u / 4) + np.floor(v / 4)) % 2)[square, None] * 10 - 5
            sub = self.label[win]
            sub_colour = self.colour[win]
            sub[square] = IMPERVIOUS
            sub_colour[square] = PAVING + 12 + checker
            self.road[win] |= square
            self.near_road[win] |= square

    # rotated rectangles, some with a wing (L shapes), until the target coverage
    def _buildings(self):
        rng, h, w, st, s = self.rng, self.h, self.w, self.style, self.s
        target = rng.uniform(*st["building_frac"]) * h * w
        self.building = np.zeros((h, w), bool)
        covered = 0
        for _ in range(400):
            if covered >= target:
                break
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            if self.near_road[int(cy), int(cx)] or self.building[int(cy), int(cx)]:
                continue
            angle = self.road_angle + rng.choice([0.0, np.pi / 2]) + rng.uniform(-0.06, 0.06)
            a, b = rng.uniform(*st["building_size"]) * s, rng.uniform(0.45, 0.8) * st["building_size"][1] * s
            parts = [(cy, cx, a, b)]
            if rng.random() < 0.4:  # a wing: an L or T shaped footprint
                du = rng.choice([-1, 1]) * a * rng.uniform(0.3, 0.9)
                dv = rng.choice([-1, 1]) * b
                wy = cy + du * np.sin(angle) + dv * np.cos(angle)
                wx = cx + du * np.cos(angle) - dv * np.sin(angle)
                parts.append((wy, wx, b * rng.uniform(0.6, 0.9), a * rng.uniform(0.4, 0.7)))
            material = rng.integers(len(ROOFS))
            for py, px, pa, pb in parts:
                win = _window(h, w, py, px, np.hypot(pa, pb))
                if win is None:
                    continue
                u, v = _local_coords(win, py, px, angle)
                footprint = (np.abs(u) < pa) & (np.abs(v) < pb) & ~self.near_road[win]
                new = footprint & ~self.building[win]
                covered += int(new.sum())
                if material < GABLED_ROOFS:  # two roof sides lit differently, tile rows
                    shade = np.where(v > 0, 1.14, 0.84) * (1 + 0.05 * np.sin(v * 2.1))
                else:  # flat roof with faint slabs
                    shade = 1 + 0.04 * ((np.floor(u / 7) % 2) - 0.5)
                sub_label, sub_colour = self.label[win], self.colour[win]
                sub_label[footprint] = BUILDING
                sub_colour[footprint] = ROOFS[material] + rng.normal(0, 6, 4).astype(np.float32)
                self.shade[win][footprint] = shade[footprint]
                self.texture[win][footprint] = 3
                self.building[win] |= footprint

    # sheds, containers, sand piles on the ground
    def _clutter_objects(self):
        rng, h, w, st, s = self.rng, self.h, self.w, self.style, self.s
        target = st["clutter_frac"] * 0.5 * h * w
        covered = 0
        for _ in range(200):
            if covered >= target:
                break
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            a, b = rng.uniform(3, 9) * s, rng.uniform(2, 6) * s
            win = _window(h, w, cy, cx, np.hypot(a, b))
            if win is None:
                continue
            u, v = _local_coords(win, cy, cx, rng.uniform(0, np.pi))
            mask = (np.abs(u) < a) & (np.abs(v) < b) & ~self.road[win] & ~self.building[win]
            self.label[win][mask] = CLUTTER
            self.colour[win][mask] = CLUTTER_COLOURS[rng.integers(len(CLUTTER_COLOURS))]
            covered += int(mask.sum())

    # cars along the road lanes (aligned with the road) and parked on paved yards and squares
    def _cars(self):
        rng, h, w, st, s = self.rng, self.h, self.w, self.style, self.s
        half_len, half_wid = 7.5 * s, 3.6 * s
        n_cars = int(st["car_frac"] * h * w / (4 * half_len * half_wid))
        paved_y, paved_x = np.nonzero((self.label == IMPERVIOUS) & ~self.road)
        for _ in range(n_cars * 4):
            if n_cars <= 0:
                break
            if rng.random() < 0.75 or len(paved_y) == 0:  # driving along a lane
                angle, c, half = self.roads[rng.integers(len(self.roads))]
                direction = np.array([np.cos(angle), np.sin(angle)])
                normal = np.array([-np.sin(angle), np.cos(angle)])
                t = rng.uniform(-(h + w), h + w)
                lane = rng.choice([-1, 1]) * max(half - half_wid - 1.5 * s, 0)
                cx, cy = normal * (c + lane) + direction * t
            else:  # parked
                pick = rng.integers(len(paved_y))
                cy, cx = paved_y[pick] + 0.5, paved_x[pick] + 0.5
                angle = self.road_angle + rng.choice([0.0, np.pi / 2])
            if not (0 <= cy < h and 0 <= cx < w):
                continue
            win = _window(h, w, cy, cx, half_len + 2)
            u, v = _local_coords(win, cy, cx, angle)
            body = (np.abs(u) < half_len) & (np.abs(v) < half_wid)
            area = body.sum()
            body &= self.label[win] == IMPERVIOUS  # on paved ground, not on another car
            if body.sum() < 0.9 * area or area < 0.8 * 4 * half_len * half_wid:
                continue
            colour = CAR_COLOURS[rng.integers(len(CAR_COLOURS))]
            windscreen = (np.abs(u - 0.35 * half_len) < 0.18 * half_len)[body]
            self.label[win][body] = CAR
            self.colour[win][body] = colour * np.where(windscreen, 0.45, 1.0)[:, None]
            self.shade[win][body] = 1.0
            self.texture[win][body] = 2
            n_cars -= 1

    # round crowns: clusters in gardens and alleys along roads
    def _trees(self):
        rng, h, w, st, s = self.rng, self.h, self.w, self.style, self.s
        target = rng.uniform(*st["tree_frac"]) * h * w
        self.tree = np.zeros((h, w), bool)
        covered = 0
        centres = []
        for angle, c, half in self.roads:  # alleys on some roads
            if rng.random() < 0.35:
                side = rng.choice([-1, 1])
                normal = np.array([-np.sin(angle), np.cos(angle)])
                direction = np.array([np.cos(angle), np.sin(angle)])
                for t in np.arange(-(h + w), h + w, rng.uniform(16, 24) * s):
                    x, y = normal * (c + side * (half + 4 * s)) + direction * t
                    centres.append((y, x, rng.uniform(6, 9) * s))
        for _ in range(60):  # clusters
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            for dy, dx in rng.normal(0, 18 * s, size=(rng.integers(2, 9), 2)):
                centres.append((cy + dy, cx + dx, rng.uniform(6, 16) * s))
        centres = np.array(centres, np.float32).reshape(-1, 3)
        inside = ((centres[:, 0] > -centres[:, 2]) & (centres[:, 0] < h + centres[:, 2])
                  & (centres[:, 1] > -centres[:, 2]) & (centres[:, 1] < w + centres[:, 2]))
        centres = centres[inside]
        for cy, cx, radius in centres[rng.permutation(len(centres))]:
            if covered >= target:
                break
            win = _window(h, w, cy, cx, radius * 1.3)
            if win is None or self.building[int(np.clip(cy, 0, h - 1)), int(np.clip(cx, 0, w - 1))]:
                continue
            u, v = _local_coords(win, cy, cx, 0.0)
            distance = np.hypot(u, v)
            lobes = 1 + 0.12 * np.sin(np.arctan2(v, u) * rng.integers(3, 7) + rng.uniform(0, 6.3))
            crown = (distance < radius * lobes) & ~self.building[win]
            new = crown & ~self.tree[win]
            covered += int(new.sum())
            radial = np.clip(distance / radius, 0, 1)
            self.label[win][crown] = TREE
            self.colour[win][crown] = TREE_COLOUR * rng.uniform(0.85, 1.15)
            self.shade[win][crown] = (1.25 - 0.5 * radial ** 2)[crown]  # lit crown top
            self.texture[win][crown] = 14
            self.tree[win] |= crown

    def render(self, sun=(1, 1)):
        """Reflectance image (H, W, 4) = R, G, B, NIR in 0-255, float32."""
        rng, h, w, s = self.rng, self.h, self.w, self.s
        image = self.colour * self.shade[..., None]
        image += rng.standard_normal((h, w, 1), dtype=np.float32) * self.texture[..., None]
        # shadows: buildings cast long ones, trees short ones, onto lower things (sun from NW)
        building_shadow = np.zeros((h, w), bool)
        for k in range(1, int(9 * s) + 1):
            building_shadow |= shift(self.building, k * sun[0], k * sun[1])
        tree_shadow = np.zeros((h, w), bool)
        for k in range(1, int(5 * s) + 1):
            tree_shadow |= shift(self.tree, k * sun[0], k * sun[1])
        shadow = (building_shadow & ~self.building) | (tree_shadow & ~self.building & ~self.tree)
        image[shadow] *= np.array([0.5, 0.52, 0.6, 0.55], np.float32)
        image *= rng.uniform(0.92, 1.08)  # per-tile illumination
        image += rng.standard_normal((h, w, 4), dtype=np.float32) * 3.0  # sensor noise
        return np.clip(image, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Writing the archives
# ----------------------------------------------------------------------------------------------
def _tile_shape(rng, dataset, tile_size):
    if dataset == "vaihingen":  # not square, not a multiple of the crop
        return tuple(int(tile_size * f) for f in rng.uniform(0.84, 1.16, size=2))
    return tile_size, tile_size  # Potsdam tiles are square


def _labels(label, tile, rng, erosion):
    """Complete and eroded colour labels, with the quirks of the real Potsdam tiles."""
    eroded = label.copy()
    eroded[boundary_mask(label, erosion)] = IGNORE_INDEX
    coloured = [colorize(label), colorize(eroded)]
    if tile == QUIRK_CAR_COLOUR:
        for rgb, index in zip(coloured, (label, eroded)):
            rgb[index == CAR] = (252, 255, 0)
    if tile == QUIRK_LOSSY:
        coloured = [np.clip(rgb.astype(np.int16) + rng.integers(-20, 21, size=rgb.shape), 0, 255)
                    .astype(np.uint8) for rgb in coloured]
    return coloured


def _write_tiff(path, array, planar=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    if planar:  # C, H, W with separate planes and no RGB photometric: PIL cannot decode it
        tifffile.imwrite(path, np.ascontiguousarray(array.transpose(2, 0, 1)),
                         photometric="minisblack", planarconfig="separate")
    else:
        tifffile.imwrite(path, array, photometric="rgb")


def _select_tiles(layout, n_train, n_test):
    train = list(layout.train_tiles)
    if layout is POTSDAM:
        if n_train < 2:
            raise UserError(f"--n_train {n_train}: Potsdam needs at least 2 train tiles (the "
                            f"quirky tiles {QUIRK_LOSSY} and {QUIRK_CAR_COLOUR} are always included)")
        train = [QUIRK_LOSSY, QUIRK_CAR_COLOUR] + [t for t in train if t not in (QUIRK_LOSSY, QUIRK_CAR_COLOUR)]
    if not 1 <= n_train <= len(layout.train_tiles) or not 1 <= n_test <= len(layout.test_tiles):
        raise UserError(f"--n_train {n_train} / --n_test {n_test}: {layout.name} has {len(layout.train_tiles)} "
                        f"train and {len(layout.test_tiles)} test tiles; ask for 1..that many")
    return [("train", t) for t in train[:n_train]] + [("test", t) for t in layout.test_tiles[:n_test]]


def _sizes(style, tile_size, n_train, n_test):
    """The sizes asked for, the style's defaults where None."""
    return tuple(style[key] if value is None else int(value)
                 for key, value in (("tile_size", tile_size), ("n_train", n_train), ("n_test", n_test)))


def _write_folders(dataset, root, seed, tile_size, n_train, n_test, object_scale=None):
    layout = LAYOUTS[dataset]
    style = dict(STYLES[dataset], **({"scale": object_scale} if object_scale is not None else {}))
    tile_size, n_train, n_test = _sizes(style, tile_size, n_train, n_test)
    tiles = _select_tiles(layout, n_train, n_test)
    for index, (_split, tile) in enumerate(tiles):
        # one generator per tile: a tile's content does not depend on how many are asked for
        rng = np.random.default_rng([seed, 0 if dataset == "vaihingen" else 1, index])
        h, w = _tile_shape(rng, dataset, tile_size)
        scene = Scene(rng, h, w, style)
        bands = scene.render()  # R, G, B, NIR
        complete, eroded = _labels(scene.label, tile, rng, style["erosion"])
        if layout is VAIHINGEN:
            _write_tiff(root / "top" / layout.image_file(tile, "IRRG"), bands[..., [3, 0, 1]])
        else:
            for channels, order in (("RGB", [0, 1, 2]), ("IRRG", [3, 0, 1]), ("RGBIR", [0, 1, 2, 3])):
                _write_tiff(root / layout.image_folder(channels) / layout.image_file(tile, channels),
                            bands[..., order], planar=channels == "RGBIR")
        for kind, rgb in (("complete", complete), ("eroded", eroded)):
            _write_tiff(root / layout.label_folders[kind] / layout.label_file(tile, kind), rgb)
    return layout, tiles


def _zip_folder(folder, zip_path, with_folder_name):
    """Zip a folder's files; members inside the folder name or at the top level."""
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, f"{folder.name}/{path.name}" if with_folder_name else path.name)


def _write_zips(layout, staged, dst):
    if layout is VAIHINGEN:
        with zipfile.ZipFile(dst / f"{layout.image_archive}.zip", "w", zipfile.ZIP_DEFLATED,
                             compresslevel=1) as archive:
            for path in sorted((staged / "top").iterdir()):
                archive.write(path, f"top/{path.name}")
        for folder in layout.label_folders.values():  # label archives hold bare files
            _zip_folder(staged / folder, dst / f"{folder}.zip", with_folder_name=False)
        return [dst / f"{layout.image_archive}.zip"] + [dst / f"{f}.zip" for f in layout.label_folders.values()]
    # Potsdam.zip holds one zip per product under Potsdam/
    with tempfile.TemporaryDirectory() as inner_dir:
        inner = Path(inner_dir)
        for folder in layout.image_folders.values():
            _zip_folder(staged / folder, inner / f"{folder}.zip", with_folder_name=True)
        for folder in layout.label_folders.values():
            _zip_folder(staged / folder, inner / f"{folder}.zip", with_folder_name=False)
        with zipfile.ZipFile(dst / f"{layout.image_archive}.zip", "w", zipfile.ZIP_STORED) as archive:
            for path in sorted(inner.iterdir()):
                archive.write(path, f"{layout.image_archive}/{path.name}")
    return [dst / f"{layout.image_archive}.zip"]


def generate(dataset, dst, seed=0, tile_size=None, n_train=None, n_test=None, object_scale=None, zip=False,
             keep_folders=False):
    """Write the synthetic raw archives of one dataset ('vaihingen' or 'potsdam') under `dst`.

    Sizes default to the demo sizes of STYLES. `zip=True` writes the zip archives (and the
    extracted folders too with `keep_folders=True`). Returns {"tiles": [(split, tile)], "paths": [...]}.
    """
    if dataset not in DATASETS:
        raise UserError(f"--dataset {dataset}: choose {', '.join(DATASETS)} or both")
    # check every size before writing anything; 0 is a value asked for, not "the default"
    tile_size_, n_train_, n_test_ = _sizes(STYLES[dataset], tile_size, n_train, n_test)
    _select_tiles(LAYOUTS[dataset], n_train_, n_test_)
    if tile_size_ < 32:
        raise UserError(f"--tile_size {tile_size}: use at least 32 px")
    if object_scale is not None and not (math.isfinite(object_scale) and object_scale > 0):
        raise UserError(f"--object_scale {object_scale}: use a positive number (1.0 = the default look)")
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise UserError(f"--dst {dst} is a file; choose a folder")
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create --dst {dst} ({err.strerror}); choose a writable folder") from None
    if not zip or keep_folders:
        layout, tiles = _write_folders(dataset, dst, seed, tile_size, n_train, n_test, object_scale)
        paths = [dst]
        if zip:
            paths = _write_zips(layout, dst, dst)
        return {"tiles": tiles, "paths": paths}
    with tempfile.TemporaryDirectory(dir=dst, prefix=".staging_") as staging:
        layout, tiles = _write_folders(dataset, Path(staging), seed, tile_size, n_train, n_test, object_scale)
        paths = _write_zips(layout, Path(staging), dst)
    return {"tiles": tiles, "paths": paths}


@exit_on_user_error
def main(argv=None):
    parser = argparse.ArgumentParser(description="Write synthetic ISPRS Vaihingen/Potsdam raw archives.")
    parser.add_argument("--dataset", choices=(*DATASETS, "both"), default="both")
    parser.add_argument("--dst", required=True, help="folder to write the raw archives to (RAW)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tile_size", type=int, default=None,
                        help="tile side in px (default: Vaihingen 480, drawn 0.84-1.16x per side; "
                             "Potsdam 600, square)")
    parser.add_argument("--n_train", type=int, default=None, help="train tiles (default 6 / 4)")
    parser.add_argument("--n_test", type=int, default=None, help="test tiles (default 4 / 2)")
    parser.add_argument("--object_scale", type=float, default=None,
                        help="size of objects (roads, buildings, trees, cars) relative to the default look "
                             "(default 2.0 Vaihingen, 1.3 Potsdam); smaller suits tiny tiles")
    parser.add_argument("--zip", action="store_true", help="write the zip archives instead of folders")
    parser.add_argument("--keep_folders", action="store_true", help="with --zip: write the folders too")
    args = parser.parse_args(argv)
    datasets = list(DATASETS) if args.dataset == "both" else [args.dataset]
    for dataset in datasets:
        start = time.time()
        result = generate(dataset, args.dst, seed=args.seed, tile_size=args.tile_size,
                          n_train=args.n_train, n_test=args.n_test, object_scale=args.object_scale, zip=args.zip,
                          keep_folders=args.keep_folders)
        tiles = result["tiles"]
        print(f"{dataset}: {sum(s == 'train' for s, _ in tiles)} train + "
              f"{sum(s == 'test' for s, _ in tiles)} test tiles written to {args.dst} "
              f"in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
