"""ISPRS Vaihingen and Potsdam: their shipped specs (utils/specs/vaihingen.json, potsdam.json) plus the quirks
of their archives (a layout of process_data/archives.py), for the generic processing of
process_data/tile_processing.py (docs/data.md#raw-layout).

Quirks: the image archive's name is a folder a nested zip may carry (Potsdam.zip holds one zip per product);
errors name the archive a missing folder comes from; the test labels are the eroded ones when that archive is
there, else the complete ones (with a note). Everything else (tiles, file names, colours and their
snapping, bands) is the spec's.
"""
from process_data.archives import SpecLayout
from process_data.tiling import count_columns
from utils.dataset_spec import builtin_spec
from utils.errors import UserError

ISPRS_DATASETS = ("vaihingen", "potsdam")
COUNT_COLUMNS = count_columns(6)  # columns of the per-crop pixel counts: the six ISPRS classes, then 255


class ISPRSLayout(SpecLayout):
    """An ISPRS dataset: its spec and the quirks of its archives."""

    image_archive = None  # the archive holding the images (a folder name inside --src)

    def __init__(self, name):
        super().__init__(builtin_spec(name))
        self.train_tiles = list(self.spec.splits["train"][0]["tiles"])
        self.test_tiles = list(self.spec.splits["test"][0]["tiles"])
        self.label_folders = {kind: self._folder(p) for kind, p in self.spec.label_files.items()}
        self.label_archives = dict(self.label_folders)  # archives that hold only labels

    @staticmethod
    def _folder(pattern):
        return pattern.rsplit("/", 1)[0]

    def image_folder(self, channels):
        return self._folder(self.spec.images[channels])

    def image_file(self, tile, channels):
        return self.spec.images[channels].rsplit("/", 1)[1].replace("{tile}", tile)

    def label_file(self, tile, kind):
        return self.spec.label_files[kind].rsplit("/", 1)[1].replace("{tile}", tile)

    def wanted_folders(self):
        return {self.image_archive, *super().wanted_folders()}

    def check_variants(self, source, channels, test_labels):
        image_folder = self.image_folder(channels)
        if not source.has_folder(image_folder):
            raise UserError(f"no image folder '{image_folder}' under --src {source.src} (expected from "
                            f"{self.archive_hint(image_folder)}); put the downloaded {self.name} "
                            f"archives there, zipped or extracted")
        complete_folder = self.label_folders["complete"]
        if not source.has_folder(complete_folder):
            raise UserError(f"no label folder '{complete_folder}' under --src {source.src} (expected "
                            f"from {self.archive_hint(complete_folder)}); download the complete "
                            f"ground truth of {self.name}")
        if test_labels is None:  # eroded when that archive is there (the ISPRS convention)
            test_labels = "eroded" if source.has_folder(self.label_folders["eroded"]) else "complete"
            if test_labels == "complete":
                print(f"note: no '{self.label_folders['eroded']}' under --src: test labels are the "
                      f"complete ones", flush=True)
        elif test_labels not in self.label_folders:
            raise UserError(f"--test_labels {test_labels}: choose eroded or complete")
        elif not source.has_folder(self.label_folders[test_labels]):
            raise UserError(f"--test_labels {test_labels}: no folder '{self.label_folders[test_labels]}' "
                            f"under --src {source.src}; add "
                            f"{self.archive_hint(self.label_folders[test_labels])} or choose "
                            f"--test_labels complete")
        return test_labels

    def no_tiles(self, source, split, channels):
        tiles = self.train_tiles if split == "train" else self.test_tiles
        image_folder = self.image_folder(channels)
        raise UserError(f"no official {split} tile of {self.name} found in '{image_folder}' "
                        f"under --src {source.src} (expected e.g. "
                        f"{image_folder}/{self.image_file(tiles[0], channels)})")

    def check_label(self, source, label_loc, raw_label):
        if raw_label.shape[2] < 3:
            raise UserError(f"{source.describe(label_loc)} is not an RGB colour label image "
                            f"(shape {raw_label.shape}); use the official ISPRS label archive")
        if raw_label.dtype.name != "uint8":
            raise UserError(f"{source.describe(label_loc)} has dtype {raw_label.dtype}; expected uint8 "
                            f"colour labels")


class VaihingenLayout(ISPRSLayout):
    """ISPRS Vaihingen: 33 areas of IR-R-G true orthophotos at 9 cm."""

    image_archive = "ISPRS_semantic_labeling_Vaihingen"

    def __init__(self):
        super().__init__("vaihingen")

    def archive_hint(self, folder):
        if folder == "top":
            return f"{self.image_archive}.zip (folder top/)"
        return f"{folder}.zip"


class PotsdamLayout(ISPRSLayout):
    """ISPRS Potsdam: 38 tiles of 6000 x 6000 px at 5 cm; RGB, IRRG and RGBIR orthophotos (RGB by default,
    like the MiCro paper and most Potsdam CISS work)."""

    image_archive = "Potsdam"

    def __init__(self):
        super().__init__("potsdam")
        self.image_folders = {channels: self.image_folder(channels) for channels in self.channel_choices}

    def archive_hint(self, folder):
        return f"{folder}.zip (inside {self.image_archive}.zip)"


VAIHINGEN = VaihingenLayout()
POTSDAM = PotsdamLayout()
LAYOUTS = {VAIHINGEN.name: VAIHINGEN, POTSDAM.name: POTSDAM}
NUM_BANDS = {"IRRG": 3, "RGB": 3, "RGBIR": 4}
