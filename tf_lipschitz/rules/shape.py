"""Rules for layers that move, copy or drop entries, and for inference-time identities.

Flatten, Reshape, Permute and zero padding are isometries (norm 1); cropping is a restriction
(norm 1 unless it keeps nothing); nearest up-sampling by factors ``f_d`` copies every entry
``Π f_d`` times (norm ``√Π f_d``); RepeatVector(n) has norm ``√n``. Dropout, the noise layers and
ActivityRegularization are the identity at inference. All of them are linear, so they fuse with
their linear neighbours (Conv → Flatten → Dense is measured as one operator).

Masking is refused: the mask it passes on makes later layers skip time steps, which is
discontinuous (and with ``mask_value != 0`` its own output jumps too).
"""

from __future__ import annotations

import math

import keras
import numpy as np

from tf_lipschitz.errors import NotLipschitzError, UnsupportedLayerError
from tf_lipschitz.rules.base import Linear, NodeContext, register_rule

__all__: list[str] = []


def known_norm(value: float, note: str, fn=None, diagonal: bool = False):
    """A rule for a linear layer of known, exact norm ``value`` (also its certificate).

    Args:
        value: The operator norm.
        note: The report's note.
        fn: The linear map (default: the layer's call); :func:`identity` marks the layer as
            the identity at inference (a diagonal map, fused into its neighbours' weights).
        diagonal: Whether the map is elementwise (a negation).
    """
    def rule(layer, ctx: NodeContext) -> Linear:
        f = fn if fn is not None else (lambda x: layer(x))
        return Linear(f, norm=lambda: value, certificate=lambda: value, note=note,
                      diagonal=diagonal or fn is identity)

    return rule


def identity(x):
    """The identity map (the ``fn`` of layers that do nothing at inference)."""
    return x


def _upsampling(layer, ctx: NodeContext) -> Linear:
    size = layer.size if isinstance(layer.size, (tuple, list)) else (layer.size,)
    if getattr(layer, "interpolation", "nearest") != "nearest":
        return Linear(lambda x: layer(x), note=f"{layer.interpolation} up-sampling (linear)")
    value = math.sqrt(math.prod(size))
    return Linear(lambda x: layer(x), norm=lambda: value, certificate=lambda: value,
                  note=f"nearest up-sampling √{math.prod(size)}")


def _repeat_vector(layer, ctx: NodeContext) -> Linear:
    value = math.sqrt(layer.n)
    return Linear(lambda x: layer(x), norm=lambda: value, certificate=lambda: value,
                  note=f"repeat √{layer.n}")


def _embedding(layer, ctx: NodeContext):
    raise UnsupportedLayerError(
        layer,
        "An Embedding maps integer ids, which have no continuous perturbation. Analyse the model "
        "from the embedding's output instead: "
        f"`keras.Model(model.get_layer('{layer.name}').output, model.output)`.",
    )


def _masking(layer, ctx: NodeContext):
    value = layer.mask_value
    skips = (f"passes on a mask that makes the layers after it skip the time steps whose "
             f"features all equal mask_value={value!r} (an RNN layer keeps its previous state "
             "there, a pooling layer leaves the step out): a discontinuous function of the input.")
    advice = ("Analyse the model without the Masking layer, on fixed-length inputs: rebuild it "
              "without that layer and copy the weights of the others (`set_weights`).")
    if np.all(np.equal(value, 0)):  # a masked step is zero already: its own output = input
        raise UnsupportedLayerError(
            layer, f"It {skips} Its own output equals its input (mask_value=0), so the model is "
            "Lipschitz only if no later layer uses the mask, which a rule cannot see. " + advice,
            suggest_rule=False)
    raise NotLipschitzError(
        layer, f"its output jumps: a time step whose features all equal mask_value={value!r} "
        "is replaced by zeros, while a step an arbitrarily small distance away is kept. It "
        f"also {skips} {advice}")


L = keras.layers
for _cls in (L.Flatten, L.Reshape, L.Permute, L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D):
    register_rule(_cls, known_norm(1.0, "isometry"))
for _cls in (L.Cropping1D, L.Cropping2D, L.Cropping3D):
    register_rule(_cls, known_norm(1.0, "restriction"))
for _cls in (L.Dropout, L.SpatialDropout1D, L.SpatialDropout2D, L.SpatialDropout3D,
             L.GaussianNoise, L.GaussianDropout, L.AlphaDropout, L.ActivityRegularization,
             L.Identity):
    register_rule(_cls, known_norm(1.0, "identity at inference", fn=identity))
for _cls in (L.UpSampling1D, L.UpSampling2D, L.UpSampling3D):
    register_rule(_cls, _upsampling)
register_rule(L.RepeatVector, _repeat_vector)
register_rule(L.Embedding, _embedding)
register_rule(L.Masking, _masking)


def _register_ops():
    from keras.src.ops import numpy as knp

    for cls in (knp.Reshape, knp.Transpose, knp.Squeeze, knp.ExpandDims):
        register_rule(cls, known_norm(1.0, "isometry (op)"))
    register_rule(knp.Negative, known_norm(1.0, "negation (op)", diagonal=True))


_register_ops()
