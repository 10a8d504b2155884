"""Fourier starting vectors for the spectral solver on convolutions.

On a large grid, the top singular values of a convolution are tightly clustered: they sample
the largest singular value of the kernel's symbol ``Â(θ)`` near its peak frequency, at spacing
``O(1/N²)``. A Krylov method started from a random vector must resolve that cluster and needs
hundreds of products on VGG16's first blocks at 224×224. The top singular vector itself is known
in closed form up to boundary effects: a plane wave at the peak frequency ``θ*`` carrying the
top right singular vector ``v`` of ``Â(θ*)`` across the channels, under the lowest mode of the
box, ``x[n] = Re(v e^{iθ*·m(n)}) · Π_d sin(π(n_d + 1)/(N_d + 1))``, tilted to first order so
that each frequency of the packet carries its own top vector (:func:`_tilt`). Starting from it,
Lanczos only has to correct the boundary.

The peak is found on the polyphase symbol of :class:`tf_lipschitz.certify.ConvSpec` (so strides,
dilation, groups, depthwise and separable convolutions are covered): the symbols of a coarse half
grid of frequencies are ranked (exact eigenvalues, or a batched Lanczos run for many channels,
whose products go through the taps as one real GEMM above 64 channels instead of forming the
Gram matrices), gradient ascent on ``σ_max(Â(θ))`` refines the best separated peaks, and the
waves of all refined peaks within 0.5 % of the best are summed. The wave itself is a few real
GEMMs (a spatial field times a channel vector per term and polyphase component). For a plain
stride-1 convolution, the envelope is then found exactly on the channel subspace of the waves
(:func:`_channel_subspace_refine`): a compiled Lanczos run on the convolution restricted to
inputs whose channel vectors lie in that subspace, at a fraction of the operator's cost.
This only chooses where the solver starts: the result is still the solver's converged value, so
a poor start costs products, never accuracy.

Example:
    >>> import keras, numpy as np
    >>> from tf_lipschitz import certify, starts
    >>> layer = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)
    >>> _ = layer(np.zeros((1, 48, 48, 4), "float32"))
    >>> spec = certify.conv_certificate(layer, (48, 48, 4), (48, 48, 4)).spec(None, None)
    >>> starts.conv_start(spec).shape
    (48, 48, 4)
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from tf_lipschitz.certify import ConvSpec, LayerCertificate, _frequencies, _lanczos_ritz, \
    _small, _Symbols, fold_diagonals
from tf_lipschitz.linalg import lanczos_ritz
from tf_lipschitz.power import compiled, lanczos_loop

__all__ = ["conv_start", "group_start", "MIN_SPATIAL"]

MIN_SPATIAL = 784
"""Fewest input positions for which a Fourier start is built (28×28): on smaller grids the
spectrum is less clustered and finding the peak costs more than it saves. Both scale with the
channels squared and the saving also with the grid: on VGG16's 28×28×512 convolutions the start
costs 0.4–1.0 s and saves 47–84 of 63–112 products (1.1–2.9 s); on its 14×14 ones it would
save 15–37 of 40–69 products (0.15–0.37 s) for 0.6–0.7 s (session 22)."""

_COARSE_ENTRIES = 1 << 22  # budget of the coarse ranking: frequencies × groups × side²
_MIN_FREQUENCIES = 256
"""Fewest frequencies of the coarse ranking (16×16 on 2-D kernels), whatever the budget. The
symbol of a random 512-channel kernel has many local peaks within 0.1–0.3 % of each other, about
0.2 rad wide: an 8×8 grid (the budget alone, at 256 and 512 channels) missed the global one on
two of VGG16's ten Fourier-started layers (seed 3), and Lanczos then converged on a lower
cluster, 0.1 % and 0.24 % below the norm, with a small residual (a Krylov method never certifies
that it found the top). With 16×16, seeds 0, 3, 5 and 6 match random-start runs on all forty
layers (``tests/test_starts.py`` builds the trap in 1-D)."""
_RANK_STEPS = 12  # Lanczos steps ranking the coarse frequencies
_CANDIDATES = 4  # separated coarse peaks refined
_WARM_STEPS = 12  # power steps per refinement step, from the previous step's vector
_COLD_STEPS = 48  # power steps of the first refinement step on a large symbol
_ANGLE_TOL = 1e-3  # the ascent stops on steps of θ below this (radians)
_SVD_SIDE = 128  # larger symbols start the ascent from power steps instead of an SVD
_GRAM_SIDE = 64  # larger ones are ranked through their taps: forming Gram matrices costs more
# (single-precision taps GEMMs: 0.11 s instead of 0.21 s on VGG16's 256-channel block3_conv2)
_KEEP = 0.995  # refined peaks within this factor of the best all enter the start


def _angle_gap(a: np.ndarray, b: np.ndarray) -> float:
    """Distance between two frequencies modulo ``2π`` and sign (``±θ`` give the same wave)."""
    def wrap(d):
        return np.abs((d + math.pi) % (2 * math.pi) - math.pi)
    return float(min(np.max(wrap(a - b)), np.max(wrap(a + b))))


def _taps_times(taps: np.ndarray, vec: np.ndarray) -> np.ndarray:
    """``A_q vec`` for every tap ``A_q`` (real, ``(Q, R, C)``) and a complex ``vec``
    ``(C,)``: one real GEMM for the real and imaginary parts together, ``(Q, R)`` complex."""
    parts = np.matmul(taps, np.stack([vec.real, vec.imag], -1))
    return parts[..., 0] + 1j * parts[..., 1]


def _peak_coarse(taps: np.ndarray, shifts: np.ndarray, grid: tuple[int, ...]):
    """``(θ, group)`` of up to :data:`_CANDIDATES` separated peaks of a coarse half grid."""
    groups, side = taps.shape[1], min(taps.shape[-2:])
    active = [m for m in grid if m > 1]
    frequencies = max(_MIN_FREQUENCIES, _COARSE_ENTRIES // (groups * side ** 2))
    per_axis = max(8, int(frequencies ** (1.0 / max(1, len(active)))))
    coarse = tuple(1 if m == 1 else min(m, per_axis) for m in grid)
    thetas = _frequencies(coarse)
    if side <= 32:
        lam = np.linalg.eigvalsh(_Symbols(taps, shifts)(thetas))[:, -1]
    elif side <= _GRAM_SIDE:
        lam = _lanczos_ritz(_Symbols(taps, shifts)(thetas), steps=_RANK_STEPS)
    else:
        lam = _ranking_ritz(taps, shifts, thetas)
    spacing = 2 * math.pi / max(coarse)
    chosen: list[tuple[np.ndarray, int]] = []
    for i in np.argsort(-lam, kind="stable"):
        theta, group = thetas[i // groups], int(i % groups)
        if all(g != group or _angle_gap(theta, t) > 1.5 * spacing for t, g in chosen):
            chosen.append((theta, group))
            if len(chosen) == _CANDIDATES:
                break
    return chosen


def _ranking_ritz(taps: np.ndarray, shifts: np.ndarray, thetas: np.ndarray) -> np.ndarray:
    """Top Ritz values of ``Â(θ)ᴴÂ(θ)`` for every frequency and group ``(F · groups,)``, by
    Lanczos with products through the taps: ``Â(θ)v = Σ_q e^{iθ·q} A_q v`` is one real GEMM
    of all taps with all frequencies' vectors, so no symbol (or Gram) matrix is formed."""
    q_count, groups, rows, cols = taps.shape
    phase = np.exp(1j * (thetas @ shifts.T)).astype(np.complex64)  # (F, Q)
    # Single precision (about 1e-6 here) is ample for a ranking, and halves the GEMMs' cost.
    taps = taps.astype(np.float32)
    forward = np.moveaxis(taps, 1, 0).reshape(groups, q_count * rows, cols)
    backward = np.moveaxis(np.swapaxes(taps, -1, -2), 1, 0).reshape(groups, q_count * cols, rows)

    def apply(mats, vec, weights, size):  # Σ_q weights[f, q] · (A_q-ish) vec[f, g]
        stacked = np.concatenate([vec.real, vec.imag], axis=0).astype(np.float32)
        stacked = stacked.transpose(1, 2, 0)  # (g, n, 2F)
        out = np.matmul(mats, stacked).reshape(groups, q_count, size, 2, -1)  # one real GEMM
        out = out[:, :, :, 0] + 1j * out[:, :, :, 1]  # (groups, Q, size, F)
        return np.einsum("fq,gqsf->fgs", weights, out, optimize=True)

    def matvec(q):
        v = q.reshape(len(thetas), groups, cols)
        u = apply(forward, v, phase, rows)
        return apply(backward, u, np.conj(phase), cols).reshape(len(q), cols)

    start = np.random.default_rng(0).standard_normal((len(thetas) * groups, cols)) + 0j
    return lanczos_ritz(matvec, start, min(_RANK_STEPS, cols))


def _top_pair(a: np.ndarray, v: np.ndarray | None):
    """``(σ, u, v)`` top singular triplet of a complex matrix: an SVD from scratch (power steps
    from a fixed random vector on large matrices, where the SVD is the cost of the search), or a
    few power steps from the previous step's vector (the ascent moves θ little between steps)."""
    steps = _WARM_STEPS
    if v is None and min(a.shape) <= _SVD_SIDE:
        u, s, vh = np.linalg.svd(a)
        return float(s[0]), u[:, 0], np.conj(vh[0])
    if v is None:
        rng = np.random.default_rng(0)
        v = rng.standard_normal(a.shape[1]) + 1j * rng.standard_normal(a.shape[1])
        steps = _COLD_STEPS
    for _ in range(steps):
        w = np.conj(np.conj(a @ v) @ a)  # aᴴ(av), without forming a conjugated copy of a
        v = w / np.linalg.norm(w)
    av = a @ v
    sigma = float(np.linalg.norm(av))
    return sigma, av / max(sigma, 1e-300), v


def _refine(taps_g: np.ndarray, shifts: np.ndarray, theta: np.ndarray, iterations: int = 40):
    """Gradient ascent on ``σ_max(Â(θ))`` from ``theta``; returns ``(σ, θ, v)``.

    ``dσ/dθ_d = Re(uᴴ (Σ_q i q_d A_q e^{iθ·q}) v)`` for the top singular pair ``(u, v)``.
    Steps double while ``σ`` rises and shrink fourfold when it does not, so that each step's
    top pair is warm-started from a nearby one. (A quasi-Newton ascent was tried: its longer
    steps left the warm-started power steps less accurate than the differences of ``σ`` it
    compared, and it stopped short of the peak on large random symbols.)
    """

    flat = taps_g.reshape(len(taps_g), -1)  # real (Q, R·C): real products, complex phases

    def evaluate(th, v):
        phase = np.exp(1j * (shifts @ th))
        parts = np.stack([phase.real, phase.imag]) @ flat  # one pass over the taps
        a = (parts[0] + 1j * parts[1]).reshape(taps_g.shape[1:])
        sigma, u, v = _top_pair(a, v)
        coupling = (_taps_times(taps_g, v) @ np.conj(u)) * phase  # uᴴ A_q v e^{iθ·q}
        grad = np.real(1j * coupling) @ shifts
        return sigma, v, grad

    sigma, v, grad = evaluate(theta, None)
    step = 0.5 / max(sigma, 1e-300)
    for _ in range(iterations):
        if not np.any(grad) or step * np.linalg.norm(grad) < _ANGLE_TOL:
            break
        trial = theta + step * grad
        s2, v2, g2 = evaluate(trial, v)
        if s2 > sigma:
            theta, sigma, v, grad = trial, s2, v2, g2
            step *= 2.0
        else:
            step *= 0.25
    return sigma, theta, v


def _tilt(taps_g: np.ndarray, shifts: np.ndarray, theta: np.ndarray,
          v: np.ndarray) -> np.ndarray | None:
    """``∂v/∂θ_d`` at a peak: how the top right singular vector of ``Â(θ)`` turns with ``θ``.

    A wave packet ``φ(m) e^{iθ*·m}`` spreads over frequencies ``θ* + δ`` near the peak, and at
    each of them the best channel vector is ``v(θ* + δ) ≈ v + δ·∂v``: in space, the packet
    ``e^{iθ*·m} (v φ(m) − i Σ_d ∂_d v ∂_d φ(m))``. First-order perturbation of
    ``H = ÂᴴÂ`` (``λ`` simple): ``(λ − H) ∂v = (1 − vvᴴ) ∂H v`` with ``∂v ⊥ v``.

    Returns:
        ``(D, cols)`` complex, or ``None`` when ``λ`` is (nearly) multiple and ``∂v`` is not
        defined.
    """
    phase = np.exp(1j * (shifts @ theta))
    a = np.tensordot(phase, taps_g, axes=1)
    av = a @ v
    lam = float(np.real(np.vdot(av, av)))
    # (λ − H + λ vvᴴ) is invertible when λ is simple: v is mapped to λv, its complement kept.
    system = lam * np.eye(len(v)) - np.conj(a.T) @ a + lam * np.outer(v, np.conj(v))
    # ∂_dH v = ∂_dAᴴ (Av) + Aᴴ (∂_dA v), with ∂_dA = Σ_q w_dq A_q, w_dq = i q_d e^{iθ·q}: two
    # passes over the taps for every d at once, no ∂_dA formed.
    weights = 1j * shifts.T * phase  # (D, Q)
    da_v = weights @ _taps_times(taps_g, v)  # (D, R)
    dh_v = np.conj(weights) @ _taps_times(np.swapaxes(taps_g, -1, -2), av)  # ∂_dAᴴ(Av): (D, C)
    dh_v = dh_v + np.conj(np.conj(da_v) @ a)
    rhs = dh_v - np.outer(dh_v @ np.conj(v), v)  # rows: (1 − vvᴴ) ∂_dH v
    try:
        tilt = np.linalg.solve(system, rhs.T).T
    except np.linalg.LinAlgError:
        return None
    return tilt if np.all(np.isfinite(tilt)) else None


def conv_start(spec: ConvSpec, channels_last: bool = True,
               grid_out: Sequence[int] | None = None) -> np.ndarray | None:
    """A starting vector close to the top right singular vector of a convolution.

    Args:
        spec: The convolution (see :class:`tf_lipschitz.certify.ConvSpec`), already scaled by
            any folded per-channel diagonals.
        channels_last: Layout of the returned vector.
        grid_out: Spatial output size; when given, a plain stride-1 convolution's start is
            refined on the channel subspace of its waves (:func:`_channel_subspace_refine`).

    Returns:
        An array shaped like one input example, or ``None`` when no start is built (transposed
        convolutions, grids below :data:`MIN_SPATIAL` positions, and pointwise convolutions:
        see below).

    A convolution whose polyphase kernel has one tap on every axis (1×1 kernels at any stride,
    or any kernel whose dilated extent ``d(k−1)+1`` is at most the stride) has a constant
    symbol: it applies one matrix at every position, so its top
    singular value is repeated once per output position and a random start already has a
    large component in that space. On ResNet50 at 224×224 Lanczos needs 7-42 products from a
    random start on these layers (milliseconds), while the start's search costs up to 1.6 s
    (the stride-2 ones, whose polyphase matrices are 2048×1024).
    """
    if spec.adjoint or math.prod(spec.spatial) < MIN_SPATIAL:
        return None
    if all(m == 1 for m in spec.grid()):
        return None
    taps, shifts = spec.taps()
    if not np.any(taps):
        return None
    scale = float(np.max(np.abs(taps)))
    taps = taps / scale
    peaks = []
    for theta, group in _peak_coarse(taps, shifts, spec.grid()):
        sigma, theta, v = _refine(taps[:, group], shifts, np.asarray(theta, np.float64))
        if all(g != group or _angle_gap(theta, t) > 1e-3 for _, t, _, g in peaks):
            peaks.append((sigma, theta, v, group))
    top = max(p[0] for p in peaks)
    # Near-ties: on a finite grid the boundary lowers sharp peaks more than flat ones, so the
    # symbol's best peak need not carry the operator's top vector. A sum of the nearly
    # orthogonal waves lets the Krylov space contain each of them.
    kept = [(theta, v, group, _tilt(taps[:, group], shifts, theta, v))
            for sigma, theta, v, group in peaks if sigma >= _KEEP * top]
    x = sum(_plane_wave(spec, theta, v, group, tilt) for theta, v, group, tilt in kept)
    norm = float(np.linalg.norm(x))
    if norm == 0:
        return None
    x = x / norm
    if grid_out is not None and _reducible(spec):
        vectors = [w for _, v, _, tilt in kept for w in [v, *(() if tilt is None else tilt)]]
        x = _channel_subspace_refine(spec, tuple(grid_out), x, vectors)
    return x if channels_last else np.moveaxis(x, -1, 0)


_REDUCED_RATIO = 0.25
"""Largest ``subspace dimension / input channels`` for which :func:`_channel_subspace_refine`
runs: its products cost about that fraction of the operator's."""
_REDUCED_TOL = 1e-4  # relative residual at which the reduced Lanczos stops
_REDUCED_PRODUCTS = 120  # and its cap on products


def _reducible(spec: ConvSpec) -> bool:
    """Whether the channel-subspace refinement applies: a plain stride-1 convolution (one
    group, not separable, not transposed) with a known left padding."""
    return (not spec.adjoint and spec.pointwise is None and spec.offset is not None
            and all(s == 1 for s in spec.strides) and spec.kernel.shape[spec.rank] == 1)


def _channel_basis(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """Orthonormal real basis ``(a, m)`` of the span of the real and imaginary parts."""
    stacked = np.stack(vectors, 1)
    real = np.concatenate([stacked.real, stacked.imag], 1)
    u, s, _ = np.linalg.svd(real, full_matrices=False)
    return u[:, s > 1e-8 * s[0]]


def _channel_subspace_refine(spec: ConvSpec, grid_out: tuple[int, ...], x0: np.ndarray,
                             vectors: Sequence[np.ndarray]) -> np.ndarray:
    """The top right singular vector of the convolution restricted to the inputs whose channel
    vector lies, at every position, in the real span ``S`` of the peaks' channel vectors and
    their tilts (Rayleigh–Ritz on that subspace), from ``x0`` (channels last).

    The waves of :func:`conv_start` lie in ``S`` but carry a guessed envelope (the box's lowest
    mode); the operator's top vector also lies in ``S`` up to second order in the packet's
    spread of frequencies, with an envelope set by the zero padding. Restricted to ``S``
    (``x[n] = Q g[n]``, ``Q`` an orthonormal ``a × m`` basis), the convolution is the
    convolution of ``m``-channel fields ``g`` with the taps ``Qᵀ K_t``: its products cost about
    ``m / a`` of the operator's, and Lanczos on it finds the envelope exactly. On VGG16's
    block3_conv1 (56×56×128) the full solver then needs 10 products instead of 58, for 56
    products at 16 % of the cost. Returns ``x0`` when ``S`` is too large for that to pay
    (:data:`_REDUCED_RATIO`).
    """
    q = _channel_basis(vectors)
    if q.shape[1] > _REDUCED_RATIO * spec.kernel.shape[spec.rank + 1]:
        return x0
    pads = subspace_pads(spec, grid_out)
    if pads is None:
        return x0
    kernel = subspace_kernel(spec, q)
    kernel = kernel / max(float(np.max(np.abs(kernel))), 1e-300)
    g0 = np.tensordot(x0, q, axes=1)[None].astype(np.float32)
    g = _reduced_top(tf.constant(g0), tf.constant(kernel.astype(np.float32)), pads,
                     tuple(spec.dilation))
    x = np.tensordot(np.asarray(g)[0].astype(np.float64), q.T, axes=1)
    norm = float(np.linalg.norm(x))
    return x / norm if np.isfinite(norm) and norm > 0 else x0


def subspace_kernel(spec: ConvSpec, q: np.ndarray) -> np.ndarray:
    """Taps ``Qᵀ K_t`` ``(k…, m, b)`` of a plain convolution restricted to inputs
    ``x[n] = Q g[n]`` (``q``: ``(a, m)``)."""
    return np.einsum("am,...ab->...mb", q, spec.kernel[..., 0, :, :])


def subspace_pads(spec: ConvSpec, grid_out: Sequence[int]) -> tuple | None:
    """``((left, right), …)`` zero padding per spatial axis after which a VALID convolution
    (dilation ``spec.dilation``) gives the layer's ``grid_out`` outputs, or ``None`` when some
    output would need inputs cropped away (not a convolution of this form)."""
    extent = [d * (k - 1) for k, d in zip(spec.kernel.shape[:spec.rank], spec.dilation)]
    pads = tuple((p, m + e - p - n)
                 for p, m, e, n in zip(spec.offset, grid_out, extent, spec.spatial))
    return None if any(right < 0 for _, right in pads) else pads


def subspace_conv(g: tf.Tensor, kernel: tf.Tensor, pads: Sequence[Sequence[int]],
                  dilation: Sequence[int]) -> tf.Tensor:
    """The restricted convolution of :func:`subspace_kernel` on a batch of fields ``g``
    (channels last)."""
    pad = [[0, 0], *[list(p) for p in pads], [0, 0]]
    return tf.nn.convolution(tf.pad(g, pad), kernel, padding="VALID", dilations=list(dilation))


def _reduced_top_fn(g0, kernel, pads, dilation):
    v, _, _ = lanczos_loop(lambda g: subspace_conv(g, kernel, pads, dilation), g0,
                           tf.constant(_REDUCED_TOL, tf.float64),
                           tf.constant(_REDUCED_PRODUCTS), 16)
    return v


_reduced_top = compiled(_reduced_top_fn, reduce_retracing=True)


def _plane_wave(spec: ConvSpec, theta: np.ndarray, v: np.ndarray, group: int,
                tilt: np.ndarray | None = None) -> np.ndarray:
    """``x[n, channel] = Re((V φ(n) − i Σ_d ∂_dV ∂_dφ(n))[r(n), channel] e^{iθ·m(n)})`` on the
    input grid, with ``n + offset = s·m + r`` the polyphase decomposition of position ``n``,
    ``φ`` the lowest mode of the box and ``∂_dV`` the ``tilt`` of :func:`_tilt` (derivatives in
    ``m``: ``∂φ/∂m_d = s_d ∂φ/∂n_d``), channels last, of unit norm."""
    rank = spec.rank
    groups, a = spec.kernel.shape[rank], spec.kernel.shape[rank + 1]
    phases = math.prod(spec.strides)

    def channels(vec):  # (phases, groups · a): the channel vector of each polyphase component
        full = np.zeros((groups, phases, a), np.complex128)
        if spec.pointwise is not None:  # separable: columns are (group, phase, channel), a = 1
            full[:] = vec.reshape(groups, phases, a)
        else:
            full[group] = vec.reshape(phases, a)
        return np.moveaxis(full, 1, 0).reshape(phases, groups * a)

    offset = spec.offset or (0,) * rank
    axes = [np.arange(n) + p for n, p in zip(spec.spatial, offset)]
    mesh = np.meshgrid(*axes, indexing="ij")
    m = [g // s for g, s in zip(mesh, spec.strides)]
    r = np.ravel_multi_index([g % s for g, s in zip(mesh, spec.strides)], spec.strides).ravel()
    wave = np.exp(1j * sum(t * mi for t, mi in zip(theta, m)))
    sines, slopes = [], []
    for d, n in enumerate(spec.spatial):
        shape = [1] * rank
        shape[d] = n
        angle = math.pi * (np.arange(n) + 1) / (n + 1)
        sines.append(np.sin(angle).reshape(shape))
        slopes.append((spec.strides[d] * math.pi / (n + 1) * np.cos(angle)).reshape(shape))
    # Re(f(n) c[r(n)]) = Re f · Re c − Im f · Im c: each term is a spatial field times a
    # channel vector per phase, so the start is two small real GEMMs per phase (the wave,
    # then its tilt, kept apart for the check below).
    fields = [wave * math.prod(sines)]
    vectors = [channels(v)]
    for d in range(rank if tilt is not None else 0):
        fields.append(-1j * wave * math.prod(slopes[e] if e == d else sines[e]
                                             for e in range(rank)))
        vectors.append(channels(tilt[d]))
    spatial = np.stack([f.ravel() for f in fields], -1)  # (positions, terms)
    spatial = np.concatenate([spatial.real, -spatial.imag], -1)
    wave_cols = [0, len(fields)]  # the wave's real and imaginary columns; the rest: tilt
    tilt_cols = [k for k in range(2 * len(fields)) if k not in wave_cols]
    parts = np.zeros((2, len(r), groups * a))  # the wave, then the tilt
    for p in range(phases):
        rows = np.flatnonzero(r == p) if phases > 1 else slice(None)
        coeff = np.stack([vec[p] for vec in vectors])  # (terms, channels)
        coeff = np.concatenate([coeff.real, coeff.imag], 0)
        for part, cols in zip(parts, (wave_cols, tilt_cols)):
            part[rows] = spatial[rows][:, cols] @ coeff[cols]
    x, extra = parts
    # A first-order term larger than the wave itself means a nearly multiple top eigenvalue
    # at the peak, where ∂v is not defined: keep the plain wave.
    if tilt is not None and np.linalg.norm(extra) <= 0.5 * np.linalg.norm(x):
        x = x + extra
    x = x.reshape(*spec.spatial, groups * a)
    return x / max(float(np.linalg.norm(x)), 1e-300)


def group_start(members: Sequence[tuple[Any, Any]]) -> np.ndarray | None:
    """A Fourier start for a fused chain (see :func:`conv_start`), or ``None``.

    Built when the chain is one convolution with per-channel diagonal layers folded around it
    (Conv → BatchNormalization, Rescaling → Conv) and too large for a dense matrix.

    Args:
        members: ``(Linear bound, graph node)`` pairs of the chain, in order.
    """
    first, last = members[0][1], members[-1][1]
    if _small(first.input_shapes[0], last.output_shapes[0]):
        return None
    folds, used = fold_diagonals(members)
    if len(folds) != 1 or not all(used):
        return None
    index, in_scale, out_scale = folds[0]
    cert = members[index][0].certificate
    if not isinstance(cert, LayerCertificate) or cert.spec is None:
        return None
    shape = tuple(cert.input_shape)
    if shape != tuple(first.input_shapes[0]):
        return None
    spec = cert.spec(in_scale, out_scale)
    out = tuple(cert.output_shape)
    grid_out = out[-spec.rank - 1:-1] if cert.channel_axis == -1 else out[-spec.rank:]
    start = conv_start(spec, channels_last=cert.channel_axis == -1, grid_out=grid_out)
    if start is not None and len(shape) == spec.rank + 2:
        # a graph convolution on a batch of B images (I_B ⊗ A): the same start in each image
        start = np.broadcast_to(start, shape) / math.sqrt(shape[0])
    return start
