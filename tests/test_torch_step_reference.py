"""benchmarks/torch_tokenizer.py, the PyTorch speed reference of the generator step, computes
what the JAX step computes: the same random params (exported with the project's official-format
exporter), the same uint8 images, the same codes, loss terms, reconstruction, gradients and
optimizer updates, on the tiny Dual model at 32 px."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from conftest import load_benchmark, make_tiny_config

from fqgan_jax import architecture
from fqgan_jax.data.pixels import images_to_float
from fqgan_jax.tools.official_format import tokenizer_state_dict
from fqgan_jax.training import train_state
from fqgan_jax.training.train_step import _generator_loss

TERMS = ("reconstruction", "codebook", "commitment", "entropy", "disentangle")
EMA_DECAY = 0.9  # on, so that the optimizer test covers the EMA too
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _torch_tokenizer():
    return load_benchmark("torch_tokenizer")


def _to_torch(state: dict) -> dict:
    return {key: torch.from_numpy(np.array(value)) for key, value in state.items()}


def _random(abstract_params):
    """N(0, 0.1) params from the shapes alone: no init program to compile."""
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(np.float32),
                        abstract_params)


@pytest.fixture(scope="module")
def reference():
    """The JAX step's loss, codes, reconstruction and gradients on random params, and two optax
    updates (gradients g, then -g/2) from them; one compiled program."""
    # The generator phase the benchmark times: no GAN, LPIPS or teacher (all off or absent).
    config = make_tiny_config(**{"gan.weight": 0.0, "optimizer.ema_decay": EMA_DECAY})
    components = train_state.make_components(config)
    abstract_params, model_state = architecture.abstract_model_variables(config)
    # All of the TrainState that _generator_loss reads (the tokenizer has no model_state).
    state = types.SimpleNamespace(model_state=model_state, disc=None)
    loss_fn = functools.partial(_generator_loss, state=state, frozen={}, teacher_cls={},
                                rng=jax.random.key(0), components=components, config=config,
                                gan_on=False, num_shards=1)

    # XLA's backend optimizations off: 7 s less compile on 2 cores, for a program run once.
    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    def jax_side(params, images):
        (total, (metrics, indices, _, recon)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(params, images=images)
        opt_state, trajectory = components.tx.init(params), []
        for step_grads in (grads, jax.tree.map(lambda g: -0.5 * g, grads)):
            updates, opt_state = components.tx.update(step_grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            trajectory.append(params)
        return total, metrics, indices, recon, grads, trajectory

    params = _random(abstract_params)
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), np.uint8)
    total, metrics, indices, recon, grads, trajectory = jax_side(
        params, images_to_float(jnp.asarray(images)))
    branches = config.model.branches
    return types.SimpleNamespace(
        tt=_torch_tokenizer(), config=config, images=torch.from_numpy(images).permute(0, 3, 1, 2),
        params=_to_torch(tokenizer_state_dict(params, branches)),
        total=float(total), terms={name: float(metrics[f"loss/{name}"]) for name in TERMS},
        indices=np.asarray(indices), recon=np.asarray(recon),
        grads=_to_torch(tokenizer_state_dict(grads, branches)),
        trajectory=[_to_torch(tokenizer_state_dict(p, branches)) for p in trajectory])


def _torch_model(ref):
    model = ref.tt.build(ref.config)
    ref.tt.load_official_state_dict(model, ref.params)
    return model


def test_codes_are_unambiguous(reference):
    """Every token's nearest code beats the runner-up by far more than float32 noise, so both
    implementations must pick it: no tie or near-tie that rounding could flip."""
    model = _torch_model(reference)
    with torch.no_grad():
        latents = model.encode(reference.tt.images_to_float(reference.images))
    for z, branch in zip(latents, model.branch_names):
        z = torch.nn.functional.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=-1)
        codebook = getattr(model, f"quantize_{branch}").embedding.weight
        cosines = z.double() @ torch.nn.functional.normalize(codebook, dim=-1).double().T
        closest = torch.topk(cosines, 2).values
        assert (closest[:, 0] - closest[:, 1]).min() > 1e-5


def test_loss_terms_codes_and_reconstruction_match(reference):
    tt, model = reference.tt, _torch_model(reference)
    with torch.no_grad():
        total, terms = tt.generator_loss(model, reference.images, reference.config)
        out = model(tt.images_to_float(reference.images), with_entropy=True)
    np.testing.assert_array_equal(out.indices.numpy(), reference.indices)
    np.testing.assert_allclose(float(total), reference.total, rtol=1e-5)
    for name in TERMS:
        np.testing.assert_allclose(float(terms[name]), reference.terms[name], rtol=1e-4,
                                   atol=1e-6, err_msg=name)
    np.testing.assert_allclose(out.recon.permute(0, 2, 3, 1).numpy(), reference.recon,
                               atol=1e-5)


def test_gradients_match(reference):
    """Every parameter's gradient, to 5e-4 of that tensor's largest one (measured: 1.7e-4).
    The floor, 1e-6 of the largest gradient of all, is for the gradients that are zero up to
    rounding (measured <= 2.7e-8): conv biases right before a one-channel-per-group GroupNorm,
    attention key biases (softmax ignores a shift per query)."""
    model = _torch_model(reference)
    reference.tt.generator_loss(model, reference.images, reference.config)[0].backward()
    floor = 1e-6 * max(float(g.abs().max()) for g in reference.grads.values())
    for name, param in model.named_parameters():
        expected = reference.grads[name]
        torch.testing.assert_close(param.grad, expected, rtol=0,
                                   atol=5e-4 * float(expected.abs().max()) + floor,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_optimizer_matches_optax(reference):
    """Two updates from the same gradients (g, then -g/2; both clipped): the same params as
    optax's, and the EMA the JAX step keeps."""
    tt, config, model = reference.tt, reference.config, _torch_model(reference)
    optimizer = tt.make_optimizer(model, config)
    params = dict(model.named_parameters())
    for scale in (1.0, -0.5):
        for name, param in params.items():
            param.grad = scale * reference.grads[name]
        assert optimizer.step(torch.tensor(reference.total))
    ema = dict(zip(params, optimizer.ema))
    lr = config.optimizer.learning_rate
    for name, param in params.items():
        first, second = (p[name] for p in reference.trajectory)
        expected_ema = EMA_DECAY * (EMA_DECAY * reference.params[name]
                                    + (1 - EMA_DECAY) * first) + (1 - EMA_DECAY) * second
        torch.testing.assert_close(param.detach(), second, rtol=0, atol=1e-3 * lr,
                                   msg=lambda m, name=name: f"{name}: {m}")
        torch.testing.assert_close(ema[name], expected_ema, rtol=0, atol=1e-3 * lr,
                                   msg=lambda m, name=name: f"EMA {name}: {m}")


def test_train_step_returns_the_loss_and_updates_once(reference):
    """train_step = the generator loss above, backward and one update: Adam's first step
    moves each parameter by at most the learning rate."""
    tt, config, model = reference.tt, reference.config, _torch_model(reference)
    loss = tt.train_step(model, tt.make_optimizer(model, config), reference.images, config)
    np.testing.assert_allclose(float(loss), reference.total, rtol=1e-5)
    moved = [float((param.detach() - reference.params[name]).abs().max())
             for name, param in model.named_parameters()]
    assert 0 < max(moved) <= config.optimizer.learning_rate * (1 + 1e-5)
