"""What a config builds: the tokenizer (with a feature-prediction head per taught branch, sized by
its teacher) and the discriminator, as modules or as their static halves.

Training, eval and inference all build their networks here, so a checkpoint written by one is
read by the others with the same structure. Models are split at the jit boundary into a static
`graphdef` and pytrees of variables (spec jax_stack.md §2.1).
"""

from __future__ import annotations

import ml_collections
from flax import nnx

from fqgan_jax import config_lib
from fqgan_jax.frozen import teachers
from fqgan_jax.models import Tokenizer
from fqgan_jax.models.discriminator import PatchDiscriminator


def create_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs, *,
                 dtype: str | None = None) -> Tokenizer:
    """The tokenizer, with a feature-prediction head per taught branch, sized by its teacher;
    computing in `dtype` (default config.model.dtype; params are float32 either way)."""
    widths = {branch: teachers.kind(name).width
              for branch, name in config_lib.taught_branches(config).items()}
    model_config = config.model
    if dtype is not None and dtype != model_config.dtype:
        model_config = ml_collections.ConfigDict({**model_config.to_dict(), "dtype": dtype})
    return Tokenizer.from_config(model_config, image_size=config.data.image_size, rngs=rngs,
                                 teacher_widths=widths)


def create_discriminator(config: ml_collections.ConfigDict,
                         rngs: nnx.Rngs) -> PatchDiscriminator:
    return PatchDiscriminator(ndf=config.gan.ndf, n_layers=config.gan.n_layers,
                              dtype=config.model.dtype, rngs=rngs)


def graphdef(build) -> nnx.GraphDef:
    """The static half of the module `build(rngs)` returns, built without allocating parameters."""
    return nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(0))), nnx.Param, ...)[0]


def model_graphdef(config: ml_collections.ConfigDict, *, dtype: str | None = None
                   ) -> nnx.GraphDef:
    return graphdef(lambda rngs: create_model(config, rngs, dtype=dtype))


def eval_graphdef(config: ml_collections.ConfigDict) -> nnx.GraphDef:
    """The tokenizer as eval and inference run it: in config.eval.dtype (float32 by default,
    as the official evaluation), whatever dtype it trained in."""
    return model_graphdef(config, dtype=config.eval.dtype)


def abstract_model_variables(config: ml_collections.ConfigDict) -> tuple[nnx.State, nnx.State]:
    """Shapes and dtypes of the tokenizer's (params, model_state), nothing allocated."""
    _, params, model_state = nnx.split(
        nnx.eval_shape(lambda: create_model(config, nnx.Rngs(0))), nnx.Param, ...)
    return params, model_state


def merge_model(graphdef: nnx.GraphDef, params: nnx.State, model_state: nnx.State) -> Tokenizer:
    return nnx.merge(graphdef, params, model_state)
