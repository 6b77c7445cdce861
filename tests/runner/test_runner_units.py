"""Small pieces of the runner: IDX reading, channel matching, dataset builders' errors,
tracking.flatten, and torchvision models from local checkpoints."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from qat_runner import data as qdata
from qat_runner import models, tracking
from qat_runner.config import ConfigError
from helpers.runner import write_fashion_root, write_idx

# --------------------------------------------------------------------------------------------
# read_idx


@pytest.mark.parametrize("name", ["images-idx3-ubyte.gz", "images-idx3-ubyte"])
def test_read_idx_images(tmp_path, name):
    array = np.random.default_rng(1).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    path = write_idx(tmp_path / name, array)
    read = qdata.read_idx(path)
    assert read.dtype == np.uint8
    assert read.shape == (5, 28, 28)
    np.testing.assert_array_equal(read, array)


@pytest.mark.parametrize("name", ["labels-idx1-ubyte.gz", "labels-idx1-ubyte"])
def test_read_idx_labels(tmp_path, name):
    labels = np.array([3, 1, 4, 1, 5, 9, 2, 6], dtype=np.uint8)
    read = qdata.read_idx(write_idx(tmp_path / name, labels))
    assert read.shape == (8,)
    np.testing.assert_array_equal(read, labels)


@pytest.mark.parametrize("magic", [bytes([0, 0, 0x0D, 3]),  # float32 IDX: not the MNIST family
                                   b"\x89PNG"])
def test_read_idx_bad_magic(tmp_path, magic):
    path = tmp_path / "bogus-idx3-ubyte"
    path.write_bytes(magic + (2).to_bytes(4, "big") * 3 + bytes(8))
    with pytest.raises(ConfigError) as info:
        qdata.read_idx(path)
    assert str(path) in str(info.value)


def test_fashion_mnist_builder_on_synthetic_root(tmp_path):
    root = write_fashion_root(tmp_path / "fm", n_train=20, n_test=10, gz=False)  # plain files too
    splits = qdata.fashion_mnist(str(root), channels=1, image_size=28, train_limit=8)
    assert (len(splits.train), len(splits.test)) == (8, 10)
    x, y = splits.train[3]
    assert tuple(x.shape) == (1, 28, 28) and x.dtype == torch.float32
    assert y == 3


def test_fashion_mnist_missing_root(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError) as info:
        qdata.fashion_mnist(str(missing))
    assert "dataset.root" in str(info.value) and str(missing) in str(info.value)


def test_fashion_mnist_missing_file(tmp_path):
    root = write_fashion_root(tmp_path / "fm")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ConfigError) as info:
        qdata.fashion_mnist(str(root))
    assert "t10k-labels-idx1-ubyte" in str(info.value)


def test_imagefolder_builder_errors(tmp_path):
    with pytest.raises(ConfigError, match="dataset.root"):
        qdata.imagefolder(None, num_classes=2)
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(ConfigError, match="val/"):
        qdata.imagefolder(str(tmp_path), num_classes=1)


def test_imagefolder_fixed_transform_for_mnns_recipe(tmp_path):
    """augment=false: train and test see the same deterministic centre crop (MNN's recipe)."""
    from helpers.runner import make_imagefolder

    root = make_imagefolder(tmp_path / "imgs")
    fixed = qdata.imagefolder(str(root), num_classes=2, image_size=8, augment=False)
    assert fixed.train.transform is fixed.test.transform
    first = fixed.train[0][0]
    assert first.shape == (3, 8, 8) and torch.equal(first, fixed.train[0][0])  # no random crop or flip
    augmented = qdata.imagefolder(str(root), num_classes=2, image_size=8)
    assert augmented.train.transform is not augmented.test.transform


# --------------------------------------------------------------------------------------------
# MatchChannels


def test_match_channels_grey_to_rgb():
    grey = torch.rand(1, 5, 7)
    out = qdata.MatchChannels(3)(grey)
    assert out.shape == (3, 5, 7)
    for c in range(3):
        assert torch.equal(out[c], grey[0])


def test_match_channels_batched_and_identity():
    batch = torch.rand(4, 1, 6, 6)
    assert qdata.MatchChannels(3)(batch).shape == (4, 3, 6, 6)
    rgb = torch.rand(3, 6, 6)
    assert qdata.MatchChannels(3)(rgb) is rgb


def test_match_channels_rgb_to_grey():
    rgb = torch.rand(3, 4, 4)
    out = qdata.MatchChannels(1)(rgb)
    assert out.shape == (1, 4, 4)
    torch.testing.assert_close(out[0], rgb.mean(dim=0))


def test_match_channels_impossible():
    with pytest.raises(ConfigError):
        qdata.MatchChannels(3)(torch.rand(2, 4, 4))


# --------------------------------------------------------------------------------------------
# tracking.flatten


def test_flatten_nested():
    tree = {"quant": {"bits": 8, "method": {"name": "x"}}, "seed": 0, "sizes": [1, 2]}
    assert tracking.flatten(tree) == {"quant.bits": 8, "quant.method.name": "x", "seed": 0,
                                      "sizes": [1, 2]}


def test_flatten_prefix_and_flat_input():
    assert tracking.flatten({"a": 1}, prefix="p.") == {"p.a": 1}
    assert tracking.flatten({}) == {}


def test_check_server_is_noop_for_sqlite():
    tracking.check_server("sqlite:///nowhere/mlflow.db")  # no network, no error


def test_check_server_fails_fast_for_dead_http():
    with pytest.raises(ConfigError, match="tracking.uri"):
        tracking.check_server("http://127.0.0.1:9", timeout=2.0)


# --------------------------------------------------------------------------------------------
# models.replace_head


def test_replace_head_resnet():
    model = torchvision.models.resnet18(num_classes=10)
    body = model.layer1[0].conv1.weight.detach().clone()
    out = models.replace_head(model, 5)
    assert out is model
    assert isinstance(model.fc, nn.Linear)
    assert (model.fc.in_features, model.fc.out_features) == (512, 5)
    assert torch.equal(model.layer1[0].conv1.weight, body)
    assert model.eval()(torch.rand(1, 3, 32, 32)).shape == (1, 5)


def test_replace_head_nested_and_noop():
    model = models.lenet(num_classes=10, in_channels=1, image_size=8)
    head = model.classifier[3]
    models.replace_head(model, 10)
    assert model.classifier[3] is head, "same class count: the head is kept"
    models.replace_head(model, 3)
    assert model.classifier[3] is not head
    assert model.classifier[3].out_features == 3 and model.classifier[3].in_features == 64
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 3)


def test_replace_head_without_linear():
    with pytest.raises(ConfigError):
        models.replace_head(nn.Sequential(nn.Conv2d(1, 2, 3)), 4)


def test_lenet_too_small():
    with pytest.raises(ConfigError, match="image_size"):
        models.lenet(image_size=2)


# --------------------------------------------------------------------------------------------
# models.torchvision_classifier with local checkpoints


@pytest.fixture(scope="module")
def resnet18_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    path = tmp_path_factory.mktemp("ckpt") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


def test_checkpoint_same_classes(resnet18_ckpt):
    path, state = resnet18_ckpt
    model = models.torchvision_classifier("resnet18", num_classes=10, weights=str(path))
    assert model.fc.out_features == 10
    torch.testing.assert_close(model.fc.weight, state["fc.weight"])
    torch.testing.assert_close(model.conv1.weight, state["conv1.weight"])


def test_checkpoint_head_replaced(resnet18_ckpt):
    path, state = resnet18_ckpt
    model = models.torchvision_classifier("resnet18", num_classes=5, weights=str(path))
    assert model.fc.out_features == 5
    torch.testing.assert_close(model.conv1.weight, state["conv1.weight"])
    torch.testing.assert_close(model.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    assert model.eval()(torch.rand(1, 3, 32, 32)).shape == (1, 5)


def test_checkpoint_wrapped_state_dict(tmp_path, resnet18_ckpt):
    _, state = resnet18_ckpt
    path = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    model = models.torchvision_classifier("resnet18", num_classes=10, weights=str(path))
    torch.testing.assert_close(model.conv1.weight, state["conv1.weight"])


def test_checkpoint_corrupt(tmp_path):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(b"this is not a torch checkpoint\x00\x01")
    with pytest.raises(ConfigError) as info:
        models.torchvision_classifier("resnet18", num_classes=10, weights=str(path))
    assert str(path) in str(info.value)
    assert "model.weights" in str(info.value)


def test_checkpoint_of_another_model(tmp_path):
    path = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v2(num_classes=10).state_dict(), path)
    with pytest.raises(ConfigError) as info:
        models.torchvision_classifier("resnet18", num_classes=10, weights=str(path))
    message = str(info.value)
    assert str(path) in message and "resnet18" in message


def test_checkpoint_missing_file(tmp_path):
    path = tmp_path / "absent.pth"
    with pytest.raises(ConfigError) as info:
        models.torchvision_classifier("resnet18", num_classes=10, weights=str(path))
    assert str(path) in str(info.value)


def test_unknown_classifier_name():
    with pytest.raises(ConfigError) as info:
        models.torchvision_classifier("not_a_model", num_classes=10)
    assert "not_a_model" in str(info.value) and "resnet18" in str(info.value)


def test_unknown_weights_name():
    with pytest.raises(ConfigError) as info:
        models.torchvision_classifier("resnet18", num_classes=10, weights="NO_SUCH_WEIGHTS")
    assert "NO_SUCH_WEIGHTS" in str(info.value) and "IMAGENET1K_V1" in str(info.value)


def test_named_weights_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(ConfigError) as info:
        models.torchvision_classifier("mobilenet_v2", num_classes=10, weights="IMAGENET1K_V1")
    message = str(info.value)
    assert str(tmp_path / "torch_home") in message, "names where the weights file should be"
    assert "model.weights=" in message


def test_weights_eval_transform():
    assert models.weights_eval_transform("resnet18", None) is None
    assert models.weights_eval_transform("resnet18", "/some/where/ckpt.pth") is None
    assert models.weights_eval_transform("resnet18", "IMAGENET1K_V1") is not None


# --------------------------------------------------------------------------------------------
# image size checks and the non-finite loss message


@pytest.mark.parametrize(("name", "size", "expected"), [
    ("alexnet", 16, r"dataset\.image_size=16 is too small for alexnet: use dataset\.image_size=63 or more"),
    ("vit_b_16", 32, r"dataset\.image_size=32 does not work with vit_b_16: use dataset\.image_size=224, "
                     r"the one size it is built for"),
])
def test_classifier_refuses_an_image_size_it_cannot_take(name, size, expected):
    with pytest.raises(ConfigError, match=expected):
        models.torchvision_classifier(name, num_classes=10, image_size=size)


def test_classifier_accepts_a_size_that_works():
    model = models.torchvision_classifier("squeezenet1_0", num_classes=10, image_size=21)
    assert model.training, "the check leaves the model as it was built"
    with pytest.raises(ConfigError, match="use dataset.image_size=21 or more"):
        models.torchvision_classifier("squeezenet1_0", num_classes=10, image_size=20)


class _Scaled(nn.Module):
    """A linear classifier whose output is multiplied by `factor` (inf: not finite from the start)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.fc, self.factor = nn.Linear(4, 3), factor

    def forward(self, x):
        return self.fc(x) * self.factor


def _loader(batches: int = 20):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(batches)]


def test_non_finite_on_the_first_batch_does_not_blame_the_learning_rate():
    from qat_runner.train import NonFiniteLossError, train

    model = _Scaled(float("inf"))
    with pytest.raises(NonFiniteLossError, match=r"at step 1: .*first batch.*not optim\.lr") as err:
        train(model, _loader(), torch.optim.SGD(model.parameters(), lr=1e-3), 10, torch.device("cpu"), "QAT")
    assert "lower optim.lr" not in str(err.value)


def test_diverging_weights_blame_the_learning_rate():
    from qat_runner.train import NonFiniteLossError, train

    model = _Scaled(1e30)  # gradients of 1e30: one step at lr 1 makes the next logits overflow
    with pytest.raises(NonFiniteLossError, match=r"at step 2: .*lower optim\.lr \(now 1\)"):
        train(model, _loader(), torch.optim.SGD(model.parameters(), lr=1.0), 20, torch.device("cpu"), "QAT")
