"""Representation learning in training (spec fqgan.md §3): frozen teachers in `frozen`, one
feature-prediction head per taught branch in the params, InfoNCE in the step."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from torch_reference import import_torchvision

from fqgan_jax import architecture, checkpointing, config_lib, sharding
from fqgan_jax.data import pixels
from fqgan_jax.frozen import clip_vision, networks, teachers, weights
from fqgan_jax.objectives import infonce
from fqgan_jax.training import loop, train_step
from fqgan_jax.training import train_state as ts
from fqgan_jax.training.train_step import PhasedTrainStep

ONLY_INFONCE = {"loss.reconstruction_weight": 0.0, "loss.codebook_weight": 0.0,
                "loss.entropy_weight": 0.0, "loss.disentangle_weight": 0.0, "gan.weight": 0.0}


def _semantic(tiny_config, **overrides):
    return tiny_config(**{"loss.semantic_weight": 0.5, **overrides})


def _images(n=8, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), np.uint8)


def _norms(tree) -> dict[str, float]:
    return {"/".join(map(str, path)): float(jnp.linalg.norm(leaf))
            for path, leaf in nnx.to_flat_state(tree)}


def test_infonce_trains_the_semantic_branch_and_never_the_teacher(tiny_config):
    """The regression test for the official Dec-2024 no-grad bug (spec §3.3, showlab/FQGAN#1):
    with InfoNCE as the only term, the gradient reaches the sem head, the sem branch and the
    shared trunk through the straight-through codes; the vis branch, the decoder and the
    codebooks get none; the teacher gets exactly zero. With the batch on 2 shards, each shard's
    4 images are the negatives (the official per-GPU loss), not all 8."""
    config = _semantic(tiny_config, **ONLY_INFONCE)
    mesh = sharding.make_mesh(config_lib.single_device_mesh(), jax.devices()[:1])
    frozen = networks.load(config, mesh)
    components = ts.make_components(config)
    state = ts.initial_state(config, components, jax.random.key(0))
    images = pixels.images_to_float(jnp.asarray(_images()))

    def objective(params, teacher_params):
        frozen_ = {**frozen, "teachers": teacher_params}
        cls = train_step.teacher_features(images, frozen_, components=components, config=config)
        loss, (metrics, _, _, _) = train_step._generator_loss(
            params, state, images, frozen_, cls, jax.random.key(1), components=components,
            config=config, gan_on=False, num_shards=2)
        return loss, metrics

    @jax.jit
    def run(params, teacher_params):
        model = architecture.merge_model(components.graphdef, params, state.model_state)
        predicted = model.predict_teacher_features(model.encode(images).quantized)["sem"]
        target = train_step.teacher_features(images, frozen, components=components,
                                             config=config)["sem"]
        by_hand = [infonce.info_nce_loss(predicted, target, num_groups=g) for g in (2, 1)]
        return jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
            params, teacher_params), by_hand

    ((loss, metrics), (g_params, g_teacher)), (per_shard, whole) = run(
        state.params, frozen["teachers"])
    np.testing.assert_allclose(loss, 0.5 * metrics["loss/semantic_sem"], rtol=1e-6)
    np.testing.assert_allclose(metrics["loss/semantic_sem"], per_shard, rtol=1e-5)
    assert abs(float(per_shard) - float(whole)) > 1e-3
    assert 0 <= float(metrics["loss/semantic_top1_sem"]) <= 1
    norms = _norms(g_params)
    group = lambda prefix: sum(v for k, v in norms.items() if k.startswith(prefix))  # noqa: E731
    assert group("feat_pred_heads/sem/") > 0
    assert group("branches/sem/") > 0 and group("encoder/") > 0
    assert group("branches/vis/") == 0 and group("decoder/") == 0
    assert group("post_quant_conv/") == 0 and group("quantize/") == 0
    assert all(np.all(np.asarray(leaf) == 0) for leaf in jax.tree.leaves(g_teacher))
    assert len(jax.tree.leaves(g_teacher)) > 0


def test_the_step_takes_its_shards_from_the_mesh(tiny_config):
    """"shard" negatives = the devices the batch is split over (static in the program)."""
    config = _semantic(tiny_config)
    components = ts.make_components(config)
    for devices in (1, 2, 8):
        mesh = sharding.make_mesh(config_lib.ml_collections.ConfigDict(
            dict(shape=(devices,), axes=("data",))), jax.devices()[:devices])
        step = PhasedTrainStep(config, components, mesh, None, None)
        assert step.num_shards == devices


def test_heads_follow_the_teacher_widths(tiny_config):
    config = _semantic(tiny_config, **{"model.branches": ("vis", "sem_mid", "sem_high")})
    config.teachers = {"sem_mid": config_lib.teacher("dinov2_tiny"),
                       "sem_high": config_lib.teacher("clip_tiny")}
    abstract = ts.abstract_state(config, ts.make_components(config))
    heads = abstract.params["feat_pred_heads"]  # trained: in the params
    assert "teachers" not in repr(jax.tree.structure(abstract))  # frozen: not in the state
    assert set(heads) == {"sem_mid", "sem_high"}
    assert heads["sem_mid"]["class_embedding"].shape == (1, teachers.kind("dinov2_tiny").width)
    assert heads["sem_high"]["class_embedding"].shape == (1, teachers.kind("clip_tiny").width)
    # semantic_weight 0 (the paper's "no Rep" ablation): no head, no teacher.
    config.loss.semantic_weight = 0.0
    assert ts.make_components(config).teacher_graphdefs == {}
    assert "feat_pred_heads" not in ts.abstract_state(config, ts.make_components(config)).params


def test_resuming_with_another_teacher_is_refused(tiny_config, tmp_path):
    config = _semantic(tiny_config)
    (tmp_path / "config.json").write_text(config.to_json())
    checkpointing.check_config_matches(str(tmp_path), config)  # same config: fine
    config.teachers.sem.kind = "dinov2_tiny"
    with pytest.raises(checkpointing.CheckpointError, match="feature-prediction heads.*clip_tiny"):
        checkpointing.check_config_matches(str(tmp_path), config)
    saved = config_lib.config_from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert config_lib.taught_branches(saved) == {"sem": "clip_tiny"}


def test_missing_teacher_weights_stop_setup_before_any_write(tiny_config, tmp_path):
    config = _semantic(tiny_config)
    config.teachers.sem = config_lib.teacher("clip_vit_l14", str(tmp_path / "no_such_dir"))
    workdir = tmp_path / "workdir"
    with pytest.raises(weights.PretrainedError) as error:
        loop.setup(config, str(workdir))
    message = str(error.value)
    for needle in ("Branch 'sem' is taught by clip_vit_l14", "no_such_dir does not exist",
                   "huggingface-cli download openai/clip-vit-large-patch14",
                   "--config.teachers.sem.path=DIR", "--config.loss.semantic_weight=0"):
        assert needle in message
    assert not workdir.exists()


@pytest.mark.parametrize("change, message", [
    (dict(branch="vq"), "config.teachers.vq: 'vq' is not one of config.model.branches"),
    (dict(kind="clip_vit_h14"), "config.teachers.sem.kind='clip_vit_h14' is unknown"),
    (dict(path="/some/dir"), "random-init tower and takes no weights"),
    (dict(batch_size=8, devices=8), "infonce_negatives='shard' needs at least 2 images"),
])
def test_config_errors_name_the_key(tiny_config, change, message):
    config = _semantic(tiny_config)
    if "branch" in change:
        config.teachers[change["branch"]] = config_lib.teacher("clip_tiny")
    if "kind" in change:
        config.teachers.sem.kind = change["kind"]
    if "path" in change:
        config.teachers.sem.path = change["path"]
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.check_config(config, change.get("devices", 1))


def _tiny_hf_clip(path, num_layers=1):
    import_torchvision()
    from transformers import CLIPVisionConfig, CLIPVisionModel  # noqa: PLC0415

    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=num_layers, num_attention_heads=2,
                                     image_size=224, patch_size=32)
                    ).save_pretrained(path, safe_serialization=True)


@pytest.fixture
def clip_test_kind(monkeypatch):
    """A pretrained kind of test size, as a Hugging Face snapshot would give."""
    sizes = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, patch_size=32,
                 image_size=224, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    monkeypatch.setitem(teachers.KINDS, "clip_test",
                        teachers.TeacherKind("clip", sizes, "test/clip-test"))
    return "clip_test"


def test_teacher_weights_load_from_a_snapshot(tiny_config, tmp_path, clip_test_kind):
    _tiny_hf_clip(tmp_path / "clip")
    config = _semantic(tiny_config)
    config.teachers.sem = config_lib.teacher(clip_test_kind, str(tmp_path / "clip"))
    mesh = sharding.make_mesh(config_lib.single_device_mesh(), jax.devices()[:1])
    frozen = networks.load(networks.resolve(config), mesh)
    expected = nnx.state(clip_vision.load_clip_vision(str(tmp_path / "clip")), nnx.Param)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(frozen["teachers"]["sem"]),
                 jax.device_get(expected))
    # The kind's graphdef (what the step merges with) takes the loaded params as they are.
    graphdef = ts.make_components(config).teacher_graphdefs["sem"]
    x = pixels.images_to_float(jnp.asarray(_images(2)))
    cls = teachers.cls_features(graphdef, frozen["teachers"]["sem"], clip_test_kind, x)
    np.testing.assert_allclose(
        cls, clip_vision.load_clip_vision(str(tmp_path / "clip"))(
            clip_vision.preprocess(x))["cls"], rtol=1e-6)


def test_a_snapshot_of_another_architecture_is_refused(tmp_path, clip_test_kind):
    _tiny_hf_clip(tmp_path / "clip", num_layers=2)
    with pytest.raises(weights.PretrainedError, match=r"num_layers 2 \(expected 1\)"):
        teachers.load_teacher(clip_test_kind, str(tmp_path / "clip"))


def test_sharded_frozen_weights_give_the_same_features():
    """config.mesh.shard_frozen: big frozen weights split over the devices; features unchanged."""
    mesh = sharding.make_mesh(config_lib.ml_collections.ConfigDict(
        dict(shape=(8,), axes=("data",))), jax.devices()[:8])
    spec = lambda shape, shard=True: sharding.frozen_sharding(  # noqa: E731
        jax.ShapeDtypeStruct(shape, jnp.float32), mesh, shard).spec
    assert spec((1024, 72)) == P("data", None)  # the largest dimension the devices divide
    assert spec((1001, 72)) == P(None, "data")
    assert spec((1001, 73)) == P() and spec((8, 8)) == P()  # indivisible; small
    assert spec((1024, 72), shard=False) == P()
    graphdef, params = nnx.split(teachers.random_teacher("clip_tiny"), nnx.Param)
    split = jax.device_put(params, jax.tree.map(
        lambda x: sharding.frozen_sharding(x, mesh, True, min_size=0), params))
    assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(split))
    x = pixels.images_to_float(jnp.asarray(_images(8)))
    features = jax.jit(lambda p, images: teachers.cls_features(graphdef, p, "clip_tiny", images))
    np.testing.assert_allclose(features(split, x), features(params, x), rtol=1e-5, atol=1e-6)
