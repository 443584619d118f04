"""`python -m fqgan_jax.tools.init_codebook` (VQGAN-LC's codebook, spec large_codebooks.md
§A.1) end to end on the bundled photos with the random tiny CLIP: per-class and global k-means
write a codebook that training reads, plus a manifest; bad settings stop it before any feature
is computed."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from fqgan_jax import config_lib
from fqgan_jax.quantizers import registry
from fqgan_jax.tools import init_codebook

NUM_IMAGES, POOL = 48, 7  # clip_tiny: a 14 x 14 grid -> 2 x 2 = 4 features per image


def smoke_config(codebook_size=12, **lc):
    config = config_lib.load_config_file(f"{REPO}/configs/lc.py:smoke")
    config.model.codebook_size = codebook_size
    config.model.lc.update(dict(init_max_images=NUM_IMAGES, init_pool=POOL, init_iterations=3,
                                init_batch_size=16, init_clustering="per_class"))
    config.model.lc.update(lc)
    config.data.update(dict(num_workers=0, read_threads=2))
    return config


@pytest.fixture(scope="module")
def per_class(tmp_path_factory):
    output = tmp_path_factory.mktemp("per_class") / "codebook.npy"
    return output, init_codebook.make_codebook(smoke_config(), str(output))


def test_per_class_codebook_and_manifest(per_class):
    """K = 12 over the 6 photos: 2 centers per photo, in class order; training reads it."""
    output, manifest = per_class
    codebook = np.load(output)
    assert codebook.shape == (12, 64) and codebook.dtype == np.float32
    assert np.all(np.isfinite(codebook))
    on_disk = json.loads(output.with_suffix(".json").read_text())
    assert on_disk == manifest
    assert {key: manifest[key] for key in (
        "encoder", "feature_dim", "pool", "features_per_image", "clustering", "codebook_size",
        "num_classes", "clusters_per_class", "num_images", "num_features", "seed")} == dict(
        encoder="clip_tiny", feature_dim=64, pool=POOL, features_per_image=4,
        clustering="per_class", codebook_size=12, num_classes=6, clusters_per_class=2,
        num_images=NUM_IMAGES, num_features=NUM_IMAGES * 4, seed=0)
    assert manifest["inertia"] > 0
    assert not [name for name in os.listdir(output.parent) if name.startswith(".")]  # no scratch
    config = smoke_config()
    config.model.lc.codebook_path = str(output)
    np.testing.assert_array_equal(registry.initial_values(config.model)[("codebook",)],
                                  codebook)


def test_an_existing_output_is_refused(per_class):
    output, _ = per_class
    with pytest.raises(init_codebook.InitCodebookError, match="already exists.*--overwrite"):
        init_codebook.make_codebook(smoke_config(), str(output))


def test_global_clustering_needs_no_labels(tmp_path):
    """16 centers do not split over 6 classes; one k-means over all features does it."""
    output = tmp_path / "global.npy"
    manifest = init_codebook.make_codebook(smoke_config(16, init_clustering="global"),
                                           str(output))
    assert np.load(output).shape == (16, 64)
    assert manifest["clustering"] == "global" and manifest["num_classes"] == 0


@pytest.mark.parametrize("change,match", [
    (dict(feature_dim=768), "feature_dim=768, but clip_tiny's projected patch features are 64"),
    (dict(init_pool=4), r"init_pool=4 does not divide clip_tiny's 14 x 14 patch grid"),
    (dict(init_encoder="dinov2_tiny"), "dinov2 tower"),
    (dict(codebook_size=16), "16 over 6 classes, which does not divide it"),
    (dict(codebook_size=1024, init_clustering="global"), "fewer than codebook_size=1024"),
    (dict(quantizer="vq"), "quantizer='vq'"),
])
def test_bad_settings_fail_before_any_compute(tmp_path, change, match):
    config = smoke_config()
    for key, value in change.items():
        (config.model if key in ("codebook_size", "quantizer") else config.model.lc)[key] = value
    with pytest.raises(init_codebook.InitCodebookError, match=match):
        init_codebook.make_codebook(config, str(tmp_path / "codebook.npy"))
    assert not os.listdir(tmp_path)


def test_per_class_needs_class_folders(tmp_path):
    """A folder source labels images by their top-level folder; loose images have none."""
    for name in ("a.png", "b.png"):
        Image.new("RGB", (32, 32)).save(tmp_path / name)
    config = smoke_config()
    config.data.update(dict(source="folder", train_dir=str(tmp_path)))
    with pytest.raises(init_codebook.InitCodebookError,
                       match="needs class labels.*outside class folders.*init_clustering=global"):
        init_codebook.make_codebook(config, str(tmp_path / "out" / "codebook.npy"))


def test_the_command_checks_override_keys():
    result = subprocess.run(
        [sys.executable, "-m", "fqgan_jax.tools.init_codebook", "--config=configs/lc.py:smoke",
         "--config.model.lc.init_pol=2", "--output=/nonexistent/codebook.npy"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "config.model.lc.init_pool" in result.stderr
