"""Process any tiled dataset described by a spec file into crops, meta.json and split files
(docs/data.md#your-own-dataset).

    python process_data/process_dataset.py --spec SPEC.json --src RAW --dst DATA_ROOT [--task_file F]
        [--crop_size N] [--stride N] [--channels NAME] [--test_labels VARIANT] [--seed 42] [--min_pixels N]
        [--splits_only] [--png]

The result goes to DATA_ROOT/<the spec's name>/; train with `run.py --dataset <name> --task_file F --task T`.
The spec's own task file (its "tasks") and every --task_file get their split files.
"""
from process_data.tile_processing import SpecLayout, build_parser, run_command
from utils.dataset_spec import load_spec
from utils.errors import exit_on_user_error


@exit_on_user_error
def main(argv=None):
    args = build_parser(None, spec_option=True).parse_args(argv)
    layout = SpecLayout(load_spec(args.spec))
    if args.channels is not None and args.channels not in layout.channel_choices:
        from utils.errors import UserError
        raise UserError(f"--channels {args.channels}: {layout.name} has {', '.join(layout.channel_choices)}")
    return run_command(layout, args)


if __name__ == "__main__":
    main()
