"""The accumulation arithmetic every route shares, written once.

A *window* is the run of micro-batches between two real updates. Each
micro-batch gradient is added weighted by the micro-batch's size, so the
update applies

    sum_k b_k * g_k / sum_k b_k

which is exactly the gradient of the big batch made of those micro-batches
when the loss is a per-sample mean (Keras' default reduction). A short
micro-batch therefore counts for what it holds, and a short window at the end
of an epoch equals the big batch's short last batch.

Where a variable is large (IN_PLACE_ELEMENTS), the sums are kept divided by
the window's *planned* weight, n times its first micro-batch's size: each
micro-batch adds b_k / planned * g_k in one fused pass. A window whose
micro-batches are all that large (the usual case) then holds its mean when it
is due, and hands it over as it is; any other (a short last window, n changed
mid-window) is scaled by planned / sum_k b_k first. A route that computes the
loss itself (the model route) folds b_k / planned into each micro-batch's
loss instead, one scalar multiply (`prescales`), and the window adds the
gradients as they come. Windows of small variables
only plan 1: their sums are the weighted sums, and their mean a small pass.

The window also knows where the current epoch ends (when the route tells it)
so that a partial window can be applied in the same step as the epoch's last
micro-batch, before validation runs.

Under a `tf.distribute` strategy (eager, in a replica's training step) the
window's variables are per replica (sync-on-read): each replica adds its own
gradients with no communication, and the replicas meet once, when the window
is due, to run the update, whose all-reduce is the optimizer's own. So the
gradients are all-reduced once per window, not once per micro-batch.

Only TensorFlow ops that exist on TF 1.15 and TF 2.x are used; every method
returns its op so that graph-mode callers can order them with control
dependencies (in a `tf.function`, program order is kept automatically).
"""

import re

import numpy as np
import tensorflow as tf

from ._compat import variable_key

_FLOAT_ACCUMULATORS = (tf.float32, tf.float64)
# The names (in `state`) of what holds the open window: the counters, and
# each variable's sum and sparse-row marker ("_2" tells apart a second
# variable of the same name).
_OPEN_NAME = re.compile(r"^(count|weight|planned)$|/(sum|rows|pooled_count|pooled_mean|pooled_m2)(_\d+)?$")
_SUM_NAME = re.compile(r"/sum(_\d+)?$")

# What a route does with a partial window when an epoch ends: apply it as one
# update weighted by its samples, or carry it into the next epoch.
APPLY = "apply"
CARRY = "carry"
EPOCH_END_CHOICES = (APPLY, CARRY)

# How the window's gradients are combined: their size-weighted mean (the big
# batch's gradient), or their weighted sum (gradient-accumulator's
# reduction="SUM", kept for code migrating from it).
MEAN = "mean"
SUM = "sum"
REDUCTIONS = (MEAN, SUM)


class Window(object):
    """Weighted gradient sums and counters between two updates.

    The variables are created lazily, under `tf.init_scope`, so a route may
    call `build` from inside the first trace of its training function. Keras
    does not track them: they are training machinery, not model weights, so
    `get_weights()` and saved weights do not contain them. `state` holds them
    under stable names, for an owner that wants them in its checkpoints (the
    optimizer wrapper does; a model keeps the Window as a plain attribute).

    Args:
        n: Micro-batches per update.
        reduction: MEAN (the size-weighted mean, exact against the big batch)
            or SUM (the weighted sum).
        skip_nonfinite: Skip a window whose gradients hold an inf or a nan
            (see `apply`) instead of applying it as the big batch would.
        agc, agc_eps: Adaptive clipping of the mean (`adaptive_clip`) with
            clip factor `agc`, None for none.
        epochs: Whether the owner announces epochs (`epoch_start_values`),
            as the model route does. An owner that never does (the optimizer
            wrappers) spares each micro-step the epoch's counting and test.
    """

    def __init__(self, n, reduction=MEAN, skip_nonfinite=False, agc=None, agc_eps=1e-3, epochs=True):
        self.n = n  # (the variable `n_variable` is what the training graph reads)
        self.epochs = epochs
        self.reduction = reduction
        self.skip_nonfinite = skip_nonfinite
        self.agc = agc  # None, or the clip factor of adaptive clipping of the mean
        self.agc_eps = agc_eps
        self.state = _State()
        self._sums = {}  # variable_key(var) -> accumulator variable
        self._rows = {}  # variable_key(var) -> rows touched by sparse gradients
        # (variable_key(moving_mean), call) -> _Pooled: a BatchNormalization
        # layer's statistics over the window, per call of the layer in a
        # step (see `add_moments`), in the order they came.
        self._pooled = {}
        self.n_variable = None  # micro-batches per update, settable between steps
        self.count = None  # micro-batches in the open window
        self.weight = None  # samples in the open window
        # What the open window's sums are divided by (see the module's
        # docstring); 1 in an empty window, so that sums restored from a
        # checkpoint that has none (saved before windows planned, when the
        # sums were kept undivided) are read as they were meant.
        self.planned = None
        self.epoch_step = None  # micro-batches seen in this epoch
        self.epoch_steps = None  # micro-batches in this epoch, -1 if unknown
        self.skipped = None  # windows skipped for non-finite gradients
        self._strategy = None  # the tf.distribute strategy the variables belong to
        # Every variable that has an accumulator, in the order they came. The
        # mean covers all of them: a variable whose gradient is None in one
        # micro-batch of a window but not in another keeps its sum.
        self.variables = []
        # Saved values of variables not created yet (see `restore`), by name.
        self._pending = {}
        # variable_key(var) -> the name its restored sum was saved under, where it differs.
        self._saved_names = {}
        # Whether a trace handed this window gradients of a loss already
        # multiplied by `loss_factor` (see `prescales`); such a window plans.
        self._prescaled = False

    @property
    def built(self):
        return self.count is not None

    def build(self, variables=()):
        """Creates the counters, and one accumulator per variable (idempotent)."""
        missing = []
        for var in variables:
            if variable_key(var) not in self._sums and all(var is not other for other in missing):
                missing.append(var)
        if self.count is not None and not missing:
            return

        def create():
            if self.count is None:
                # (create() runs under the strategy's scope, if there is one.)
                self._strategy = tf.distribute.get_strategy() if tf.distribute.has_strategy() else None
                # Not in `state`: n is a setting, whose one source is the
                # owner's n (its config; a schedule sets it each epoch). A
                # checkpoint restoring it would leave that n stale.
                self.n_variable = _counter("gradaccum/n", tf.int64, self.n)
                self.count = self._track("count", _counter("gradaccum/count", tf.int64, 0))
                self.weight = self._track("weight", _variable(0.0, "gradaccum/weight", tf.float32))
                self.planned = self._track("planned", _variable(
                    1.0, "gradaccum/planned", tf.float32, tf.VariableAggregation.ONLY_FIRST_REPLICA))
                self.epoch_step = self._track("epoch_step", _counter("gradaccum/epoch_step", tf.int64, 0))
                self.epoch_steps = self._track("epoch_steps", _counter("gradaccum/epoch_steps", tf.int64, -1))
                self.skipped = self._track("skipped", _counter("gradaccum/skipped", tf.int64, 0))
            unrestored = []
            for var in missing:
                restored = len(self.state.restored)
                self._sums[variable_key(var)] = self._track(
                    _name(var, "sum"),
                    _variable(tf.zeros(var.shape, _accumulator_dtype(var)), _name(var, "sum")))
                self.variables.append(var)
                if len(self.state.restored) == restored:
                    unrestored.append(var)
            self._restore_by_position(unrestored)

        _create_variables(create)

    def _restore_by_position(self, unrestored):
        """Gives restored sums saved under other names to `unrestored` variables, in order.

        A model rebuilt from a file can name its variables anew (a reloaded
        subclassed model names its layers from Keras' counters), while its
        variables come in the same order, the order their sums were made and
        saved in. Matched by position only when every one is accounted for
        and every shape agrees; otherwise the window could not continue, and
        saying so beats training on a window that lost its sums.
        """
        saved = [(name, value) for name, value in self._pending.items() if _SUM_NAME.search(name)]
        if not saved or not unrestored:
            return
        shapes_agree = len(saved) == len(unrestored) and all(
            tuple(np.shape(value)) == tuple(var.shape) for (_, value), var in zip(saved, unrestored))
        if not shapes_agree:
            raise ValueError(
                "gradaccum: the restored window holds sums for {} that this model's variables {} "
                "do not match (by name, or in order and shape), so its open window cannot "
                "continue. Restore into the model that was saved, or empty the window first. "
                "Received: saved sums {}".format(
                    [name for name, _ in saved], [_name(var, "sum") for var in unrestored],
                    [(name, tuple(np.shape(value))) for name, value in saved]))
        for (name, value), var in zip(saved, unrestored):
            self._sums[variable_key(var)].assign(self._pending.pop(name))
            self._saved_names[variable_key(var)] = _SUM_NAME.sub("", name)

    def add(self, grads_and_vars, batch_size, prescaled=False):
        """Adds one micro-batch: sum += batch_size / planned * grad, count += 1.

        A window's first micro-batch writes the sums instead, and sets the
        window's planned weight (`_write_or_add`). `prescaled`: the gradients
        are of a loss multiplied by `loss_factor(batch_size)` already, so
        they are added as they are.
        """
        weight = tf.cast(batch_size, tf.float32)
        updates = []
        grads = {}  # variable_key(var) -> gradient, in its sum's dtype
        for grad, var in grads_and_vars:
            if grad is None:
                continue
            total = self._sums[variable_key(var)]
            if isinstance(grad, tf.IndexedSlices):
                # Embedding-style gradients touch few rows; add only those,
                # and remember which rows they were (see `mean`).
                rows = self._touched_rows(var)
                updates.append(rows.scatter_update(tf.IndexedSlices(
                    tf.ones_like(grad.indices, tf.int32), grad.indices)))
                grad = tf.IndexedSlices(tf.cast(grad.values, total.dtype), grad.indices, grad.dense_shape)
            else:
                grad = tf.cast(grad, total.dtype)
            grads[variable_key(var)] = grad
        updates.append(self._write_or_add(grads, weight, prescaled))
        with tf.control_dependencies(updates):  # (graph mode: the count is read first)
            updates += [self.weight.assign_add(weight), self.count.assign_add(1)]
            if self.epochs:
                updates.append(self.epoch_step.assign_add(1))
        return tf.group(*updates)

    def _write_or_add(self, grads, weight, prescaled=False):
        """The sums' part of `add`: a window's first micro-batch writes them, later ones add.

        The first also sets the window's planned weight (`_planned`), by
        which every micro-batch's weight is divided. Adding is one fused
        pass (`_add_scaled`), or a scatter of the rows a
        sparse gradient names. Writing spares the window its zeros: `reset`
        leaves the sums as they are, since nothing reads them while the
        count is 0. Zeros made anew would cost a pass per window; zeros TF
        folds into a constant stay alive as long as the function, and the
        first fused add after them copies them first (measured: that copy
        left the MLP 1.6-3.4% behind gradient-accumulator and Keras 3's own
        accumulation, which allocates on every add instead). A sparse sum is
        written zeros and then scattered into, and a variable with no
        gradient in the first micro-batch is written zeros.

        Prescaled gradients (`prescales`) carry their scale already: the
        first micro-batch's become the sums (an assign adopts a tensor
        nothing else holds, with no pass over it), and later ones are added
        as `sum + grad`, which TF computes in the gradient's own buffer
        (measured through `fit` on the benchmark's MLP at n = 8, timing
        only: 1.2% faster a step than the fused scaled add).
        """
        if not self._sums:
            return tf.no_op()

        def update(total, grad, scale):
            if isinstance(grad, tf.IndexedSlices):
                values = grad.values if prescaled else grad.values * tf.cast(scale, total.dtype)
                return total.scatter_add(tf.IndexedSlices(values, grad.indices, grad.dense_shape))
            if prescaled:
                return total.assign(total.read_value() + grad, read_value=False)
            return _add_scaled(total, grad, tf.cast(scale, total.dtype))

        if prescaled:
            self._prescaled = True
        planning = self._planning()

        def write():
            written = []
            scale = weight
            if planning:
                planned = self._planned(weight)
                scale = None if prescaled else weight / planned
                written.append(self.planned.assign(planned, read_value=False))
            for key, total in self._sums.items():
                grad = grads.get(key)
                if grad is None or isinstance(grad, tf.IndexedSlices):
                    written.append(total.assign(tf.zeros_like(total), read_value=False))
                    if grad is not None:
                        with tf.control_dependencies(written[-1:]):
                            written.append(update(total, grad, scale))
                elif prescaled:
                    written.append(total.assign(grad, read_value=False))
                else:
                    written.append(total.assign(grad * tf.cast(scale, total.dtype), read_value=False))
            with tf.control_dependencies(written):
                return tf.constant(True)

        def add():
            scale = None if prescaled else weight / self.planned if planning else weight
            added = [update(self._sums[key], grad, scale) for key, grad in grads.items()]
            with tf.control_dependencies(added):
                return tf.constant(False)

        return tf.cond(tf.equal(self.count, 0), write, add)

    def _large(self):
        """The dense variables whose sums are large (IN_PLACE_ELEMENTS), in order."""
        return [var for var in self.variables if variable_key(var) not in self._rows
                and (var.shape.num_elements() or 0) >= IN_PLACE_ELEMENTS]

    def prescales(self, variables):
        """Whether a route folds each micro-batch's weight into its loss, for these trainable variables.

        Where a variable is large (IN_PLACE_ELEMENTS) and the reduction is
        the mean: the route multiplies the micro-batch's loss by
        `loss_factor(batch_size)` (`prescale_loss`), one scalar multiply
        before the backward pass, and passes `prescaled=True` to `accumulate`. The gradients then
        come scaled as `add` would scale them, and are added with no pass of
        their own. Not under loss scaling, whose routes scale the loss
        their way (`scale_loss`). A window of small variables only keeps
        its cheaper way (see `_planning`).
        """
        return self.reduction == MEAN and any(
            (var.shape.num_elements() or 0) >= IN_PLACE_ELEMENTS for var in variables)

    def prescale_loss(self, loss, batch_size):
        """A micro-batch's loss times its `loss_factor`, for a route that `prescales`."""
        return loss * tf.cast(self.loss_factor(batch_size), loss.dtype)

    def loss_factor(self, batch_size):
        """weight / planned: what `add` multiplies a micro-batch's gradients by, as a factor of its loss.

        1/n for each of a window of n micro-batches of one size (exact where
        n is a power of two). Read before the micro-batch is added: the
        window's first plans n times its weight (`_planned`).
        """
        self.build()
        weight = tf.cast(batch_size, tf.float32)
        planned = tf.where(tf.equal(self.count, 0), self._planned(weight), self.planned)
        return weight / planned

    def _planning(self):
        """Whether this window divides its sums by a planned weight (see the module's docstring).

        Only where a sum is large, whose pass at the update planning saves.
        A window of small variables keeps `planned` at 1 and takes no op
        for it: each op a function holds is memory that a loop of models
        keeps after the model is gone (measured: the planning ops cost 20
        tiny models of test_long_runs 4.7 MB of RSS on TF 2.15, over the
        test's 1 MB slack). Its sums are the weighted sums then, which a
        window that plans reads right too (it plans 1 until it writes),
        should a later trace bring a large variable.
        """
        return (self._prescaled or bool(self._large())) and self.reduction != SUM

    def _planned(self, weight):
        """The weight a window whose first micro-batch weighs `weight` divides its sums by.

        n times that weight: the window's weight if its micro-batches are
        all as large, which makes its sums its mean. A first micro-batch of
        no samples (a replica that got none) plans 1.
        """
        return tf.where(weight > 0.0, weight * tf.cast(self.n_variable, tf.float32), tf.constant(1.0))

    def due(self, added=False):
        """True when the open window must be applied now.

        That is when it holds n micro-batches, or when it holds the last
        micro-batch of an epoch whose length the route announced. `added`:
        a micro-batch was just added, so the window is not empty (one test
        less a micro-step).
        """
        due = self.count >= self.n_variable
        if self.epochs:
            epoch_over = tf.logical_and(
                self.epoch_steps > 0, self.epoch_step >= self.epoch_steps)
            due = tf.logical_or(due, epoch_over)
        return due if added else tf.logical_and(self.count > 0, due)

    def mean(self):
        """(gradient, variable) pairs of the window's size-weighted mean gradient.

        A variable that got sparse gradients gets a sparse mean over the rows
        the window touched: optimizers such as momentum and RMSProp update only
        the rows a sparse gradient names, and so does the big batch. A window
        of no samples (a replica that got none) has a zero mean, not 0/0.

        The sums are scaled by planned / weight (1 in a window that weighs
        what it planned). A large variable's are not scaled at all where
        that is 1: a window that weighs what it planned hands them over as
        they are, with no pass over them (measured: that pass left a custom
        loop on the benchmark's MLP 1.5% behind Keras 3's own accumulation).
        Otherwise they are scaled in their own memory (`_scaled_in_place`):
        the sums are not read again before the next window writes them, and
        the update then holds no second parameter-sized copy beside them.
        Smaller sums are scaled out of place, outside any `tf.cond` (see
        IN_PLACE_ELEMENTS).
        """
        if self.reduction == SUM:
            factor = None
        elif self._planning():
            factor = tf.math.divide_no_nan(self.planned, self.weight)
        else:
            factor = tf.math.divide_no_nan(tf.constant(1.0), self.weight)
        large = self._large()
        in_place = {}
        if large and factor is not None:
            def scaled():
                means, assigned = [], []
                for var in large:
                    total = self._sums[variable_key(var)]
                    mean, op = _scaled_in_place(total, tf.cast(factor, total.dtype), assigned[-1:])
                    means.append(mean)
                    assigned.append(op)
                return means

            means = tf.cond(tf.equal(self.planned, self.weight),
                            lambda: [self._sums[variable_key(var)].read_value() for var in large], scaled)
            if not isinstance(means, (list, tuple)):  # (TF 1.x's cond unpacks a list of one)
                means = [means]
            in_place = {variable_key(var): mean for var, mean in zip(large, means)}
        pairs = []
        for var in self.variables:
            total = self._sums[variable_key(var)]
            scale = None if factor is None else tf.cast(factor, total.dtype)
            rows = self._rows.get(variable_key(var))
            if rows is None:
                mean = in_place.get(variable_key(var))
                if mean is None:
                    mean = total.read_value() if scale is None else total * scale
                pairs.append((tf.cast(mean, var.dtype), var))
            else:
                indices = tf.reshape(tf.where(rows > 0), [-1])
                values = tf.gather(total, indices)
                values = tf.cast(values if scale is None else values * scale, var.dtype)
                pairs.append((tf.IndexedSlices(values, indices, tf.shape(total, out_type=tf.int64)), var))
        return pairs

    def accumulate(self, grads_and_vars, batch_size, apply_fn, adds=(), prescaled=False):
        """Adds one micro-batch, and applies the window if it is now due.

        Every route's training step is this call. The accumulators are built
        on first use (under `init_scope`), the sums are added before `due` is
        read (ordered explicitly for graph mode), and `apply_fn` runs only
        inside the `tf.cond` branch, so the inner optimizer is not called at
        all on the other micro-steps.

        Args:
            grads_and_vars: This micro-batch's (gradient, variable) pairs.
            batch_size: This micro-batch's weight (its number of samples).
            apply_fn: Called with the mean's (gradient, variable) pairs inside
                the update branch: the inner optimizer's update.
            adds: Other ops of this micro-batch that the update reads (graph
                mode's `add_moments`), run before it.
            prescaled: The gradients are of a loss multiplied by
                `loss_factor(batch_size)` (see `prescales`).

        Returns:
            A boolean tensor: whether this step applied an update.
        """
        grads_and_vars = list(grads_and_vars)
        self.build([var for grad, var in grads_and_vars if grad is not None])
        with tf.control_dependencies([self.add(grads_and_vars, batch_size, prescaled)] + list(adds)):
            due = self.due(added=True)
        return self._apply_if(due, apply_fn)

    def add_moments(self, layer, x, axes, bessel, moments=None, call=0):
        """Adds one micro-batch's statistics of a BatchNormalization layer's input `x`.

        The window pools them (`_Pooled`), and its update moves the layer's
        `moving_mean` and `moving_variance` once, with the pooled statistics
        and the layer's `momentum`: what the big batch's one step would do.

        Args:
            layer: The BatchNormalization layer (its moving statistics and
                momentum are read).
            x: The layer's input in this micro-batch.
            axes: The axes of `x` its statistics reduce over.
            bessel: Whether that Keras moves `moving_variance` with the
                unbiased variance (count / (count - 1)), as Keras 2's fused
                kernel does, rather than the biased one.
            moments: The (mean, biased variance) of `x` over `axes` where the
                layer computed them already; computed here otherwise.
            call: Which call of the layer in the training step this is. A
                layer called k times a step moves its statistics k times, as
                in the big batch's step: once per call, in call order.

        Returns:
            The op that adds them.
        """
        key = (variable_key(layer.moving_mean), call)
        if key not in self._pooled:
            def create():
                self._pooled[key] = _Pooled(self, layer, bessel)
            _create_variables(create)
        return self._pooled[key].add(x, axes, moments)

    def flush(self, apply_fn):
        """Applies the open window now if it holds a micro-batch (the end of the data).

        Callable eagerly, in a `tf.function` or in a graph. A window made
        under a `tf.distribute` strategy is applied in that strategy's replicas
        wherever this is called from (its replica step, its scope, or outside
        it): read outside them, its per-replica sums would be their aggregate,
        and the update would skip the optimizer's all-reduce.

        Returns:
            A boolean tensor: whether an update was applied.
        """
        if not self.built:
            return tf.constant(False)
        strategy = self._strategy
        if strategy is not None and _strategy_replica() is None:
            if tf.executing_eagerly():  # decide here: replica 0's count is every replica's
                if int(self.count.numpy()) == 0:
                    return tf.constant(False)
                applied = strategy.run(self._apply_if, args=(tf.constant(True), apply_fn))
            else:
                applied = strategy.run(self.flush, args=(apply_fn,))
            return strategy.experimental_local_results(applied)[0]
        return self._apply_if(self.count > 0, apply_fn)

    def _apply_if(self, condition, apply_fn):
        """`self.apply(apply_fn)` where `condition` holds, in a `tf.cond`.

        In a replica context of a `tf.distribute` strategy, a `tf.cond` here
        could not hold the optimizer's all-reduce (a `merge_call` inside a
        branch is refused). So the replicas meet in one `merge_call`, a thread
        barrier with no communication, and the `tf.cond` runs there, in
        cross-replica context; its update branch runs `apply` on every replica
        with `strategy.run`. Every replica counts the same micro-batches, so
        replica 0's condition is every replica's.

        With `skip_nonfinite`, the update branch first asks whether every
        sum is finite (on every replica: one scalar all-reduce per window),
        and applies the window or skips it whole.
        """
        replica = _strategy_replica()
        if replica is None:
            def update():
                if not self.skip_nonfinite:
                    return self.apply(apply_fn)
                return tf.cond(self._finite(), lambda: self.apply(apply_fn), self.skip)
            return tf.cond(condition, update, lambda: tf.constant(False))

        def apply_if(strategy, condition):
            def on_replicas(fn):
                done = strategy.run(fn)
                with tf.control_dependencies(strategy.experimental_local_results(done)):
                    return tf.constant(True)

            def update():
                if not self.skip_nonfinite:
                    return on_replicas(lambda: self.apply(apply_fn))
                finite = strategy.reduce(
                    tf.distribute.ReduceOp.SUM,
                    strategy.run(lambda: tf.cast(tf.logical_not(self._finite()), tf.int32)),
                    axis=None) == 0
                return tf.cond(finite, lambda: on_replicas(lambda: self.apply(apply_fn)),
                               lambda: on_replicas(self.skip))
            return tf.cond(strategy.experimental_local_results(condition)[0], update,
                           lambda: tf.constant(False))

        return replica.merge_call(apply_if, args=(condition,))

    def _finite(self):
        """Whether every sum of the open window is finite.

        A float sum stays inf or nan once one addend was, so this is
        whether every gradient added in the window was finite.
        """
        return tf.reduce_all([tf.reduce_all(tf.math.is_finite(total)) for total in self._sums.values()])

    def skip(self):
        """Empties the window without an update, and counts it in `skipped`. Returns False."""
        with tf.control_dependencies([self.reset()]):
            with tf.control_dependencies([self.skipped.assign_add(1)]):
                return tf.constant(False)

    def apply(self, apply_fn):
        """Applies the window's mean with `apply_fn`, then empties the window.

        The mean is clipped adaptively first where `agc` is set, and the
        BatchNormalization statistics the window pooled move their layers'
        moving statistics in the same branch.

        `apply_fn` takes (gradient, variable) pairs: the inner optimizer's
        update. The sums are emptied only after the update has read them
        (ordered explicitly for graph mode; eager code and `tf.function` keep
        program order). Returns True, for `tf.cond`.
        """
        mean = self.mean()
        if self.agc is not None:
            mean = adaptive_clip(mean, self.agc, self.agc_eps)
        applied = apply_fn(mean)
        after = [applied] if isinstance(applied, (tf.Operation, tf.Tensor)) else []
        for pooled in self._pooled.values():  # (in order: a layer's calls move it in turn)
            with tf.control_dependencies(after[-1:]):
                after.append(pooled.apply())
        with tf.control_dependencies(after):
            with tf.control_dependencies([self.reset()]):
                return tf.constant(True)

    def reset(self):
        """Empties the window (the epoch position is kept).

        Its count and weight go to 0, its planned weight to 1, and its
        sparse-row markers and pooled statistics to zeros. Its sums stay as
        they are: the window's next micro-batch writes them (`_write_or_add`),
        and nothing reads them before.
        """
        emptied = [variable.assign(tf.zeros_like(variable)) for variable in self._emptied_variables()]
        if self._planning():
            emptied.append(self.planned.assign(1.0))
        return tf.group(*emptied)

    # Mixed precision: how a route trains with a loss scale (Keras'
    # LossScaleOptimizer). Each micro-batch's loss is scaled by scale / n
    # rather than by the scale: a micro-batch's mean loss weighs each sample n
    # times more than the big batch's mean does, so with the plain scale its
    # float16 gradients would be n times larger than the big batch's, and
    # overflow where the big batch's do not. The gradients are unscaled
    # (times n / scale) before they are added to the float32 accumulators.
    # The loss scale cannot change within a window: only the
    # LossScaleOptimizer's update changes it, and that runs once per window,
    # on the window's mean, where it checks finiteness once and skips the
    # whole update (halving the scale once) if any micro-batch overflowed, as
    # the big batch's step would be skipped. The scale and n are powers of
    # two in the usual case, so the scaling and unscaling are exact.

    def scale_loss(self, loss, scale_loss_fn):
        """The micro-batch's loss, scaled by `scale_loss_fn` (the loss scale) divided by n."""
        return scale_loss_fn(loss / tf.cast(self.n_tensor(), loss.dtype))

    def unscale(self, grads_and_vars, scale=None, unscale_fn=None):
        """Gradients of a loss scaled by `scale_loss`, unscaled: times n / scale.

        Give the loss scale, or the optimizer's own `unscale_fn` (Keras 2's
        `get_unscaled_gradients`, which records that it was called).
        """
        if unscale_fn is None:
            return multiplied(grads_and_vars, tf.cast(self.n_tensor(), tf.float32) / tf.cast(scale, tf.float32))
        grads_and_vars = list(grads_and_vars)
        grads = unscale_fn([grad for grad, _ in grads_and_vars])
        return multiplied(zip(grads, [var for _, var in grads_and_vars]), self.n_tensor())

    def empty_values(self):
        """(variable, value) pairs that empty the window, for a caller outside the training function."""
        if not self.built:
            return []
        return [(self.planned, 1.0)] + [
            (variable, np.zeros(variable.shape, variable.dtype.as_numpy_dtype))
            for variable in list(self._sums.values()) + self._emptied_variables()]

    def _emptied_variables(self):
        """What `reset` zeroes: the open window less its sums (which its next micro-batch writes)."""
        return list(self._rows.values()) + self._pooled_variables() + [self.weight, self.count]

    def _pooled_variables(self):
        return [var for pooled in self._pooled.values() for var in pooled.variables]

    def all_variables(self):
        """Every variable the window created (counters, sums, row markers)."""
        if not self.built:
            return []
        return ([self.n_variable, self.count, self.weight, self.planned, self.epoch_step, self.epoch_steps,
                 self.skipped]
                + list(self._sums.values()) + list(self._rows.values()) + self._pooled_variables())

    def values(self):
        """{name: value} of every window variable, for a saver other than tf.train.Checkpoint.

        Under a strategy a sum is read as its replicas' total, as
        tf.train.Checkpoint reads it; `restore` splits it back.
        """
        return {name: var.numpy() for name, var in self.state.by_name.items()}

    def restore(self, values, open_window=True):
        """Assigns saved `values` (from `values()`) by name; eagerly.

        A sum of a variable whose accumulator does not exist yet (they are
        made at the first gradient) gets its value when it is made, as
        tf.train.Checkpoint's deferred restoration does. `open_window=False`
        restores the counts and positions but not the open window (its sums,
        row markers, weight and count), which stays as it is.
        """
        self.build()
        if open_window and "planned" not in values:  # (saved before windows planned: see `planned`)
            values = dict(values, planned=1.0)
        for name, value in values.items():
            if not open_window and _OPEN_NAME.search(name):
                continue
            variable = self.state.by_name.get(name)
            if variable is None:
                self._pending[name] = value
            else:
                variable.assign(value)

    def n_values(self, n):
        """(variable, value) pairs that set n, for a caller outside the training function.

        n is a variable of the training graph, so a new n needs no new trace.
        It takes effect for the open window: that window is due once it holds
        n micro-batches (at once, on its next one, if it holds as many already).
        """
        self.n = n
        return [(self.n_variable, n)] if self.built else []

    def n_tensor(self):
        """n as the training graph reads it."""
        self.build()
        return self.n_variable

    def epoch_start_values(self, steps):
        """(variable, value) pairs that announce an epoch of `steps` micro-batches.

        `steps` None means unknown, or not wanted (the "carry" policy). The
        caller assigns them the way its mode allows (eagerly, or in a session).
        """
        if not self.epochs:
            raise ValueError("gradaccum: this window was made with epochs=False: its training "
                             "step does not count epochs. Received: an epoch of {} steps".format(steps))
        self.build()
        return [(self.epoch_step, 0), (self.epoch_steps, -1 if steps is None else int(steps))]

    def epochs_end_values(self):
        """(variable, value) pairs that forget the epoch length, e.g. before `train_on_batch`."""
        return [(self.epoch_steps, -1)] if self.built else []

    def _touched_rows(self, var):
        key = variable_key(var)
        if key not in self._rows:
            def create():
                self._rows[key] = self._track(_name(var, "rows"), _variable(
                    tf.zeros(var.shape[:1], tf.int32), _name(var, "rows")))
                saved = self._saved_names.get(key, "") + "/rows"  # (its sum was restored by position)
                if saved in self._pending:
                    self._rows[key].assign(self._pending.pop(saved))
            _create_variables(create)
        return self._rows[key]

    def _track(self, name, variable):
        # A second variable of the same name (two unnamed tf.Variables, say)
        # is told apart by the order it came in.
        key, suffix = name, 1
        while key in self.state.by_name:
            key, suffix = "{}_{}".format(name, suffix), suffix + 1
        self.state.by_name[key] = variable
        if key in self._pending:  # (created under init_scope: assigned eagerly)
            variable.assign(self._pending.pop(key))
            self.state.restored.add(key)
        return variable


class _State(tf.Module):
    """The window's variables by name, for checkpoints of the object that owns the window.

    A dict attribute of a `tf.Module` is tracked item by item, so
    `tf.train.Checkpoint` saves each variable under its name, and restores a
    variable created after `restore()` (deferred restoration): a wrapper
    restored before its first step gets its open window back then.
    """

    def __init__(self):
        super(_State, self).__init__(name="gradaccum")
        self.by_name = {}
        self.restored = set()  # names given a saved value as they were made


def multiplied(grads_and_vars, factor):
    """(gradient * factor, variable) pairs; sparse gradients stay sparse, None stays None."""
    pairs = []
    for grad, var in grads_and_vars:
        if isinstance(grad, tf.IndexedSlices):  # which has no `*`
            grad = tf.IndexedSlices(grad.values * tf.cast(factor, grad.values.dtype), grad.indices,
                                    grad.dense_shape)
        elif grad is not None:
            grad = grad * tf.cast(factor, grad.dtype)
        pairs.append((grad, var))
    return pairs


def _add_scaled(total, grad, factor):
    """total += factor * grad, as one fused kernel.

    Gradient descent's update is exactly that with alpha = -factor: one pass
    over the gradient, where `total.assign_add(grad * factor)` makes the
    product first (measured: 0.34 against 0.44 ms a step for an MLP's 1.3 M
    parameters on one core). `handle` is a replica's own under a strategy.
    """
    return tf.raw_ops.ResourceApplyGradientDescent(var=total.handle, alpha=-factor, delta=grad)


# Sums of at least this many elements (256 KiB of float32) are handed over
# as they are by a window that weighs what it planned, and scaled to their
# mean in place by any other, in a `tf.cond` (see `Window.mean`). Smaller
# ones are scaled out of place every time, which takes the fewest ops: their
# copies are small, and each op a function holds is memory that a loop of
# models (a hyperparameter search) keeps after the model is gone (measured,
# 20 models of test_long_runs on tf-keras 2.21: 0.1 MB a model more with
# tiny models scaled in place, 0.6 MB with a cond around their sums).
IN_PLACE_ELEMENTS = 2 ** 16


def _scaled_in_place(total, factor, after=()):
    """total * factor, assigned to `total` once `after` ran, and read back.

    The product's buffer becomes the variable's (an assign of a tensor
    nothing else holds adopts it) and the old one is freed: made one
    variable after another (`after`, the previous one's assign), the
    window's mean holds at most one variable's extra copy at a time, not a
    second copy of every sum. The same float multiply as `total * factor`.
    """
    with tf.control_dependencies(list(after)):
        product = total.read_value() * factor
    assigned = total.assign(product, read_value=False)
    with tf.control_dependencies([assigned]):
        return total.read_value(), assigned


def _strategy_replica():
    """The replica context when in a `tf.distribute` strategy's replica step, else None."""
    replica = tf.distribute.get_replica_context()
    return replica if replica is not None and tf.distribute.has_strategy() else None


def _create_variables(create):
    """Runs `create()`, which makes variables, where variables belong.

    That is outside any function being traced (`init_scope`), and under the
    current `tf.distribute` strategy's scope, so that they are distributed
    variables even when a Keras (3) traces its training step outside that
    scope. In a replica's training step the replicas meet in `merge_call`
    and the variables are created once, for all of them.
    """
    replica = _strategy_replica()
    if replica is not None:
        replica.merge_call(lambda strategy: _create_variables(create))
        return
    # (Read before init_scope: the strategy is not in force outside the trace.)
    strategy = tf.distribute.get_strategy() if tf.distribute.has_strategy() else None
    with tf.init_scope():
        if strategy is None:
            create()
        else:
            with strategy.scope():
                create()


def _accumulator_dtype(var):
    # Half-precision weights get float32 sums: small micro-batch gradients
    # would otherwise round away when added to a large running sum.
    dtype = tf.as_dtype(var.dtype).base_dtype  # a Keras 3 variable's dtype is a string
    return dtype if dtype in _FLOAT_ACCUMULATORS else tf.float32


def _name(var, what):
    # Readable, and stable for a Saver when a script rebuilds the same graph.
    # (A Keras 3 variable's `name` is its own, e.g. "kernel"; `path` includes its layer.)
    return "gradaccum/{}/{}".format(getattr(var, "path", var.name).split(":")[0], what)


def _variable(initial_value, name, dtype=None, aggregation=tf.VariableAggregation.SUM):
    # Resource variables on TF 1.x too: their reads are ordered by control
    # dependencies, which the graph route relies on. Sync-on-read, so that
    # under a strategy each replica keeps its own sums and counts and
    # changing them communicates nothing (without a strategy this changes
    # nothing). The window reads them only in replica context, where a read
    # is the replica's own; the aggregation says what a cross-replica read
    # would return (counters: replica 0's, which every replica shares).
    return tf.compat.v1.Variable(
        initial_value, dtype=dtype, trainable=False, name=name, use_resource=True,
        synchronization=tf.VariableSynchronization.ON_READ, aggregation=aggregation)


def _counter(name, dtype, initial_value):
    return _variable(initial_value, name, dtype, tf.VariableAggregation.ONLY_FIRST_REPLICA)


class _Pooled(object):
    """A BatchNormalization layer's per-channel statistics over the open window.

    Each micro-batch adds its element count c, mean and (biased) variance;
    the window keeps their pooled count, mean and sum of squared deviations
    (m2), merged one micro-batch at a time as Chan et al. merge partial
    moments (no cancellation, unlike summing x and x**2):

        delta = mean_k - mean;  count' = count + c
        mean' = mean + delta * c / count'
        m2'   = m2 + c * var_k + delta**2 * count * c / count'

    The pooled variance is m2 / count (m2 / (count - 1) where the layer's
    Keras applies Bessel's correction): the spread within each micro-batch
    plus the spread between their means, which is the big batch's variance.
    A micro-batch of no samples adds nothing.
    """

    def __init__(self, window, layer, bessel):
        self.layer = layer
        self.bessel = bessel
        zeros = tf.zeros(tuple(layer.moving_mean.shape), tf.float32)

        def pooled(what, initial_value, aggregation):
            name = _name(layer.moving_mean, "pooled_" + what)
            return window._track(name, _variable(initial_value, name, tf.float32, aggregation))

        self.count = pooled("count", 0.0, tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self.mean = pooled("mean", zeros, tf.VariableAggregation.MEAN)
        self.m2 = pooled("m2", zeros, tf.VariableAggregation.MEAN)
        self.variables = [self.count, self.mean, self.m2]

    def add(self, x, axes, moments=None):
        shape = self.mean.shape
        if moments is None:
            moments = tf.nn.moments(tf.cast(x, tf.float32), axes, keepdims=True)
        mean, variance = (tf.cast(moment, tf.float32) for moment in moments)
        c = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x, out_type=tf.int64), axes)), tf.float32)
        # (An empty micro-batch's moments are 0/0: nan, which must not enter.)
        some = tf.cast(c > 0, tf.float32)
        mean = tf.math.multiply_no_nan(tf.reshape(mean, shape), some)
        variance = tf.math.multiply_no_nan(tf.reshape(variance, shape), some)
        # One read of each, used throughout (graph mode reads anew at every use).
        count, pooled_mean, m2 = (var.read_value() for var in self.variables)
        total = count + c
        fraction = tf.math.divide_no_nan(c, total)
        delta = mean - pooled_mean
        with tf.control_dependencies([count, pooled_mean, m2]):
            return tf.group(
                self.count.assign(total),
                self.mean.assign(pooled_mean + delta * fraction),
                self.m2.assign(m2 + variance * c + delta * delta * count * fraction))

    def apply(self):
        """Moves the layer's moving statistics once, with the pooled ones (if any samples came)."""
        layer = self.layer
        count, mean, m2 = (var.read_value() for var in self.variables)

        def update():
            variance = tf.math.divide_no_nan(m2, count - 1.0 if self.bessel else count)
            momentum = tf.cast(layer.momentum, tf.float32)
            updates = []
            for moving, value in ((layer.moving_mean, mean), (layer.moving_variance, variance)):
                dtype = tf.as_dtype(moving.dtype)
                old = tf.cast(tf.convert_to_tensor(moving), tf.float32)
                updates.append(moving.assign(tf.cast(old * momentum + value * (1.0 - momentum), dtype)))
            with tf.control_dependencies([op for op in updates if op is not None]):
                return tf.constant(True)

        return tf.cond(count > 0, update, lambda: tf.constant(False))


def unitwise_norm(x):
    """The Euclidean norm of each unit of a parameter (or its gradient), as NFNets define units.

    Scalars and vectors: the whole norm. Dense kernels (in, out) and
    multi-head kernels (rank 3): one norm per column, over axis 0. Conv
    kernels HWIO (rank 4) and HWDIO (rank 5): one per output channel. Kept
    with its dimensions, so that it broadcasts against `x`.
    """
    rank = x.shape.rank
    if rank is None or rank > 5:
        raise ValueError(
            "adaptive clipping: parameters of rank 0 to 5 have units (scalars, vectors, dense, "
            "multi-head and conv kernels). Received: a tensor of shape {}".format(x.shape))
    axes = {0: None, 1: None, 2: [0], 3: [0], 4: [0, 1, 2], 5: [0, 1, 2, 3]}[rank]
    return tf.sqrt(tf.reduce_sum(tf.square(x), axis=axes, keepdims=rank > 1))


def adaptive_clip(grads_and_vars, clip_factor, eps):
    """Adaptive gradient clipping (Brock et al. 2021, NFNets), unit by unit.

    Where a unit's gradient norm exceeds clip_factor * max(its weight norm,
    eps), the unit's gradient is scaled down to that norm. A sparse gradient
    is made dense first: a unit (a column) spans every row.
    """
    pairs = []
    for grad, var in grads_and_vars:
        if grad is None:
            pairs.append((grad, var))
            continue
        grad = tf.convert_to_tensor(grad)
        weights = tf.cast(tf.convert_to_tensor(var), grad.dtype)
        max_norm = tf.maximum(unitwise_norm(weights), eps) * clip_factor
        grad_norm = unitwise_norm(grad)
        clipped = grad * (max_norm / tf.maximum(grad_norm, 1e-6))
        pairs.append((tf.where(grad_norm < max_norm + tf.zeros_like(grad), grad, clipped), var))
    return pairs
