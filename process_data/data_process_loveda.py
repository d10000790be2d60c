"""Process the LoveDA archives into crops, meta.json and split files (docs/data.md#loveda).

    python process_data/data_process_loveda.py --src RAW --dst DATA_ROOT [--crop_size 512] [--stride 512]
        [--seed 42] [--min_pixels N] [--task_file F] [--splits_only] [--png]

--src holds Train/ and Val/ as unpacked from Train.zip and Val.zip (zipped works too; Test/ has no labels and is
not used): `{Train,Val}/{Urban,Rural}/{images_png,masks_png}/<id>.png`. Val is the test split. The result goes
to DATA_ROOT/loveda/; the dataset is utils/specs/loveda.json, its tasks utils/specs/loveda.tasks.json.
"""

from process_data.tile_processing import main_for

main = main_for("loveda")

if __name__ == "__main__":
    main()
