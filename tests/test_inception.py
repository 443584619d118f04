"""FID InceptionV3: parity with pytorch-fid through the converter and the weights file, both
preprocessing modes (TF1's resize checked against TensorFlow), and the errors for bad files.

No weights are downloaded: the reference is pytorch-fid's InceptionV3([3]) built on a random FID
Inception, calibrated so that its activations stay O(1) through all 94 conv layers (see
`torch_reference.random_fid_inception_state_dict`); that exercises every layer just as the real
weights would.
"""

from unittest import mock

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from torch_reference import import_torchvision

from fqgan_jax.frozen import inception, weights
from fqgan_jax.tools import convert

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SIZES = [(299, 299), (256, 256), (64, 80), (400, 333)]  # identity, upsample, small, downsample


@pytest.fixture(scope="module")
def fid():
    import_torchvision()  # pytorch_fid imports torchvision, whose C extension may not load
    import pytorch_fid.inception  # noqa: PLC0415

    return pytorch_fid.inception


@pytest.fixture(scope="module")
def torch_state(fid_inception_torch_state):
    return fid_inception_torch_state


@pytest.fixture(scope="module")
def torch_fid(fid, torch_state):
    """pytorch-fid's FID feature extractor (resize, 2x - 1, pool3) with the random weights."""
    with mock.patch.object(fid, "load_state_dict_from_url", return_value=torch_state):
        return fid.InceptionV3([3]).eval()


@pytest.fixture(scope="module")
def weights_path(fid_inception_weights):
    """The reference's weights saved as a .pth and converted by the CLI (tests/conftest.py)."""
    return fid_inception_weights


@pytest.fixture(scope="module")
def split_model(weights_path):
    return nnx.split(inception.load_inception(weights_path))


@pytest.fixture(scope="module")
def net(split_model):
    """A jitted preprocessed-images -> outputs of the converted float32 model: one compile for
    all input sizes, since `preprocess` (jitted apart) always gives 299 x 299."""
    graphdef, params = split_model
    forward = jax.jit(lambda params, x: nnx.merge(graphdef, params)(x))
    return lambda x: {key: np.asarray(value) for key, value in forward(params, x).items()}


preprocess = jax.jit(inception.preprocess, static_argnames="mode")


def uniform_images(height, width, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (2, height, width, 3)).astype(np.float32)


def to_torch(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.transpose(0, 3, 1, 2).copy())


@pytest.mark.parametrize("size", SIZES, ids=lambda size: f"{size[0]}x{size[1]}")
def test_matches_pytorch_fid(net, torch_fid, torch_state, size):
    images = uniform_images(*size)
    x299 = preprocess(images, mode="pytorch_fid")
    with torch.no_grad():
        resized = 2 * F.interpolate(to_torch(images), size=(299, 299), mode="bilinear",
                                    align_corners=False) - 1
        pool3 = torch_fid(to_torch(images))[0].reshape(2, -1)
        logits = F.linear(pool3, torch_state["fc.weight"], torch_state["fc.bias"])
        unbiased = pool3 @ torch_state["fc.weight"].T
    np.testing.assert_allclose(x299, resized.numpy().transpose(0, 2, 3, 1), rtol=0, atol=1e-6)
    ours = net(x299)
    assert {key: (value.shape, value.dtype) for key, value in ours.items()} == {
        "pool3": ((2, 2048), np.float32), "logits": ((2, 1008), np.float32),
        "logits_unbiased": ((2, 1008), np.float32)}
    # Not degenerate: features vary across channels and images, at a scale well above 1e-4.
    assert ours["pool3"].std(axis=1).min() > 0.1
    assert np.abs(ours["pool3"][0] - ours["pool3"][1]).mean() > 1e-2
    np.testing.assert_allclose(ours["pool3"], pool3.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(ours["logits"], logits.numpy(), rtol=0, atol=1e-3)
    np.testing.assert_allclose(ours["logits_unbiased"], unbiased.numpy(), rtol=0, atol=1e-3)


def test_tf1_preprocessing_matches_tensorflow():
    tf = pytest.importorskip("tensorflow")
    for size in [(256, 256), (400, 333)]:
        images = uniform_images(*size, seed=1)
        theirs = tf.compat.v1.image.resize_bilinear(
            255 * images, (299, 299), align_corners=False, half_pixel_centers=False).numpy()
        ours = np.asarray(preprocess(images, mode="tf1"))
        np.testing.assert_allclose(128 * ours + 128, theirs, rtol=0, atol=1e-4)
    images = uniform_images(299, 299, seed=2)  # no resize: the normalization alone
    np.testing.assert_allclose(preprocess(images, mode="tf1"), (255 * images - 128) / 128,
                               rtol=0, atol=1e-6)


def test_features_jits_with_a_static_graphdef(split_model, net):
    """`features` = preprocess + net, jitted with the graphdef static (it must hash)."""
    graphdef, params = split_model
    assert graphdef == inception.abstract_params()[0] and hash(graphdef)
    features = jax.jit(inception.features, static_argnums=0, static_argnames="mode")
    images = uniform_images(256, 256, seed=3)
    ours = features(graphdef, params, images, mode="tf1")
    expected = net(preprocess(images, mode="tf1"))
    for key, value in expected.items():
        np.testing.assert_allclose(ours[key], value, rtol=0, atol=1e-5, err_msg=key)


def test_preprocess_rejects_bad_input():
    with pytest.raises(ValueError, match="'pytorch_fid', 'tf1'"):
        inception.preprocess(np.zeros((1, 8, 8, 3), np.float32), mode="tf2")
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\], got shape \(8, 8, 3\)"):
        inception.preprocess(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(TypeError, match="float in \\[0, 1\\], got uint8"):
        inception.preprocess(np.zeros((1, 8, 8, 3), np.uint8))


def test_params_are_the_whole_state():
    """BatchNorm statistics are Params too, so the weights file is the complete network."""
    _, params, rest = nnx.split(nnx.eval_shape(lambda: inception.FIDInceptionV3(
        rngs=nnx.Rngs(0))), nnx.Param, ...)
    assert not jax.tree.leaves(rest)
    assert sum(leaf.size for leaf in jax.tree.leaves(params)) == 23_885_392


@pytest.mark.parametrize("key, path", [
    ("Conv2d_1a_3x3.conv.weight", ("Conv2d_1a_3x3", "conv", "kernel")),
    ("Mixed_5b.branch5x5_1.conv.weight", ("Mixed_5b", "branch5x5_1", "conv", "kernel")),
    ("Mixed_7c.branch_pool.bn.weight", ("Mixed_7c", "branch_pool", "bn", "scale")),
    ("Mixed_6e.branch7x7dbl_5.bn.running_var", ("Mixed_6e", "branch7x7dbl_5", "bn", "var")),
    ("fc.weight", ("fc", "kernel")),
    ("fc.bias", ("fc", "bias")),
    ("Mixed_5b.branch1x1.bn.num_batches_tracked", None),
])
def test_official_key_to_path(key, path):
    assert inception.official_key_to_path(key) == path


@pytest.mark.parametrize("key", ["AuxLogits.fc.weight", "Mixed_5b.branch1x1.conv.bias",
                                 "Mixed_6a.branch7x7_1.conv.weight", "features.0.weight"])
def test_official_key_to_path_rejects(key):
    with pytest.raises(ValueError, match="Not an FID Inception key"):
        inception.official_key_to_path(key)


# Bad weights files.


def test_converter_rejects_torchvision_inception(tmp_path, capsys):
    torch.manual_seed(0)
    torchvision_inception = import_torchvision().models.inception_v3(
        weights=None, aux_logits=True, init_weights=False)
    torch.save(torchvision_inception.state_dict(), tmp_path / "inception_v3_google.pth")
    assert convert.main(["inception", f"--pth={tmp_path / 'inception_v3_google.pth'}",
                         f"--out={tmp_path / 'out.npz'}"]) == 2
    err = capsys.readouterr().err
    assert "torchvision's ImageNet Inception v3 (fc.weight of shape (1000, 2048)" in err
    assert "not the FID Inception" in err and "pt_inception-2015-12-05-6726825d.pth" in err
    assert "Traceback" not in err and not (tmp_path / "out.npz").exists()


def test_converter_names_bad_keys(tmp_path, capsys):
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 5, 5),
                "Mixed_5b.extra.weight": torch.zeros(3)}, tmp_path / "partial.pth")
    assert convert.main(["inception", f"--pth={tmp_path / 'partial.pth'}",
                         f"--out={tmp_path / 'out.npz'}"]) == 2
    err = capsys.readouterr().err
    assert "The --pth file does not fit the FID Inception" in err
    assert "1 unexpected: Mixed_5b.extra.weight" in err
    assert ("Conv2d_1a_3x3.conv.weight (expected (32, 3, 3, 3), found (32, 3, 5, 5))" in err)
    assert "471 missing: " in err and "Is it pytorch-fid's pt_inception" in err


def test_file_of_another_kind(tmp_path):
    path = str(tmp_path / "lpips.npz")
    weights.save(path, nnx.State({"w": nnx.Param(np.zeros(3, np.float32))}),
                    kind="lpips_vgg16")
    with pytest.raises(weights.PretrainedError, match="'lpips_vgg16'.*'fid_inception_v3'"):
        inception.load_inception(path)


def test_missing_file(tmp_path):
    path = str(tmp_path / "nowhere.npz")
    with pytest.raises(weights.PretrainedError) as error:
        inception.load_inception(path)
    assert path in str(error.value)
    assert "fqgan_jax.tools.convert inception --pth=" in str(error.value)
