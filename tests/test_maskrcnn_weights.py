"""torchvision's COCO Mask R-CNN releases load strictly; other files are named and refused.

The fixture is written the way the 2019 release ``maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth`` was
(torch 1.1 under Python 3): legacy non-zip serialisation, pickle protocol 2, the model's
``OrderedDict`` state dict with CPU storages and per-module version metadata, and exactly the
release's 307 tensors of a frozen-batch-norm model, under the names torchvision 0.3 gave them
(seeded random values).
"""

from __future__ import annotations

import re
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torchvision.models import resnet50
from torchvision.models.detection import (
    FasterRCNN,
    KeypointRCNN,
    MaskRCNN,
    fasterrcnn_resnet50_fpn_v2,
    maskrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn_v2,
)
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.mask_rcnn import (
    MaskRCNN_ResNet50_FPN_V2_Weights,
    MaskRCNN_ResNet50_FPN_Weights,
)
from torchvision.ops.misc import FrozenBatchNorm2d

from jregfix.errors import JregfixError
from jregfix.models.maskrcnn import TORCHVISION_FILE, build_maskrcnn, detect_people

SMALL = {"min_size": 64, "max_size": 96}


def keys_of(build, *args, **kwargs):
    """A network's state dict keys, built without allocating or initialising weights."""
    with torch.device("meta"):
        return list(build(*args, **kwargs).state_dict())


def frozen_backbone(seed: int):
    # What torchvision's maskrcnn_resnet50_fpn does when given pretrained weights.
    torch.manual_seed(seed)
    return _resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3)


def legacy_name(key):
    """torchvision 0.3 used bare convolutions where today's RPN head, FPN and mask head nest
    them in conv blocks (torchvision still renames these when loading old files)."""
    key = re.sub(r"^rpn\.head\.conv\.0\.0\.", "rpn.head.conv.", key)
    key = re.sub(r"^(backbone\.fpn\.(inner|layer)_blocks\.\d)\.0\.", r"\1.", key)
    return re.sub(
        r"^roi_heads\.mask_head\.(\d)\.0\.",
        lambda m: f"roi_heads.mask_head.mask_fcn{int(m[1]) + 1}.",
        key,
    )


def release_state(seed: int = 0):
    """``(as the release stores it, under today's names)`` with seeded values. Norm statistics
    span five decades of variance so that the epsilon (0 for these weights) shows."""
    state = MaskRCNN(frozen_backbone(seed), num_classes=91).state_dict()
    gen = torch.Generator().manual_seed(seed + 1)
    for key in [k for k in state if k.endswith(".running_var")]:
        prefix, n = key[: -len("running_var")], state[key].numel()
        var = 10.0 ** (-5 * torch.rand(n, generator=gen))
        state[prefix + "running_var"] = var
        state[prefix + "running_mean"] = 0.1 * torch.randn(n, generator=gen)
        state[prefix + "weight"] = var.sqrt() * (0.5 + torch.rand(n, generator=gen))
        state[prefix + "bias"] = 0.1 * torch.randn(n, generator=gen)
    legacy = OrderedDict((legacy_name(k), v) for k, v in state.items())
    # torch 1.1 records every module's version; none of the 2019 modules had a second one.
    modules = {k.rsplit(".", 1)[0] for k in legacy} | {""}
    modules |= {m.rsplit(".", i)[0] for m in modules for i in range(1, m.count(".") + 1)}
    legacy._metadata = OrderedDict((m, {"version": 1}) for m in sorted(modules))
    return legacy, state


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The file in torchvision's download cache under $TORCH_HOME, and the model built from it
    with no ``weights`` argument, as a user who let torchvision download it would."""
    legacy, state = release_state()
    home = tmp_path_factory.mktemp("torch")
    path = home / "hub" / "checkpoints" / TORCHVISION_FILE
    path.parent.mkdir(parents=True)
    torch.save(legacy, path, _use_new_zipfile_serialization=False)  # pickle protocol 2
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(home))
        patch.setattr(torch.hub, "_hub_dir", None)
        model = build_maskrcnn(**SMALL)
    yield path, legacy, state, model
    path.unlink()  # 178 MB


def image(seed=5, shape=(60, 80, 3)):
    return np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)


def to_tensor(im):
    return torch.from_numpy(im).permute(2, 0, 1).float() / 255


def few_boxes(model):
    """Fewer proposals and detections: the same computation, a fraction of the time."""
    model.rpn._pre_nms_top_n["testing"] = 200
    model.rpn._post_nms_top_n["testing"] = 50
    model.roi_heads.detections_per_img = 5
    return model


def test_release_key_set_and_file_format(release):
    path, legacy, _, _ = release
    keys = keys_of(lambda: MaskRCNN(frozen_backbone(1), num_classes=91))
    assert len(keys) == 307 and not [k for k in keys if "num_batches_tracked" in k]
    assert list(legacy) == [legacy_name(k) for k in keys]
    assert sum(legacy_name(k) != k for k in keys) == 26
    assert "roi_heads.mask_head.mask_fcn4.bias" in legacy and "rpn.head.conv.weight" in legacy
    raw = path.read_bytes()
    assert not zipfile.is_zipfile(path) and raw[:2] == b"\x80\x02"
    assert b"collections\nOrderedDict" in raw and b"torch._utils\n_rebuild_tensor_v2" in raw
    assert b"_metadata" in raw and b"mask_fcn1" in raw


def test_release_loads_strictly_and_matches_torchvision(release, monkeypatch):
    _, legacy, state, model = release
    loaded = model.state_dict()
    assert list(loaded) == list(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(frozen) == 53 and all(m.eps == 0.0 for m in frozen)

    # torchvision's own pretrained builder (a strict load), fed the file's tensors instead of
    # the download.
    monkeypatch.setattr(
        MaskRCNN_ResNet50_FPN_Weights, "get_state_dict", lambda self, *args, **kwargs: legacy
    )
    ref = maskrcnn_resnet50_fpn(weights=MaskRCNN_ResNet50_FPN_Weights.COCO_V1, **SMALL).eval()
    x = to_tensor(image())
    with torch.no_grad():
        ours, theirs = model.backbone(x[None]), ref.backbone(x[None])
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
        got, want = few_boxes(model)([x])[0], few_boxes(ref)([x])[0]
    assert len(want["boxes"]) == 5 and all(torch.equal(got[k], want[k]) for k in want)


def test_frozen_norm_equals_batchnorm_eval_without_epsilon(release):
    _, _, state, model = release
    x = to_tensor(image(6))[None]

    bn = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **SMALL).eval()
    norms = {name: m for name, m in bn.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert len(norms) == 53
    bn.load_state_dict(state | {k + ".num_batches_tracked": torch.tensor(0) for k in norms})

    def batchnorm_features(eps):
        for module in norms.values():
            module.eps = eps
        with torch.no_grad():
            return bn.backbone(x)

    with torch.no_grad():
        ours = model.backbone(x)
    same, default_eps = batchnorm_features(0.0), batchnorm_features(1e-5)
    for k in ours:
        assert torch.allclose(ours[k], same[k], rtol=1e-4, atol=1e-5 * same[k].abs().max())
    assert not all(torch.allclose(ours[k], default_eps[k], rtol=1e-3) for k in ours)


def test_release_segments_people(release):
    detections = detect_people(few_boxes(release[3]), [image(7)], torch.device("cpu"), 0.0)
    assert detections[0]["masks"].shape[1:] == (60, 80)


@pytest.mark.slow
def test_v2_release_loads(tmp_path, monkeypatch):
    torch.manual_seed(4)
    state = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None).state_dict()
    path = tmp_path / "maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth"
    torch.save(state, path)  # a 2022 file: zip serialisation
    model = build_maskrcnn(weights=path, **SMALL)
    assert isinstance(model.backbone.body.bn1, torch.nn.BatchNorm2d)
    monkeypatch.setattr(
        MaskRCNN_ResNet50_FPN_V2_Weights,
        "get_state_dict",
        lambda self, *args, **kwargs: dict(state),
    )
    ref = maskrcnn_resnet50_fpn_v2(weights=MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1, **SMALL).eval()
    x = to_tensor(image(8))
    with torch.no_grad():
        got, want = few_boxes(model)([x])[0], few_boxes(ref)([x])[0]
    assert len(want["boxes"]) and all(torch.equal(got[k], want[k]) for k in want)
    path.unlink()  # 185 MB


def other_networks():
    """Key sets of files a user might pass by mistake, and the words the error must use."""
    v1_keys = keys_of(lambda: MaskRCNN(frozen_backbone(0), num_classes=91))
    classifier = [k for k in keys_of(resnet50) if "num_batches_tracked" not in k]
    hmr = [k for k in classifier if not k.startswith("fc.")] + [
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
        "decpose.weight",
        "decpose.bias",
        "decshape.weight",
        "decshape.bias",
        "deccam.weight",
        "deccam.bias",
        "init_pose",
        "init_shape",
        "init_cam",
    ]
    return [
        ("Faster R-CNN (no mask head)", keys_of(lambda: FasterRCNN(frozen_backbone(0), 91))),
        ("Faster R-CNN v2", keys_of(fasterrcnn_resnet50_fpn_v2, weights_backbone=None)),
        ("Keypoint R-CNN", keys_of(lambda: KeypointRCNN(frozen_backbone(0), 2))),
        ("trainable BatchNorm2d", keys_of(maskrcnn_resnet50_fpn, weights_backbone=None)),
        ("ImageNet classifier", classifier),
        ("SPIN's HMR regressor", hmr),
        ("DataParallel", ["module." + k for k in v1_keys]),
        ("unrecognised state dict (1 tensors", ["conv1.weight"]),
    ]


def test_wrong_files_say_what_they_look_like(tmp_path):
    for i, (words, keys) in enumerate(other_networks()):
        path = tmp_path / f"wrong{i}.pth"
        state = {k: torch.zeros(1) for k in keys}
        torch.save({"model": state} if "decpose.weight" in state else state, path)
        with pytest.raises(JregfixError) as err:
            build_maskrcnn(weights=path, **SMALL)
        message = str(err.value)
        assert words in message and str(path) in message and TORCHVISION_FILE in message
        assert "\n" not in message


def test_broken_release_layouts_refused(tmp_path):
    keys = keys_of(lambda: MaskRCNN(frozen_backbone(0), num_classes=91))
    state = {k: torch.zeros(1) for k in keys}
    state[keys[10]] = torch.tensor([0.0, float("nan")])
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(JregfixError, match=rf"'{keys[10]}' holds NaN") as err:
        build_maskrcnn(weights=tmp_path / "nan.pth")
    assert "\n" not in str(err.value)

    del state[keys[10]]
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(JregfixError, match=rf"missing \['{keys[10]}'\]") as err:
        build_maskrcnn(weights=tmp_path / "short.pth")
    assert "wrong shape ['backbone.body.conv1.weight (1,) instead of (64, 3, 7, 7)'" in str(
        err.value
    )
