"""Rules for the audio front ends ``STFTSpectrogram`` and ``MelSpectrogram``.

**STFTSpectrogram** convolves every input channel alike with two fixed (but trainable) kernels
of shape ``(frame_length, 1, F)``, ``F = fft_length // 2 + 1`` bins: ``real_kernel[n, k] =
w[n] cos(2πkn/N) / scale`` and ``imag_kernel[n, k] = −w[n] sin(2πkn/N) / scale`` (``w`` the
window, ``scale`` what ``scaling`` sets: ``‖w‖₂`` for ``"density"``, ``Σ|w|`` for
``"spectrum"``, 1 for ``None``), with stride ``frame_step`` and ``padding`` ``"valid"`` or
``"same"`` (zero padding). Write ``A`` for the stacked map ``x ↦ (Re, Im)`` of one channel: a
strided 1-D convolution with ``2F`` output channels. The channels of the input are transformed
independently, so the layer's operator is ``I_C ⊗ A`` up to a permutation of the outputs (the
layout that ``data_format`` and ``expand_dims`` choose), whose norm is ``‖A‖``. The rule reads
the kernels from the layer, so ``window``, ``periodic``, ``scaling`` and trained kernels are
all covered.

- ``mode="real"``, ``"imag"``, ``"stft"``: linear, ``‖A_re‖``, ``‖A_im‖``, ``‖A‖``. The
  power method runs on the layer itself; the certificate bounds the convolution with the
  layer's kernels (:func:`stft_operator_bound`: exact dense SVD of the one-channel operator
  when small, polyphase FFT of the strided convolution otherwise).
- ``mode="magnitude"``: Keras returns ``max(|z|, √ε)`` per bin (``√max(Re² + Im², ε)``,
  ``ε = keras.backend.epsilon()``). For complex numbers ``||a| − |b|| ≤ |a − b|`` and
  ``max(·, c)`` is 1-Lipschitz, so the layer is ``‖A‖``-Lipschitz. The bound is exact: at
  ``x = t·v``, ``v`` a top right singular vector of ``A``, ``|A(t+s)v| = (t+s)|Av|`` grows at
  rate ``‖Av‖ = ‖A‖``. A certified :class:`~tf_lipschitz.rules.base.Constant`.
- ``mode="log"``: ``log max(|z|, √ε)``, whose slope ``1/|z|`` is capped at ``1/√ε`` by the
  clamp: ``‖A‖/√ε`` (≈ ``3162·‖A‖`` for ``ε = 1e-7``) is a valid bound but far from tight
  (reached only where every bin sits at the clamp); a warning says so, as for
  LayerNormalization.
- ``mode="psd"`` (``|z|²``, interior bins doubled) grows quadratically and ``mode="angle"``
  (``arctan2``) jumps across the negative real axis: :class:`~tf_lipschitz.errors.NotLipschitzError`.

**MelSpectrogram** computes ``S = |STFT(x)|^mag_exp`` (``keras.ops.stft`` with
``center=True``: the signal is reflect-padded by ``fft_length // 2`` on both sides, framed by
``sequence_length`` with stride ``sequence_stride``, windowed and transformed with
``fft_length`` bins), then ``S·M`` with the fixed, non-negative ``(bins, num_mel_bins)`` mel
filterbank ``M``, then optionally decibels. With ``mag_exp=1`` and ``power_to_db=False`` the
per-frame map ``x ↦ Mᵀ|Bx|`` (``B`` the stacked real/imag STFT, reflection included) is
``‖M‖₂·‖B‖``-Lipschitz: ``|·|`` is 1-Lipschitz per bin and ``Mᵀ`` linear on the magnitudes.
``‖B‖`` is certified exactly (dense) on small signals and by ``√c · ‖B_valid‖`` otherwise
(reflection copies each sample at most ``c`` times, a map of norm ``√c``, followed by the
valid-framed convolution with the windowed DFT kernels): ``c = 2``, at most ``√2`` loose, unless
the signal has at most ``fft_length + 1`` samples, where both mirrors can copy one sample
(``c = 3``; :func:`reflection_copies`). Every other
setting is refused: ``mag_exp ≠ 1`` is not Lipschitz (``|z|^p`` has an infinite slope at 0
for ``p < 1`` and grows faster than linearly for ``p > 1``), and ``power_to_db=True`` floors
the decibels at ``max(log_spec) − top_db``, the max taken over the **whole batch**, so an
example's output changes with the other examples while its own input does not. ``mag_exp=0``
gives a constant output (Lipschitz 0).

Both rules check their model of the layer against the layer itself on a random input (the
magnitudes, or the mel spectrogram) and raise
:class:`~tf_lipschitz.errors.UnsupportedLayerError` if they differ.

Example:
    >>> import keras, tf_lipschitz as tfl
    >>> model = keras.Sequential([
    ...     keras.Input((64, 1)),
    ...     keras.layers.STFTSpectrogram(mode="magnitude", frame_length=16, frame_step=8)])
    >>> report = tfl.LipschitzEstimator(model, verbose=0).autolip()
    >>> report.certified, 0.9 < report.upper < 1.5
    (True, True)
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tf_lipschitz import certify
from tf_lipschitz.errors import NotLipschitzError, UnsupportedLayerError
from tf_lipschitz.operators import LinearOperator
from tf_lipschitz.report import round_up
from tf_lipschitz.rules.base import (Constant, Linear, NodeContext, constant_like,
                                     register_rule, weight_as_used, weight_values)

__all__ = ["mel_matrix", "mel_stft_kernel", "reflection_copies", "stft_operator_bound"]

_CHECK_RTOL = 1e-4
"""Tolerance of the checks against the layer, relative to ``max|x| · max_k Σ_n |kernel[n, k]|``
(float32 sums of ``frame_length`` products are within ``frame_length · 6e-8`` of it)."""


def _output_length(length: int, frame_length: int, frame_step: int, padding: str) -> int:
    if padding == "same":
        return -(-length // frame_step)
    return max((length - frame_length) // frame_step + 1, 0)


def _frames(x, kernel, frame_step: int, padding: str):
    """The strided convolution of one-channel signals ``(B, T)`` with ``kernel`` ``(L, 1, K)``:
    ``(B, T', K)``, in ``x``'s dtype."""
    y = ops.conv(x[..., None], ops.cast(kernel, keras.backend.standardize_dtype(x.dtype)),
                 strides=frame_step, padding=padding, data_format="channels_last")
    return y


@functools.lru_cache(maxsize=32)
def _cached_bound(kernel_bytes: bytes, kernel_shape: tuple[int, ...], frame_step: int,
                  padding: str, length: int) -> float:
    kernel = np.frombuffer(kernel_bytes, np.float64).reshape(kernel_shape)
    frame_length = kernel_shape[0]
    n_out = _output_length(length, frame_length, frame_step, padding)
    if n_out == 0:
        return 0.0
    like = constant_like(kernel)

    def fn(x):  # (B, T, 1) -> (B, T', K), in x's dtype (float64 for the dense route)
        return _frames(x[..., 0], like(x), frame_step, padding)

    offset = certify.left_padding(padding, (length,), (n_out,), (frame_step,), (frame_length,))

    def spec(in_scale, out_scale):
        return certify.conv_spec("conv", kernel, (frame_step,), (1,), (length,), (n_out,),
                                 offset, in_scale=in_scale, out_scale=out_scale)

    cert = certify.spec_certificate(spec, (length, 1), (n_out, kernel_shape[-1]), fn=fn)
    return float(cert())


def stft_operator_bound(kernel: np.ndarray, frame_step: int, padding: str,
                        length: int) -> float:
    """Certified bound on the norm of a one-channel strided convolution (an STFT's framing,
    windowing and DFT) on signals of ``length`` samples.

    The operator ``x ↦ conv(x, kernel)`` (stride ``frame_step``, TensorFlow's ``"valid"`` or
    ``"same"`` zero padding) is materialised in float64 and bounded exactly when small
    (:class:`tf_lipschitz.certify.LayerCertificate`), else bounded by the polyphase FFT of the
    strided convolution (:func:`tf_lipschitz.certify.conv_spec`). Results are cached on the
    kernel's bytes.

    Args:
        kernel: ``(frame_length, 1, K)`` float64 taps (``K`` output channels: frequency bins,
            real and imaginary parts stacked).
        frame_step: The stride.
        padding: ``"valid"`` or ``"same"``.
        length: Samples per signal.

    Returns:
        The bound (0 when there is no full frame).

    Example:
        >>> import numpy as np
        >>> kernel = np.ones((2, 1, 1))  # sums of neighbours on 5 samples: ‖A‖ = 2 cos(π/10)
        >>> bound = stft_operator_bound(kernel, 1, "valid", 5)
        >>> bool(2 * np.cos(np.pi / 10) <= bound <= 2 * np.cos(np.pi / 10) * (1 + 1e-5))
        True
    """
    kernel = np.ascontiguousarray(kernel, np.float64)
    return _cached_bound(kernel.tobytes(), kernel.shape, int(frame_step), str(padding),
                         int(length))


# ----------------------------------------------------------------------------------------------
# STFTSpectrogram
# ----------------------------------------------------------------------------------------------

_KERNELS = {"real": ("real_kernel",), "imag": ("imag_kernel",)}


def _kernel_names(mode: str) -> tuple[str, ...]:
    return _KERNELS.get(mode, ("real_kernel", "imag_kernel"))


def _stft_geometry(layer, ctx: NodeContext) -> tuple[int, int, int]:
    """``(length, channels, frame_step)`` of the layer's call."""
    shape = tuple(ctx.input_shape)
    if len(shape) != 2 or any(d is None for d in shape):
        raise UnsupportedLayerError(
            layer, f"It expects a fixed-length input (time, channels); received per-example "
            f"shape {shape}. Build the model with keras.Input((length, channels)).",
            suggest_rule=False)
    length, channels = shape if layer.data_format == "channels_last" else shape[::-1]
    return int(length), int(channels), int(layer.frame_step or layer.frame_length // 2)


def _stft_kernel(layer, names: Sequence[str]) -> np.ndarray:
    """The layer's kernels as it multiplies by them, stacked on the bin axis (float64)."""
    return np.concatenate([weight_values(layer, getattr(layer, n)) for n in names], axis=-1)


def _stacked(layer, x, names: Sequence[str], frame_step: int):
    """``(B, C, T', K)``: every channel of ``x`` framed by the layer's kernels ``names``."""
    if layer.data_format == "channels_last":
        x = ops.transpose(x, (0, 2, 1))
    channels, length = x.shape[1], x.shape[2]
    dtype = keras.backend.standardize_dtype(x.dtype)
    kernel = ops.concatenate([weight_as_used(layer, getattr(layer, n), dtype) for n in names],
                             axis=-1)
    y = _frames(ops.reshape(x, (-1, length)), kernel, frame_step, layer.padding)
    return ops.reshape(y, (-1, channels, y.shape[1], y.shape[2]))


def _check_stft(layer, ctx: NodeContext, frame_step: int) -> None:
    """Raises unless the layer's output is, as a multiset per example (its layout is a
    permutation), the framing ``z`` of every channel by its kernels (linear modes), or
    ``max(|z|, √ε)`` (``"magnitude"``; ``"log"`` after ``exp``)."""
    mode = layer.mode
    x = np.random.default_rng(0).standard_normal((2, *ctx.input_shape)).astype("float32")
    try:  # in a graph: TensorFlow runs channels_first convolutions on CPU only there
        got = np.asarray(tf.function(lambda t: layer(t), autograph=False)(x), np.float64)
        if mode == "log":
            got = np.exp(got)
    except Exception as err:  # noqa: BLE001 - reported as the reason for the refusal
        got = err
    names = _kernel_names(mode)
    expected = np.asarray(_stacked(layer, tf.constant(x, tf.float64), names, frame_step))
    if mode in ("magnitude", "log"):
        bins = expected.shape[-1] // 2
        expected = np.maximum(np.hypot(expected[..., :bins], expected[..., bins:]),
                              math.sqrt(keras.backend.epsilon()))
    kernel = _stft_kernel(layer, names)
    scale = float(np.max(np.abs(x))) * float(np.max(np.sum(np.abs(kernel), axis=0), initial=0))
    if isinstance(got, Exception):
        reason = f"calling it failed ({type(got).__name__}: {got})"
    elif got.size != expected.size:
        reason = f"it returned {got[0].size} values per example, not {expected[0].size}"
    else:
        error = float(np.max(np.abs(np.sort(got.reshape(2, -1), axis=1)
                                    - np.sort(expected.reshape(2, -1), axis=1)), initial=0.0))
        # a float16 layer (mixed precision) rounds its outputs: relative 2⁻¹¹ each
        rtol = max(_CHECK_RTOL, 8.0 * float(np.finfo(layer.compute_dtype).eps))
        if error <= rtol * max(scale, 1.0):
            return
        reason = f"on a random input its values differ from that map's by {error:.3g}"
    what = "" if mode in ("real", "imag", "stft") else "the magnitude of "
    raise UnsupportedLayerError(
        layer,
        f"The rule models mode='{mode}' as {what}a strided convolution with its "
        f"{' and '.join(names)} (stride {frame_step}, padding '{layer.padding}'), but "
        f"{reason}: this subclass or Keras version computes something else, and no bound is "
        "given rather than a wrong one.", suggest_rule=False)


def _stft_spectrogram(layer, ctx: NodeContext):
    mode = layer.mode
    if mode == "psd":
        raise NotLipschitzError(
            layer, "mode='psd' outputs the power |z|² = Re² + Im² of every bin (interior bins "
            "doubled), which grows quadratically with the signal. Use mode='magnitude' "
            "(‖A‖-Lipschitz, A the STFT) and square after the certified part if needed.")
    if mode == "angle":
        raise NotLipschitzError(
            layer, "mode='angle' outputs arctan2(Im, Re), which jumps by 2π when a bin "
            "crosses the negative real axis (a discontinuous map). Use mode='stft' (real and "
            "imaginary parts, linear) or mode='magnitude'.")
    if mode not in ("real", "imag", "stft", "magnitude", "log"):
        raise UnsupportedLayerError(layer, f"Unknown mode={mode!r}.", suggest_rule=False)
    length, channels, step = _stft_geometry(layer, ctx)
    names = _kernel_names(mode)
    if not np.all(np.isfinite(_stft_kernel(layer, names))):
        raise UnsupportedLayerError(
            layer, f"Its {' and '.join(names)} contain NaN or inf, so its output is not finite "
            f"and has no bound. Keras computes NaN kernels for fft_length=1 (this layer: "
            f"frame_length={layer.frame_length}, fft_length={layer.fft_length}): use "
            "fft_length >= 2. Kernels that training made non-finite must be reset.",
            suggest_rule=False)
    _check_stft(layer, ctx, step)

    def bound() -> float:  # the one-channel operator: the layer's is I_C ⊗ A
        return stft_operator_bound(_stft_kernel(layer, names), step, layer.padding, length)

    if mode in ("real", "imag", "stft"):
        def fn(x):  # the layer itself: linear, no bias (float64 when certify disables autocast)
            return layer(x)

        return Linear(fn, certificate=bound,
                      note=f"STFT mode='{mode}': strided convolution with the layer's kernels "
                           f"(frame {layer.frame_length}, step {step}, padding "
                           f"'{layer.padding}'), per channel")
    norm = bound()
    if mode == "magnitude":
        return Constant(norm, note=f"STFT magnitude max(|z|, √ε): ‖A‖ = {norm:.4g} of the "
                                   "stacked real/imag STFT (exact: ||a|−|b|| ≤ |a−b|)")
    epsilon = keras.backend.epsilon()  # the clamp as the layer computes it, and exactly
    dtype = layer.compute_dtype
    computed = float(ops.convert_to_numpy(ops.sqrt(ops.maximum(
        ops.zeros((), dtype), ops.cast(epsilon, dtype)))))
    clamp = min(math.sqrt(epsilon), computed)
    value = round_up(norm / clamp, 4) if clamp > 0 else math.inf
    warnings.warn(
        f"Layer '{layer.name}' (STFTSpectrogram, mode='log') is Lipschitz only thanks to "
        f"Keras' clamp of |z| at sqrt(epsilon) = {clamp:.3g}: its bound ‖A‖/sqrt(epsilon) = "
        f"{value:.4g} is valid but usually far from tight. Consider mode='magnitude' and a "
        "log outside the certified part.", stacklevel=2)
    return Constant(value, note=f"STFT log max(|z|, √ε): ‖A‖/√ε = {norm:.4g}/{clamp:.3g} "
                                "(loose)")


# ----------------------------------------------------------------------------------------------
# MelSpectrogram
# ----------------------------------------------------------------------------------------------


def _mel_dtype(layer) -> str:
    return layer.compute_dtype if layer.compute_dtype in ("float32", "float64") else "float32"


def mel_matrix(layer) -> np.ndarray:
    """The ``(fft_length // 2 + 1, num_mel_bins)`` filterbank a MelSpectrogram multiplies by.

    Keras computes it in float32 (``linear_to_mel_weight_matrix``); those are the weights.
    """
    matrix = layer.linear_to_mel_weight_matrix(
        num_mel_bins=layer.num_mel_bins, num_spectrogram_bins=layer.fft_length // 2 + 1,
        sampling_rate=layer.sampling_rate, lower_edge_hertz=layer.min_freq,
        upper_edge_hertz=layer.max_freq)
    return np.asarray(ops.convert_to_numpy(matrix), np.float64)


def mel_stft_kernel(layer) -> np.ndarray:
    """``(fft_length, 1, 2·bins)`` kernel of the layer's STFT on the reflect-padded signal.

    Tap ``n`` of bin ``k``: ``w[n] cos(2πkn/N)`` (real) and ``−w[n] sin(2πkn/N)`` (imaginary),
    ``w`` the window (``sequence_length`` samples, periodic Hann or Hamming as TensorFlow
    computes it in the layer's dtype, a given array, or ones) centred in ``N = fft_length``.
    """
    n_fft, length = int(layer.fft_length), int(layer.sequence_length)
    dtype = _mel_dtype(layer)
    window = layer.window
    if window is None:
        w = np.ones(length)
    elif isinstance(window, str):
        make = {"hann": tf.signal.hann_window, "hamming": tf.signal.hamming_window}[window]
        w = make(length, periodic=True, dtype=tf.as_dtype(dtype)).numpy()
    else:
        w = ops.convert_to_numpy(ops.convert_to_tensor(window, dtype=dtype))
    left = (n_fft - length) // 2
    padded = np.zeros(n_fft)
    padded[left:left + length] = np.asarray(w, np.float64)
    angle = 2.0 * np.pi * np.outer(np.arange(n_fft), np.arange(n_fft // 2 + 1)) / n_fft
    kernel = np.concatenate([padded[:, None] * np.cos(angle), -padded[:, None] * np.sin(angle)],
                            axis=-1)
    return kernel[:, None, :]


def reflection_copies(length: int, pad: int) -> int:
    """Largest number of times a sample occurs in the signal reflect-padded by ``pad`` on both
    sides: the reflection ``R`` has ``RᵀR = diag(copies)``, so ``‖R‖ = √max copies``.

    The left mirror copies samples ``1..pad``, the right one ``length − 1 − pad..length − 2``:
    a sample is in both (3 copies) when ``length ≤ 2·pad + 1``.

    Example:
        >>> reflection_copies(100, 4), reflection_copies(5, 4), reflection_copies(5, 0)
        (2, 3, 1)
    """
    index = np.pad(np.arange(length), pad, mode="reflect") if pad else np.arange(length)
    return int(np.max(np.bincount(index, minlength=length)))


def _mel_stft(layer, x):
    """``(…, frames, 2·bins)``: the real and imaginary STFT the layer computes."""
    real, imag = ops.stft(x, sequence_length=layer.sequence_length,
                          sequence_stride=layer.sequence_stride, fft_length=layer.fft_length,
                          window=layer.window, center=True)
    return ops.concatenate([real, imag], axis=-1)


def _check_mel(layer, ctx: NodeContext, matrix: np.ndarray, kernel: np.ndarray) -> None:
    """Raises unless the layer computes ``Mᵀ|STFT(x)|`` (and the STFT is the framing of the
    reflect-padded signal by ``kernel``) on a random input."""
    dtype = _mel_dtype(layer)
    x = np.random.default_rng(0).standard_normal((2, *ctx.input_shape)).astype(dtype)
    z = np.asarray(_mel_stft(layer, tf.constant(x, tf.float64)), np.float64)
    bins = z.shape[-1] // 2
    expected = np.swapaxes(np.hypot(z[..., :bins], z[..., bins:]) @ matrix, -1, -2)
    pad = layer.fft_length // 2
    padded = np.pad(x.astype(np.float64), [(0, 0)] * (x.ndim - 1) + [(pad, pad)], "reflect")
    framed = np.asarray(_frames(tf.constant(padded.reshape(-1, padded.shape[-1])),
                                tf.constant(kernel), layer.sequence_stride, "valid"))
    scale = float(np.max(np.abs(x))) * float(np.max(np.sum(np.abs(kernel), axis=0)))
    try:
        got = np.asarray(layer(x), np.float64)
    except Exception as err:  # noqa: BLE001 - reported as the reason for the refusal
        got = err
    if isinstance(got, Exception):
        reason = f"calling it failed ({type(got).__name__}: {got})"
    elif got.shape != expected.shape or framed.size != z.size:
        reason = f"it returned shape {got.shape[1:]}, not {expected.shape[1:]}"
    else:
        tol = _CHECK_RTOL * max(scale, 1.0)
        error = max(float(np.max(np.abs(framed.reshape(z.shape) - z))),
                    float(np.max(np.abs(got - expected))) / max(np.max(np.sum(matrix, 0)), 1.0))
        if error <= tol:
            return
        reason = f"on a random input it differs from that map by {error:.3g} (tolerance {tol:.3g})"
    raise UnsupportedLayerError(
        layer,
        "The rule models it as the mel filterbank times the magnitude of keras.ops.stft "
        f"(center=True, reflect padding), but {reason}: this subclass or Keras version "
        "computes something else, and no bound is given rather than a wrong one.",
        suggest_rule=False)


def _mel_spectrogram(layer, ctx: NodeContext) -> Constant:
    if layer.power_to_db:
        raise NotLipschitzError(
            layer, "power_to_db=True floors the decibels at max(log_spec) − top_db, the max "
            "taken over the whole batch: an example's output changes with the other examples "
            "while its own input does not (and 10·log10 is bounded only through min_power). "
            "Use power_to_db=False with mag_exp=1 (‖M‖·‖STFT‖-Lipschitz) and apply the "
            "decibel scaling outside the certified part.")
    exponent = float(layer.mag_exp)
    if exponent == 0.0:  # |z|^0 = 1 (TensorFlow's pow(0, 0) too): a constant output
        return Constant(0.0, note="MelSpectrogram with mag_exp=0: constant output")
    if exponent != 1.0:
        how = ("grows faster than linearly with the signal" if exponent > 1 else
               "has an infinite slope where a bin vanishes")
        raise NotLipschitzError(
            layer, f"mag_exp={layer.mag_exp:g} raises every STFT magnitude |z| to that power, "
            f"and |z|^{layer.mag_exp:g} {how}. Use mag_exp=1 (magnitudes) with "
            "power_to_db=False: that layer is ‖M‖·‖STFT‖-Lipschitz.")
    shape = tuple(ctx.input_shape)
    if not shape or any(d is None for d in shape):
        raise UnsupportedLayerError(
            layer, f"It needs a fixed signal length; received per-example shape {shape}.",
            suggest_rule=False)
    matrix = mel_matrix(layer)
    kernel = mel_stft_kernel(layer)
    _check_mel(layer, ctx, matrix, kernel)
    mel = certify.max_singular_value(matrix[None])
    length = int(shape[-1])
    frames = _output_length(length + 2 * (layer.fft_length // 2), layer.fft_length,
                            layer.sequence_stride, "valid")
    if certify._small((length,), (frames, kernel.shape[-1])):
        # exact, the reflection included: the float64 matrix of the map (window computed in
        # float64, within 1e-7 of the layer's float32 one: inside the certificate's margin)
        dense = LinearOperator(lambda x: _mel_stft(layer, x), (length,), dtype="float64")
        stft = certify.max_singular_value(dense.to_dense()[None], method="exact")
        how = "exact"
    else:
        copies = reflection_copies(length, layer.fft_length // 2)
        stft = round_up(math.sqrt(copies) * stft_operator_bound(
            kernel, layer.sequence_stride, "valid", length + 2 * (layer.fft_length // 2)), 2)
        how = f"√{copies}·‖framing‖, reflection bounded by √{copies}"
    value = round_up(mel * stft, 2)
    return Constant(value, note=f"MelSpectrogram (mag_exp=1, no dB): ‖M‖₂·‖STFT‖ = "
                                f"{mel:.4g}·{stft:.4g} ({how})")


L = keras.layers
register_rule(L.STFTSpectrogram, _stft_spectrogram)
register_rule(L.MelSpectrogram, _mel_spectrogram)
