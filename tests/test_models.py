"""Backbones, norm_act implementations, pretrained loading/conversion, DeepLabV3 head, incremental model."""
import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import models
import models.weights as weights
from models import HAS_INPLACE_ABN, NORM_ACT_NAMES, build_backbone, norm_act_factory
from models.norm_act import PureInPlaceABN
from modules import DeeplabV3, IncrementalSegmentationModule, ModelOptions, make_model
from utils.errors import UserError

torch.set_num_threads(1)
REPO_ROOT = Path(__file__).resolve().parents[1]
needs_iabn = pytest.mark.skipif(not HAS_INPLACE_ABN, reason="inplace_abn is not installed")


def opts(**overrides):
    values = dict(backbone="resnet18", norm_act="iabn", output_stride=16, no_pretrained=True, pretrained=None)
    values.update(overrides)
    return ModelOptions(**values)


def randomise_norm_layers(module, seed=0):
    """Random affine params (some negative gammas) and running stats, so comparisons are not trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if hasattr(m, "running_var") and getattr(m, "weight", None) is not None:
                c = m.weight.numel()
                m.weight.copy_(torch.rand(c, generator=gen) * 1.5 - 0.5)
                m.weight[::3] = -m.weight[::3].abs() - 0.1  # in-place ABN scales by |gamma| + eps
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    return module


# ---------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("norm_act", NORM_ACT_NAMES)
@pytest.mark.parametrize("backbone", ["resnet18", "resnet34"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_backbone_output_shapes(backbone, norm_act, output_stride):
    body = build_backbone(backbone, norm_act=norm_act, output_stride=output_stride, pretrained=False)
    out = body(torch.randn(2, 3, 64, 64))
    assert body.out_channels == 512
    assert out.shape == (2, 512, 64 // output_stride, 64 // output_stride)
    assert torch.isfinite(out).all()


def test_output_stride_32_and_large_backbones():
    assert build_backbone("resnet18", "std", output_stride=32, pretrained=False)(torch.randn(2, 3, 64, 64)).shape \
        == (2, 512, 2, 2)
    for backbone in ("resnet50", "resnet101"):
        body = build_backbone(backbone, norm_act="iabn", output_stride=16, pretrained=False).eval()
        with torch.no_grad():
            out = body(torch.randn(1, 3, 32, 32))
        assert body.out_channels == 2048 and out.shape == (1, 2048, 2, 2)
    blocks = sum(1 for name, _ in body.named_children() if name.startswith("mod"))
    assert blocks == 5 and len(body.mod4) == 23  # resnet101 has 23 blocks in its third stage


def test_dilation_keeps_resolution_in_last_stages():
    body = build_backbone("resnet18", "std", output_stride=8, pretrained=False)
    assert body.mod4.block1.convs.conv1.stride == (1, 1) and body.mod4.block1.convs.conv1.dilation == (2, 2)
    assert body.mod5.block2.convs.conv2.dilation == (4, 4)
    assert body.mod3.block1.convs.conv1.stride == (2, 2)


def test_make_model_forward_contract():
    model = make_model(opts(), [3, 2])
    logits, features = model(torch.randn(2, 3, 64, 48))
    assert logits.shape == (2, 5, 64, 48)
    assert features["body"].shape == (2, 512, 4, 3) and features["pre_logits"].shape == (2, 256, 4, 3)
    assert model.num_classes == 5 and model.classes == [3, 2]
    assert [c.out_channels for c in model.cls] == [3, 2]
    # logits are the per-step classifiers on pre_logits, concatenated and bilinearly upsampled
    low_res = torch.cat([cls(features["pre_logits"]) for cls in model.cls], dim=1)
    expected = F.interpolate(low_res, size=(64, 48), mode="bilinear", align_corners=False)
    assert torch.allclose(logits, expected, atol=1e-5)
    assert model.head.rates == (6, 12, 18)
    assert make_model(opts(output_stride=8), [3]).head.rates == (12, 24, 36)


def test_bad_options_are_user_errors():
    for bad in (dict(backbone="resnet152"), dict(norm_act="gn"), dict(output_stride=4)):
        with pytest.raises(UserError, match=next(iter(bad))):
            make_model(opts(**bad), [3])


# ---------------------------------------------------------------------------------------------- head
def test_eval_pooling_size_is_sliding_average_with_replicate_padding():
    head = DeeplabV3(8, 16, 16, norm_act=norm_act_factory("std"), pooling_size=2).eval()
    x = torch.randn(1, 8, 4, 5)
    pooled = head._pool(x)
    assert pooled.shape == x.shape
    for i in range(4):
        for j in range(5):
            i0, j0 = min(i, 2), min(j, 3)  # windows start inside; the last row/column replicate
            assert torch.allclose(pooled[0, :, i, j], x[0, :, i0:i0 + 2, j0:j0 + 2].mean((1, 2)), atol=1e-6)
    head.train()
    assert torch.allclose(head._pool(x), x.mean((2, 3), keepdim=True))
    head.pooling_size = None
    head.eval()
    assert head._pool(x).shape == (1, 8, 1, 1)


# ---------------------------------------------------------------------------------------------- pretrained
def test_pretrained_with_module_prefix_and_state_dict_wrapper(tmp_path):
    source = randomise_norm_layers(build_backbone("resnet18", "iabn", pretrained=False), seed=1)
    state = {f"module.{k}": v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["module.classifier.fc.weight"] = torch.zeros(1000, 512)  # MiB's files carry the ImageNet classifier
    path = tmp_path / "weights.pth.tar"
    torch.save({"state_dict": state, "epoch": 90}, path)
    for pretrained in (path, str(path)):
        loaded = build_backbone("resnet18", "iabn", pretrained=pretrained)
        for key, value in source.state_dict().items():
            if not key.endswith("num_batches_tracked"):
                assert torch.equal(loaded.state_dict()[key], value), key
    bare = tmp_path / "bare.pth"
    torch.save(source.state_dict(), bare)  # no wrapper, no prefix
    loaded = build_backbone("resnet18", "std", pretrained=bare)
    assert torch.equal(loaded.mod5.block2.convs.conv2.weight, source.mod5.block2.convs.conv2.weight)


def test_default_pretrained_path_is_relative_to_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert weights.default_pretrained_path("resnet101", "iabn_sync") == \
        REPO_ROOT / "pretrained" / "resnet101_iabn_sync.pth.tar"


def test_missing_pretrained_file_names_the_path(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "PRETRAINED_DIR", tmp_path)
    with pytest.raises(UserError) as err:
        make_model(opts(no_pretrained=False, norm_act="std"), [3])
    assert str(tmp_path / "resnet18_std.pth.tar") in str(err.value) and "--no_pretrained" in str(err.value)
    with pytest.raises(UserError, match="nowhere.pth"):
        build_backbone("resnet18", "std", pretrained=tmp_path / "nowhere.pth")
    # iabn and iabn_sync share weight files
    torch.save(build_backbone("resnet18", "iabn", pretrained=False).state_dict(),
               tmp_path / "resnet18_iabn_sync.pth.tar")
    assert isinstance(make_model(opts(no_pretrained=False, norm_act="iabn"), [3]), IncrementalSegmentationModule)


def test_weight_errors_in_library_words_and_in_flags_from_make_model(tmp_path, monkeypatch):
    """build_backbone names its parameters; make_model, which reads the options, names the flags."""
    monkeypatch.setattr(weights, "PRETRAINED_DIR", tmp_path)
    expected = tmp_path / "resnet18_std.pth.tar"
    with pytest.raises(weights.WeightsError) as err:
        build_backbone("resnet18", "std")
    assert str(err.value) == (f"ImageNet weights for resnet18 (std) not found: expected {expected}; put them there "
                              f"(see pretrained/README.md)")
    with pytest.raises(UserError) as err:
        make_model(opts(no_pretrained=False, norm_act="std"), [3])
    assert str(err.value) == (f"ImageNet weights for --backbone resnet18 --norm_act std not found: expected "
                              f"{expected}; put them there (see pretrained/README.md) or pass --no_pretrained")
    wrong = tmp_path / "r34.pth"
    torch.save(build_backbone("resnet34", "std", pretrained=False).state_dict(), wrong)
    with pytest.raises(weights.WeightsError) as err:
        build_backbone("resnet18", "std", pretrained=wrong)
    assert str(err.value).startswith(f"{wrong} does not match resnet18: ") and "--" not in str(err.value)
    with pytest.raises(UserError) as err:
        make_model(opts(no_pretrained=False, norm_act="std", pretrained=wrong), [3])
    message = str(err.value)
    assert message.startswith(f"{wrong} does not match --backbone resnet18: ")
    assert message.endswith("; use weights made for this backbone (see pretrained/README.md) or pass --no_pretrained")
    with pytest.raises(UserError) as err:
        make_model(opts(no_pretrained=False, norm_act="std", pretrained=tmp_path / "none.pth"), [3])
    assert str(err.value) == f"pretrained weights {tmp_path / 'none.pth'} do not exist; give an existing file or " \
                             f"pass --no_pretrained"


def test_wrong_or_torchvision_keys_are_user_errors_naming_the_file(tmp_path):
    wrong = tmp_path / "r34.pth"
    torch.save(build_backbone("resnet34", "std", pretrained=False).state_dict(), wrong)
    with pytest.raises(UserError, match="r34.pth"):
        build_backbone("resnet18", "std", pretrained=wrong)
    tv = tmp_path / "tv.pth"
    torch.save(fake_torchvision_resnet("resnet18"), tv)
    with pytest.raises(UserError, match="convert_torchvision"):
        build_backbone("resnet18", "std", pretrained=tv)
    garbage = tmp_path / "garbage.pth.tar"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="garbage.pth.tar"):
        build_backbone("resnet18", "std", pretrained=garbage)


# ---------------------------------------------------------------------------------------------- torchvision
def fake_torchvision_resnet(arch, seed=0):
    """A torchvision-format ResNet state dict built by hand (torchvision's key names and shapes)."""
    blocks, bottleneck = {"resnet18": ((2, 2, 2, 2), False), "resnet50": ((3, 4, 6, 3), True)}[arch]
    gen = torch.Generator().manual_seed(seed)
    sd = {}

    def conv(name, out_c, in_c, k):
        sd[f"{name}.weight"] = torch.randn(out_c, in_c, k, k, generator=gen) * math.sqrt(2.0 / (in_c * k * k))

    def bn(name, c):
        sd[f"{name}.weight"] = torch.rand(c, generator=gen) + 0.5
        sd[f"{name}.bias"] = torch.randn(c, generator=gen) * 0.1
        sd[f"{name}.running_mean"] = torch.randn(c, generator=gen) * 0.1
        sd[f"{name}.running_var"] = torch.rand(c, generator=gen) + 0.5
        sd[f"{name}.num_batches_tracked"] = torch.tensor(100)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    expansion = 4 if bottleneck else 1
    inplanes = 64
    for layer, num in enumerate(blocks, 1):
        planes = 64 * 2 ** (layer - 1)
        for b in range(num):
            p = f"layer{layer}.{b}"
            if bottleneck:
                conv(f"{p}.conv1", planes, inplanes, 1), bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
                conv(f"{p}.conv3", planes * 4, planes, 1), bn(f"{p}.bn3", planes * 4)
            else:
                conv(f"{p}.conv1", planes, inplanes, 3), bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
            if b == 0 and (layer > 1 or inplanes != planes * expansion):
                conv(f"{p}.downsample.0", planes * expansion, inplanes, 1)
                bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    sd["fc.weight"] = torch.randn(1000, inplanes, generator=gen)
    sd["fc.bias"] = torch.zeros(1000)
    return sd


def torchvision_resnet18_forward(sd, x):
    """torchvision's ResNet-18 (BN + ReLU, stride 32) computed directly from its state dict."""
    def bn(name, t):
        return F.batch_norm(t, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                            sd[f"{name}.bias"], False, 0.0, 1e-5)

    x = F.max_pool2d(F.relu(bn("bn1", F.conv2d(x, sd["conv1.weight"], stride=2, padding=3))), 3, 2, 1)
    for layer in range(1, 5):
        for b in range(2):
            p = f"layer{layer}.{b}"
            stride = 2 if layer > 1 and b == 0 else 1
            out = F.relu(bn(f"{p}.bn1", F.conv2d(x, sd[f"{p}.conv1.weight"], stride=stride, padding=1)))
            out = bn(f"{p}.bn2", F.conv2d(out, sd[f"{p}.conv2.weight"], padding=1))
            if f"{p}.downsample.0.weight" in sd:
                x = bn(f"{p}.downsample.1", F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride))
            x = F.relu(out + x)
    return x


def load_converter():
    spec = importlib.util.spec_from_file_location("convert_torchvision",
                                                  REPO_ROOT / "pretrained" / "convert_torchvision.py")
    convert_torchvision = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert_torchvision)
    return convert_torchvision


def test_torchvision_converter_cli_reproduces_torchvision_forward(tmp_path, capsys):
    sd = fake_torchvision_resnet("resnet18")
    src, dst = tmp_path / "resnet18-tv.pth", tmp_path / "resnet18_std.pth.tar"
    torch.save({f"module.{k}": v for k, v in sd.items()}, src)
    load_converter().main([str(src), str(dst), "--arch", "resnet18"])  # norm_act std from the name
    assert "resnet18_std.pth.tar" in capsys.readouterr().out
    body = build_backbone("resnet18", "std", output_stride=32, pretrained=dst).eval()
    assert torch.equal(body.mod1.bn1.bias, sd["bn1.bias"])
    assert torch.equal(body.mod2.block1.convs.conv1.weight, sd["layer1.0.conv1.weight"])
    assert torch.equal(body.mod3.block1.proj_conv.weight, sd["layer2.0.downsample.0.weight"])
    assert torch.equal(body.mod3.block1.proj_bn.running_var, sd["layer2.0.downsample.1.running_var"])
    assert torch.equal(body.mod5.block2.convs.bn2.weight, sd["layer4.1.bn2.weight"])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(body(x), torchvision_resnet18_forward(sd, x), atol=1e-4)
    with pytest.raises(SystemExit) as exit_info:  # wrong --arch is one clear error, exit code 2
        load_converter().main([str(src), str(tmp_path / "x.pth.tar"), "--arch", "resnet34"])
    assert exit_info.value.code == 2 and "--arch resnet34" in capsys.readouterr().err


def test_torchvision_converter_bottleneck_and_inplace_abn_scale():
    sd = fake_torchvision_resnet("resnet50", seed=3)
    sd["bn1.weight"][:3] = -0.2  # in-place ABN cannot represent these: clamped
    sd["bn1.weight"][3] = 5e-6
    converted, clamped = models.convert_torchvision_state_dict(sd, "resnet50", norm_act="iabn_sync")
    assert clamped == 4
    eps = 1e-5
    assert torch.allclose(converted["mod1.bn1.weight"].abs() + eps, sd["bn1.weight"].clamp(min=eps))
    assert torch.equal(converted["mod2.block1.convs.conv3.weight"], sd["layer1.0.conv3.weight"])
    assert torch.equal(converted["mod2.block1.proj_bn.bias"], sd["layer1.0.downsample.1.bias"])
    assert torch.allclose(converted["mod5.block3.convs.bn3.weight"] + eps, sd["layer4.2.bn3.weight"])
    assert not any(k.startswith("fc.") for k in converted)
    # every non-fc torchvision tensor lands exactly once
    assert len(converted) == len(sd) - 2
    with pytest.raises(UserError, match="not torchvision"):
        models.convert_torchvision_state_dict({**sd, "extra.weight": torch.zeros(1)}, "resnet50")


# ---------------------------------------------------------------------------------------------- pure ABN
def test_pure_abn_env_flag(monkeypatch):
    monkeypatch.setenv("MICRO_PURE_ABN", "1")
    assert isinstance(norm_act_factory("iabn")(8), PureInPlaceABN)
    assert isinstance(norm_act_factory("iabn_sync")(8), PureInPlaceABN)
    monkeypatch.setenv("MICRO_PURE_ABN", "0")
    assert isinstance(norm_act_factory("iabn")(8), PureInPlaceABN) != HAS_INPLACE_ABN


@needs_iabn
@pytest.mark.parametrize("activation", ["leaky_relu", "identity"])
def test_pure_abn_reproduces_inplace_abn(activation):
    reference = randomise_norm_layers(norm_act_factory("iabn", pure=False)(6, activation=activation), seed=2)
    pure = norm_act_factory("iabn", pure=True)(6, activation=activation)
    assert type(pure) is not type(reference)
    pure.load_state_dict(reference.state_dict())
    assert (reference.weight < 0).any()
    for train in (True, False):
        reference.train(train), pure.train(train)
        x = torch.randn(4, 6, 5, 7) * 2 + 0.5
        x_ref, x_pure = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_ref = reference(x_ref.clone())  # in-place ABN overwrites its input
        out_pure = pure(x_pure)
        assert torch.allclose(out_ref, out_pure, atol=1e-5)
        grad_out = torch.randn_like(out_ref)
        out_ref.backward(grad_out), out_pure.backward(grad_out)
        assert torch.allclose(x_ref.grad, x_pure.grad, atol=1e-4)
        assert torch.allclose(reference.weight.grad, pure.weight.grad, atol=1e-4)
        assert torch.allclose(reference.bias.grad, pure.bias.grad, atol=1e-4)
        for buffer in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.allclose(getattr(reference, buffer).float(), getattr(pure, buffer).float(), atol=1e-6)
        reference.zero_grad(), pure.zero_grad()


@needs_iabn
def test_checkpoints_load_across_implementations(monkeypatch):
    native = randomise_norm_layers(build_backbone("resnet18", "iabn_sync", pretrained=False), seed=4)
    monkeypatch.setenv("MICRO_PURE_ABN", "1")
    pure = build_backbone("resnet18", "iabn_sync", pretrained=False)
    assert isinstance(pure.mod1.bn1, PureInPlaceABN) and not isinstance(native.mod1.bn1, PureInPlaceABN)
    state = {k: v for k, v in native.state_dict().items() if not k.endswith("num_batches_tracked")}
    pure.load_state_dict(state)  # also without num_batches_tracked
    x = torch.randn(2, 3, 64, 64)
    for train in (False, True):
        native.train(train), pure.train(train)
        assert torch.allclose(native(x), pure(x), atol=1e-4, rtol=1e-4)
    native.load_state_dict(pure.state_dict())  # and back


# ---------------------------------------------------------------------------------------------- DDP sync
def _sync_worker(rank, world_size, port, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        x = torch.randn(4, 5, 3, 3, generator=torch.Generator().manual_seed(0)) * 3 + 1
        local = x[2 * rank:2 * rank + 2].clone().requires_grad_()
        results = {}
        kinds = [("pure", True)] + ([("native", False)] if HAS_INPLACE_ABN else [])
        for kind, pure in kinds:
            layer = randomise_norm_layers(norm_act_factory("iabn_sync", pure=pure)(5), seed=5)  # WORLD by default
            out = layer(local.clone())
            (out * torch.arange(5.0).view(1, 5, 1, 1)).sum().backward()
            grads = torch.cat([layer.weight.grad, layer.bias.grad])
            dist.all_reduce(grads)  # what DDP does with parameter gradients (before averaging)
            results[kind] = dict(out=out.detach(), grads=grads, mean=layer.running_mean.clone(),
                                 var=layer.running_var.clone(), xgrad=local.grad.clone(),
                                 layer_type=type(layer).__name__)
            local.grad = None
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_iabn_sync_really_synchronises_over_two_processes(tmp_path, free_port):
    mp.spawn(_sync_worker, args=(2, free_port, str(tmp_path)), nprocs=2, join=True)
    x = (torch.randn(4, 5, 3, 3, generator=torch.Generator().manual_seed(0)) * 3 + 1).requires_grad_()
    single = randomise_norm_layers(norm_act_factory("iabn", pure=True)(5), seed=5)
    out = single(x)
    (out * torch.arange(5.0).view(1, 5, 1, 1)).sum().backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for kind in ranks[0]:
        assert ranks[0][kind]["layer_type"].endswith("Sync") or ranks[0][kind]["layer_type"] == "PureInPlaceABN"
        gathered = torch.cat([ranks[r][kind]["out"] for r in range(2)])
        assert torch.allclose(gathered, out.detach(), atol=1e-5), kind  # full-batch statistics
        assert torch.allclose(torch.cat([ranks[r][kind]["xgrad"] for r in range(2)]), x.grad, atol=1e-4), kind
        for r in range(2):
            assert torch.allclose(ranks[r][kind]["grads"], torch.cat([single.weight.grad, single.bias.grad]),
                                  atol=1e-4), kind
            assert torch.allclose(ranks[r][kind]["mean"], single.running_mean, atol=1e-6), kind
            assert torch.allclose(ranks[r][kind]["var"], single.running_var, atol=1e-5), kind


# ---------------------------------------------------------------------------------------------- incremental
class _TinyBody(nn.Module):
    out_channels = 8

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


def tiny_model(classes):
    return IncrementalSegmentationModule(_TinyBody(), nn.Conv2d(8, 16, 1), 16, classes)


def test_init_new_classifier_preserves_old_background_probability():
    torch.manual_seed(0)
    old = tiny_model([3])
    with torch.no_grad():
        old.cls[0].bias.normal_()
    new = tiny_model([3, 2])
    missing = new.load_state_dict(old.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["cls.1.bias", "cls.1.weight"]
    new.init_new_classifier()
    assert torch.allclose(new.cls[1].weight, old.cls[0].weight[0:1].expand(2, -1, -1, -1))
    assert torch.allclose(new.cls[1].bias, old.cls[0].bias[0] - math.log(3))
    assert torch.allclose(new.cls[0].bias[0], old.cls[0].bias[0] - math.log(3))
    x = torch.randn(2, 3, 16, 16) * 3
    with torch.no_grad():
        p_old = old(x)[0].softmax(1)
        p_new = new(x)[0].softmax(1)
    assert torch.allclose(p_new[:, 0] + p_new[:, 3] + p_new[:, 4], p_old[:, 0], atol=1e-5)
    assert torch.allclose(p_new[:, 1:3], p_old[:, 1:3], atol=1e-5)
    assert torch.allclose(p_new[:, 3], p_new[:, 0], atol=1e-5)  # shared equally


def test_freeze_body():
    model = tiny_model([3, 1, 1])
    model.freeze_body()
    assert not any(p.requires_grad for p in model.body.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    model.freeze_body(include_head=True)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        [f"cls.{i}.{w}" for i in range(3) for w in ("weight", "bias")]


@pytest.mark.parametrize("norm_act", ["iabn", "std"])
@pytest.mark.parametrize("keep_eval", [False, True])
def test_fix_bn_freezes_affine_parameters_and_running_stats_only_when_strict(norm_act, keep_eval):
    """fix_bn() (MiB's --fix_bn): norm affine parameters frozen, running statistics still updated in a train
    step; fix_bn(keep_eval=True) (--fix_bn_strict): both fixed, through the trainer's model.train()."""
    torch.manual_seed(0)

    def train_step(model):
        model.train()  # the trainer's model.train() at every epoch
        params = model.optimizer_parameters()
        optimizer = torch.optim.SGD(params, lr=0.1)
        logits, _ = model(torch.randn(2, 3, 32, 32))
        logits.logsumexp(1).mean().backward()
        optimizer.step()

    free = make_model(opts(norm_act=norm_act), [2])
    before = {k: v.clone() for k, v in free.state_dict().items()}
    train_step(free)
    assert not torch.equal(free.body.mod2.block1.convs.bn1.running_mean,
                           before["body.mod2.block1.convs.bn1.running_mean"])

    model = make_model(opts(norm_act=norm_act), [2])
    model.load_state_dict(before)
    model.fix_bn(keep_eval=keep_eval)
    train_step(model)
    after = model.state_dict()
    norm_modules = {name for name, m in model.named_modules() if isinstance(m, models.norm_act.NORM_LAYER_TYPES)}
    affine = [k for k in before if k.rsplit(".", 1)[0] in norm_modules and k.rsplit(".", 1)[1] in ("weight", "bias")]
    stats = [k for k in before
             if k.rsplit(".", 1)[0] in norm_modules and k.rsplit(".", 1)[1] in ("running_mean", "running_var")]
    assert len(affine) > 40 and len(stats) > 40  # every norm layer of the ResNet-18 body and the head
    for key in affine:
        assert torch.equal(after[key], before[key]), key
    changed_stats = [k for k in stats if not torch.equal(after[k], before[k])]
    if keep_eval:
        assert changed_stats == []
        assert not model.body.mod1.bn1.training and model.cls[0].training
    else:
        assert len(changed_stats) == len(stats)
        assert model.body.mod1.bn1.training
    assert not torch.equal(after["body.mod1.conv1.weight"], before["body.mod1.conv1.weight"])
    model.eval()
    assert not model.body.mod1.bn1.training


def test_optimizer_parameters_leave_out_the_body_under_freeze():
    model = tiny_model([3, 1])
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in model.optimizer_parameters()] == [n for n, _ in model.named_parameters()]
    kept = [names[id(p)] for p in model.optimizer_parameters(freeze_body=True)]
    assert kept == [n for n, _ in model.named_parameters() if not n.startswith("body.")]
    assert all(p.requires_grad for p in model.body.parameters())  # MiB still computes the body's gradient
