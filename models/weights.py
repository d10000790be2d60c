"""ImageNet weights for the backbones: where they live, how they load, torchvision-format conversion."""
import pickle
import re
from pathlib import Path

import torch

from utils.errors import UserError

from .norm_act import BN_EPS, NORM_ACT_NAMES, norm_act_factory
from .resnet import ARCHITECTURES, resnet

REPO_ROOT = Path(__file__).resolve().parents[1]
PRETRAINED_DIR = REPO_ROOT / "pretrained"

# in-place ABN weights (scale |w|+eps, leaky ReLU) serve both in-place ABN variants
_SAME_WEIGHTS = {"iabn": ("iabn", "iabn_sync"), "iabn_sync": ("iabn_sync", "iabn")}


class WeightsError(UserError):
    """ImageNet weights that cannot be used: missing, unreadable or made for another network. Starting from
    random weights fixes it too; a caller that offers that adds it (`reworded`, utils/errors.py)."""


def default_pretrained_path(backbone, norm_act):
    """MiB's file name: <repo>/pretrained/<backbone>_<norm_act>.pth.tar."""
    return PRETRAINED_DIR / f"{backbone}_{norm_act}.pth.tar"


def find_default_pretrained(backbone, norm_act):
    """The existing default weight file (iabn and iabn_sync share files), or UserError naming the expected path."""
    candidates = [default_pretrained_path(backbone, name) for name in _SAME_WEIGHTS.get(norm_act, (norm_act,))]
    for path in candidates:
        if path.is_file():
            return path
    raise WeightsError("ImageNet weights for {backbone} {norm_act} not found: expected {path}; put them there "
                       "(see pretrained/README.md)", backbone=backbone, norm_act=f"({norm_act})",
                       path=candidates[0])


def resolve_pretrained_path(path):
    """A user-given weight path: as given (cwd), else relative to the repository root."""
    path = Path(path).expanduser()
    for candidate in (path, REPO_ROOT / path):
        if candidate.is_file():
            return candidate
    raise WeightsError(f"pretrained weights {path} do not exist; give an existing file")


def read_state_dict(path):
    """Load a checkpoint file as a flat {name: tensor} dict (unwraps state_dict/model, strips `module.`)."""
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # old checkpoints may pickle extra objects; the user put this file here on purpose
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any failure means an unreadable file
        raise WeightsError(f"{path} cannot be read as a PyTorch checkpoint ({type(err).__name__}); "
                           "replace the file") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
            break
    if not isinstance(checkpoint, dict) or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in checkpoint.items()):
        raise WeightsError(f"{path} does not hold a state dict of tensors; replace the file")
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def _is_torchvision_format(state_dict):
    return "conv1.weight" in state_dict and any(k.startswith("layer1.") for k in state_dict)


FIRST_CONV = "mod1.conv1.weight"
RED_BAND = 0  # band whose ImageNet filters an extra band (the infrared of RGBIR) gets


def inflate_first_conv(weight, in_channels, source_band=RED_BAND):
    """[out, 3, k, k] ImageNet filters -> [out, in_channels, k, k]: the 3 bands kept, every further
    band (RGBIR's infrared) a copy of the `source_band` (red) filters, as MiB-CD does. Unscaled."""
    have = weight.shape[1]
    if in_channels <= have:
        return weight[:, :in_channels]
    extra = weight[:, source_band:source_band + 1].expand(-1, in_channels - have, -1, -1)
    return torch.cat([weight, extra], dim=1).contiguous()


def load_pretrained(body, path, backbone="the backbone"):
    """Load ImageNet weights into `body` (`backbone`: its name in messages); any key or shape mismatch is a
    WeightsError naming the file.

    A body with more input bands than the weights (RGBIR) gets its first convolution inflated
    (`inflate_first_conv`)."""
    state = read_state_dict(path)
    # the in-place ABN ImageNet checkpoints carry their classifier; the body has none
    state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    bands = getattr(body, "in_channels", 3)
    if FIRST_CONV in state and state[FIRST_CONV].dim() == 4 and state[FIRST_CONV].shape[1] == 3 and bands > 3:
        state[FIRST_CONV] = inflate_first_conv(state[FIRST_CONV], bands)
    if _is_torchvision_format(state):
        raise UserError(f"{path} holds torchvision-format ResNet weights; convert them with "
                        f"`python pretrained/convert_torchvision.py {path} <output>.pth.tar --arch <resnetXX>` "
                        "(see pretrained/README.md)")
    expected = body.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        problems = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                problems.append(f"{len(keys)} {what} (e.g. {keys[0]})")
        raise WeightsError("{path} does not match {backbone}: {problems}; use weights made for this backbone "
                           "(see pretrained/README.md)", path=path, backbone=backbone, problems=", ".join(problems))
    body.load_state_dict(state, strict=True)
    return body


# torchvision key -> ours; L = stage (1..4) -> mod L+1, B = block index (0-based) -> block B+1
_TORCHVISION_RULES = [
    (re.compile(r"^conv1\.weight$"), lambda m: "mod1.conv1.weight"),
    (re.compile(r"^bn1\.(\w+)$"), lambda m: f"mod1.bn1.{m[1]}"),
    (re.compile(r"^layer(\d)\.(\d+)\.(conv\d|bn\d)\.(\w+)$"),
     lambda m: f"mod{int(m[1]) + 1}.block{int(m[2]) + 1}.convs.{m[3]}.{m[4]}"),
    (re.compile(r"^layer(\d)\.(\d+)\.downsample\.0\.weight$"),
     lambda m: f"mod{int(m[1]) + 1}.block{int(m[2]) + 1}.proj_conv.weight"),
    (re.compile(r"^layer(\d)\.(\d+)\.downsample\.1\.(\w+)$"),
     lambda m: f"mod{int(m[1]) + 1}.block{int(m[2]) + 1}.proj_bn.{m[3]}"),
]
_BN_WEIGHT = re.compile(r"(^|\.)(bn\d|proj_bn)\.weight$")


def convert_torchvision_state_dict(state_dict, arch, norm_act="iabn_sync", eps=BN_EPS):
    """Map torchvision ResNet keys to ours and check them against `arch`.

    For in-place ABN targets the BN weight w becomes max(w, eps) - eps, so that in-place
    ABN's scale |w'| + eps equals w (exact for w >= eps; smaller/negative w are clamped).
    Returns (state_dict, number of clamped BN weights).
    """
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown arch {arch!r}; use one of {', '.join(ARCHITECTURES)}")
    if norm_act not in NORM_ACT_NAMES:
        raise UserError(f"unknown norm_act {norm_act!r}; use one of {', '.join(NORM_ACT_NAMES)}")
    converted, unknown = {}, []
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.startswith("fc."):
            continue  # ImageNet classifier
        for pattern, rename in _TORCHVISION_RULES:
            match = pattern.match(key)
            if match:
                converted[rename(match)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise UserError(f"{len(unknown)} keys are not torchvision ResNet keys (e.g. {unknown[0]}); "
                        "give a torchvision-format ResNet checkpoint")
    clamped = 0
    if norm_act in ("iabn", "iabn_sync"):
        for key in [k for k in converted if _BN_WEIGHT.search(k)]:
            weight = converted[key]
            clamped += int((weight < eps).sum())
            converted[key] = weight.clamp(min=eps) - eps
    reference = resnet(arch, norm_act_factory("abn")).state_dict()
    missing = [k for k in reference if k not in converted and not k.endswith("num_batches_tracked")]
    extra = [k for k in converted if k not in reference]
    wrong_shape = [k for k in converted if k in reference and converted[k].shape != reference[k].shape]
    if missing or extra or wrong_shape:
        example = (missing or extra or wrong_shape)[0]
        raise UserError("the weights do not match {arch}: {counts} (e.g. {example}); check {which}", arch=arch,
                        counts=f"{len(missing)} missing, {len(extra)} extra, {len(wrong_shape)} wrong-shape keys",
                        example=example, which="the architecture")
    return converted, clamped
