"""Convert a torchvision-format ResNet checkpoint (conv1, bn1, layerN.i..., fc) to MiCro's backbone layout.

    python pretrained/convert_torchvision.py SRC.pth DST.pth.tar --arch resnet101 [--norm_act iabn_sync]

torchvision itself is never imported: only the checkpoint's key names are used.
"""
import argparse
import os
from pathlib import Path

import torch

from models import ARCHITECTURES, NORM_ACT_NAMES, convert_torchvision_state_dict, read_state_dict
from utils.errors import UserError, exit_on_user_error


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="torchvision-format ResNet checkpoint (e.g. resnet101-63fe2227.pth)")
    parser.add_argument("dst", help="output file, e.g. pretrained/resnet101_iabn_sync.pth.tar")
    parser.add_argument("--arch", required=True, choices=list(ARCHITECTURES))
    parser.add_argument("--norm_act", choices=list(NORM_ACT_NAMES), default=None,
                        help="target --norm_act (default: taken from DST's name <arch>_<norm_act>.pth.tar, "
                             "else iabn_sync); in-place ABN targets get BN weights w -> w - eps")
    return parser.parse_args(argv)


def _norm_act_from_name(dst, arch):
    name = Path(dst).name
    for norm_act in NORM_ACT_NAMES:
        if name == f"{arch}_{norm_act}.pth.tar":
            return norm_act
    return "iabn_sync"


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    if not os.path.isfile(args.src):
        raise UserError(f"{args.src} does not exist; give the torchvision checkpoint to convert")
    norm_act = args.norm_act or _norm_act_from_name(args.dst, args.arch)
    source = read_state_dict(args.src)
    try:
        state, clamped = convert_torchvision_state_dict(source, args.arch, norm_act)
    except UserError as err:
        raise err.reworded(arch=f"--arch {args.arch}", which="--arch") from None
    dst = Path(args.dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    torch.save({"state_dict": state, "source": str(args.src), "arch": args.arch, "norm_act": norm_act}, tmp)
    os.replace(tmp, dst)  # never leave a half-written weight file behind
    print(f"wrote {dst}: {len(state)} tensors for {args.arch} ({norm_act})")
    if clamped:
        print(f"note: {clamped} BN weights below eps were clamped (in-place ABN scales by |w| + eps)")
    return dst


if __name__ == "__main__":
    main()
