"""Process the OpenEarthMap archive into crops, meta.json and split files (docs/data.md#openearthmap).

    python process_data/data_process_openearthmap.py --src RAW --dst DATA_ROOT [--crop_size 512] [--stride 512]
        [--seed 42] [--min_pixels N] [--task_file F] [--splits_only] [--png]

--src holds OpenEarthMap_wo_xBD/ as unpacked (zipped works too): `<region>/images/<tile>.tif`,
`<region>/labels/<tile>.tif`, train.txt and val.txt. The tiles of train.txt are the train split, those of
val.txt the test split; listed tiles without an image (the xBD ones you have not added) are skipped. The result
goes to DATA_ROOT/openearthmap/; the dataset is utils/specs/openearthmap.json, its tasks
utils/specs/openearthmap.tasks.json.
"""

from process_data.tile_processing import main_for

main = main_for("openearthmap")

if __name__ == "__main__":
    main()
