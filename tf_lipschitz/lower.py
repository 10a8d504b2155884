"""Lower bounds and a statistical estimate of the Lipschitz constant.

For any ``x`` where ``f`` is differentiable and any unit ``v``, ``‖J_f(x) v‖ ≤ L(f)``
(shared/ALGORITHMS.md §6). :func:`lower_bound` maximises that quantity:

1. starting points: data points (if given) and random Gaussian inputs;
2. at each point, power iteration on ``J(x)ᵀJ(x)`` through forward-mode (JVP) and reverse-mode
   (VJP) products gives the top right singular vector ``v``;
3. the points move by gradient ascent on ``‖J(x) v‖²`` (second-order autodiff: useful for
   smooth activations) and by random proposals accepted when they increase it (useful for
   piecewise-linear networks, whose Jacobian is locally constant).

Everything runs batched inside one ``tf.function``. :func:`extreme_value_estimate` fits a
generalised extreme-value distribution to per-batch maxima of ``‖J(x)‖`` in the manner of CLEVER
(Weng et al., ICLR 2018); its result is an *estimate*, never a bound.
"""

from __future__ import annotations

import weakref
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from tf_lipschitz.report import ExtremeValueEstimate, LowerBound

__all__ = ["jacobian_norms", "lower_bound", "extreme_value_estimate"]


def _per_example_norm(t: tf.Tensor) -> tf.Tensor:
    return tf.sqrt(tf.reduce_sum(tf.square(tf.reshape(t, [tf.shape(t)[0], -1])), axis=1))


def _normalize(v: tf.Tensor) -> tf.Tensor:
    n = _per_example_norm(v)
    shape = tf.concat([tf.shape(v)[:1], tf.ones([tf.rank(v) - 1], tf.int32)], 0)
    return v / tf.reshape(tf.maximum(n, 1e-30), shape)


def _jvp(f, x, v):
    with tf.autodiff.ForwardAccumulator(x, v) as acc:
        y = f(x)
    return y, acc.jvp(y)


def _jtj(f, x, v):
    """``(‖J v‖ per example, JᵀJ v)`` at the points ``x``."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        y, jv = _jvp(f, x, v)
    jv = tf.stop_gradient(jv)
    return _per_example_norm(jv), tape.gradient(y, x, output_gradients=jv)


def _power(f, x, v, iters):
    def body(k, v):
        _, g = _jtj(f, x, v)
        return k + 1, _normalize(g)

    _, v = tf.while_loop(lambda k, v: k < iters, body, (tf.constant(0), v))
    _, jv = _jvp(f, x, v)
    return _per_example_norm(jv), v


def jacobian_norms(f: Callable, x, *, iters: int = 30, seed: int = 0) -> np.ndarray:
    """Spectral norms of the Jacobian of ``f`` at each example of the batch ``x``.

    Each value is a lower bound on the Lipschitz constant of ``f`` (where ``f`` is
    differentiable at that point).
    """
    x = tf.convert_to_tensor(x)
    v = _normalize(tf.random.stateless_normal(tf.shape(x), [seed, 1], dtype=x.dtype))
    s, _ = _POWER(f, x, v, tf.constant(iters))
    return s.numpy()


def _ascent(f, x, v, scale, steps, lr, noise, power_iters, seed):
    """Batched hill climbing on ``‖J(x) v‖`` with gradient and random proposals."""
    best_s, v = _power(f, x, v, power_iters)

    def objective(xc, vc):
        _, jv = _jvp(f, xc, vc)
        return _per_example_norm(jv)

    def body(t, x, v, best_s):
        decay = tf.pow(tf.cast(0.97, x.dtype), tf.cast(t, x.dtype))
        # (1) refresh the direction at the current points
        _, v = _power(f, x, v, power_iters)
        # (2) gradient proposal (second order: zero for piecewise-linear nets)
        with tf.GradientTape() as tape:
            tape.watch(x)
            _, jv = _jvp(f, x, v)
            obj = tf.reduce_sum(tf.square(jv))
        grad = tape.gradient(obj, x)
        grad = tf.where(tf.math.is_finite(grad), grad, tf.zeros_like(grad))
        x_grad = x + lr * decay * scale * _normalize(grad) * tf.sqrt(tf.cast(tf.size(x[0]), x.dtype))
        # (3) random proposal
        eps = tf.random.stateless_normal(tf.shape(x), tf.stack([seed, t]), dtype=x.dtype)
        x_rand = x + noise * decay * scale * eps
        cands = [x, x_grad, x_rand]
        values = tf.stack([objective(c, v) for c in cands], axis=0)  # (3, batch)
        values = tf.where(tf.math.is_finite(values), values, tf.zeros_like(values))
        pick = tf.argmax(values, axis=0, output_type=tf.int32)
        stacked = tf.stack(cands, axis=0)
        idx = tf.stack([pick, tf.range(tf.shape(x)[0])], axis=1)
        x_new = tf.gather_nd(stacked, idx)
        return t + 1, x_new, v, tf.reduce_max(values, axis=0)

    _, x, v, best_s = tf.while_loop(
        lambda t, *_: t < steps, body, (tf.constant(0), x, v, best_s)
    )
    s, v = _power(f, x, v, power_iters * 4)
    return x, v, s


_MODEL_FNS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


# Compiled once per process; the model callable is part of the cache key, so each model's
# graph is traced once and reused by later calls (the callback calls these every epoch).
_ASCENT = tf.function(_ascent, autograph=False, reduce_retracing=True)
_POWER = tf.function(_power, autograph=False, reduce_retracing=True)


def _as_model_fn(model) -> Callable:
    """A batched callable for ``model``, cached so that compiled functions are traced once."""
    if isinstance(model, keras.Model):
        if model in _MODEL_FNS:
            return _MODEL_FNS[model]
        if len(model.inputs) != 1:
            raise ValueError(
                f"Model '{model.name}' has {len(model.inputs)} inputs; lower_bound() supports "
                "single-input models. Wrap the inputs into one tensor first."
            )

        def fn(x):
            out = model(x, training=False)
            if isinstance(out, (list, tuple, dict)):
                flat = tf.nest.flatten(out)
                out = tf.concat([tf.reshape(o, [tf.shape(o)[0], -1]) for o in flat], axis=1)
            return out

        _MODEL_FNS[model] = fn
        return fn
    if callable(model):
        return model
    raise TypeError(f"Expected a keras.Model or a callable, received {model!r}.")


def _starts(x, input_shape, n_random, dtype, rng):
    parts = []
    if x is not None:
        parts.append(np.asarray(x, dtype=dtype).reshape((-1, *input_shape)))
    if n_random > 0:
        scale = float(np.std(parts[0])) if parts else 1.0
        mean = float(np.mean(parts[0])) if parts else 0.0
        parts.append(
            (mean + scale * rng.standard_normal((n_random, *input_shape))).astype(dtype)
        )
    if not parts:
        raise ValueError("lower_bound needs data points x or n_random > 0.")
    return np.concatenate(parts, axis=0)


def lower_bound(
    model,
    input_shape: tuple[int, ...],
    x=None,
    *,
    n_random: int = 16,
    steps: int = 50,
    power_iters: int = 5,
    learning_rate: float = 0.05,
    noise: float = 0.1,
    batch_size: int = 64,
    seed: int = 0,
    verbose: int = 0,
    dtype: str = "float32",
) -> LowerBound:
    """Maximises ``‖J_f(x) v‖`` over inputs; the result is a proven lower bound on ``L(f)``.

    Args:
        model: A single-input Keras model, or a batched callable.
        input_shape: Shape of one example.
        x: Optional data points ``(n, *input_shape)`` used as starting points.
        n_random: Random Gaussian starting points (matched to the data's mean and spread).
        steps: Ascent steps.
        power_iters: Power iterations per step at each point.
        learning_rate: Gradient step, relative to the data scale times ``√dim``.
        noise: Random-proposal step, relative to the data scale.
        batch_size: Starting points processed together.
        seed: Random seed.
        verbose: 1 shows a progress bar over batches.
        dtype: Input dtype.

    Returns:
        A :class:`~tf_lipschitz.report.LowerBound`.
    """
    if steps < 0 or power_iters < 1 or batch_size < 1:
        raise ValueError(
            f"Expected steps >= 0, power_iters >= 1, batch_size >= 1; received steps={steps}, "
            f"power_iters={power_iters}, batch_size={batch_size}."
        )
    f = _as_model_fn(model)
    rng = np.random.default_rng(seed)
    starts = _starts(x, tuple(input_shape), n_random, dtype, rng)
    scale = float(np.std(starts)) or 1.0
    ascent = _ASCENT
    best = (-1.0, None, None)
    n_batches = (len(starts) + batch_size - 1) // batch_size
    bar = keras.utils.Progbar(n_batches, verbose=verbose, unit_name="batch") if verbose else None
    for b in range(n_batches):
        xb = tf.convert_to_tensor(starts[b * batch_size:(b + 1) * batch_size])
        v0 = _normalize(tf.random.stateless_normal(tf.shape(xb), [seed, b], dtype=xb.dtype))
        xs, vs, ss = ascent(
            f, xb, v0, tf.constant(scale, xb.dtype), tf.constant(steps),
            tf.constant(learning_rate, xb.dtype), tf.constant(noise, xb.dtype),
            tf.constant(power_iters), tf.constant(seed),
        )
        ss = ss.numpy()
        k = int(np.nanargmax(ss))
        if ss[k] > best[0]:
            best = (float(ss[k]), xs.numpy()[k], vs.numpy()[k])
        if bar is not None:
            bar.update(b + 1, values=[("lower", best[0])])
    value, x_best, v_best = best
    eps = 1e-3 * (float(np.linalg.norm(x_best)) / np.sqrt(x_best.size) + 1.0)
    x64 = tf.convert_to_tensor(x_best[None])
    y0 = f(x64)
    y1 = f(x64 + eps * tf.convert_to_tensor(v_best[None]))
    secant = float(np.linalg.norm(np.asarray(y1 - y0).ravel()) / eps)
    evaluations = len(starts) * (power_iters * (steps + 1) * 2 + steps * 5 + power_iters * 8)
    return LowerBound(value=value, x=x_best, direction=v_best, secant=secant,
                      evaluations=evaluations, starts=len(starts))


def extreme_value_estimate(
    model,
    input_shape: tuple[int, ...],
    x=None,
    *,
    batches: int = 50,
    batch_size: int = 32,
    radius: float = 1.0,
    power_iters: int = 20,
    fit_steps: int = 800,
    seed: int = 0,
    verbose: int = 0,
    dtype: str = "float32",
) -> ExtremeValueEstimate:
    """A CLEVER-style estimate of ``L(f)``: a GEV fit to per-batch maxima of ``‖J_f(x)‖``.

    Points are drawn uniformly in balls of ``radius`` (relative to the data scale) around the
    data points, or from a standard Gaussian without data. The fit uses
    ``tfp.distributions.GeneralizedExtremeValue`` by maximum likelihood. The result is a
    statistical **estimate**: it can fall below the true constant.

    Args:
        model: Single-input Keras model or batched callable.
        input_shape: Shape of one example.
        x: Optional data points around which to sample.
        batches: Number of batch maxima to fit.
        batch_size: Samples per batch.
        radius: Sampling radius relative to the data's spread.
        power_iters: Power iterations per sample.
        fit_steps: Adam steps of the likelihood fit.
        seed: Random seed.
        verbose: 1 shows a progress bar.
        dtype: Input dtype.

    Returns:
        An :class:`~tf_lipschitz.report.ExtremeValueEstimate`.
    """
    import tensorflow_probability as tfp  # heavy import, only needed here

    if batches < 3 or batch_size < 1:
        raise ValueError(f"Need batches >= 3 and batch_size >= 1; received {batches}, {batch_size}.")
    f = _as_model_fn(model)
    rng = np.random.default_rng(seed)
    shape = tuple(input_shape)
    dim = int(np.prod(shape))
    data = None if x is None else np.asarray(x, dtype=dtype).reshape((-1, *shape))
    spread = float(np.std(data)) if data is not None else 1.0
    power = _POWER
    maxima = []
    bar = keras.utils.Progbar(batches, verbose=verbose, unit_name="batch") if verbose else None
    for b in range(batches):
        if data is not None:
            centers = data[rng.integers(0, len(data), batch_size)]
            direction = rng.standard_normal((batch_size, dim))
            direction /= np.linalg.norm(direction, axis=1, keepdims=True)
            r = radius * spread * np.sqrt(dim) * rng.random(batch_size) ** (1.0 / dim)
            pts = centers + (direction * r[:, None]).reshape((batch_size, *shape))
        else:
            pts = rng.standard_normal((batch_size, *shape))
        pts = tf.convert_to_tensor(pts.astype(dtype))
        v0 = _normalize(tf.random.stateless_normal(tf.shape(pts), [seed, b], dtype=pts.dtype))
        s, _ = power(f, pts, v0, tf.constant(power_iters))
        maxima.append(float(np.max(s.numpy())))
        if bar is not None:
            bar.update(b + 1)
    sample = np.asarray(maxima, dtype="float64")
    mu0, sd0 = float(sample.mean()), float(sample.std() + 1e-12)
    z = tf.constant((sample - mu0) / sd0)
    loc = tf.Variable(0.0, dtype=tf.float64)
    log_scale = tf.Variable(np.log(0.8), dtype=tf.float64)
    conc = tf.Variable(-0.1, dtype=tf.float64)
    opt = keras.optimizers.Adam(learning_rate=0.02)

    @tf.function(autograph=False)
    def fit_step():
        with tf.GradientTape() as tape:
            dist = tfp.distributions.GeneralizedExtremeValue(
                loc=loc, scale=tf.exp(log_scale), concentration=conc
            )
            nll = -tf.reduce_mean(dist.log_prob(z))
            # log_prob is -inf outside the support; keep the optimiser out of there
            nll = tf.where(tf.math.is_finite(nll), nll, tf.constant(1e6, tf.float64))
        grads = tape.gradient(nll, [loc, log_scale, conc])
        grads = [tf.where(tf.math.is_finite(g), g, tf.zeros_like(g)) for g in grads]
        opt.apply_gradients(zip(grads, [loc, log_scale, conc]))
        return nll

    for _ in range(fit_steps):
        fit_step()
    loc_v = mu0 + sd0 * float(loc.numpy())
    scale_v = sd0 * float(np.exp(log_scale.numpy()))
    conc_v = float(conc.numpy())
    # TFP's GEV with concentration ξ < 0 has support bounded above at loc - scale / ξ.
    value = loc_v - scale_v / conc_v if conc_v < 0 else loc_v
    return ExtremeValueEstimate(
        value=float(value), loc=loc_v, scale=scale_v, concentration=conc_v,
        sample_max=float(sample.max()), batches=batches, batch_size=batch_size,
    )
