"""Process the ISPRS Potsdam archives into crops, meta.json and split files (docs/data.md#processing).

    python process_data/data_process_potsdam.py --src RAW --dst DATA_ROOT [--crop_size 512] [--stride 512]
        [--test_labels eroded|complete] [--seed 42] [--min_pixels N] [--splits_only] [--png]
        [--channels RGB|IRRG|RGBIR]   (default RGB, as in the MiCro paper)

--src holds the official archives, zipped or extracted; the result goes to DATA_ROOT/potsdam/.
--splits_only rewrites the split files from DATA_ROOT/potsdam/meta.json without reading images.
--png also writes PNG previews of the crops (training reads the crop store, images.npy / labels.npy).
"""

from process_data.isprs_processing import POTSDAM
from process_data.tile_processing import main_for

main = main_for(POTSDAM)

if __name__ == "__main__":
    main()
