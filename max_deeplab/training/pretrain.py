"""ImageNet pretraining of the MaX-DeepLab backbone (paper appendix A.6, docs/design.md §7).

"The pretraining model uses only P2P attention (a convolutional residual block or an
axial-attention block), without the other three types of attention, the feed-forward
network (FFN), or the memory. We directly pretrain with an average pooling followed by a
linear layer." `BackboneClassifier` is exactly that: the gin-configured `MaXDeepLabEncoder`
in `classification_mode` with no dual-path transformer (stem and stages; for
MaX-DeepLab-L also the backbone's stacked decoder up to output stride), global average
pooling of its `backbone_output`, and a linear classifier. It holds the encoder under the
attribute `encoder`, like the panoptic model, so the checkpoint keys of the backbone are
the same in both and `load_backbone_checkpoint` can transfer them.

Training reuses the panoptic trainer's pieces: the strategy factory (`create_strategy`),
the orbit `Trainer` (distributed step, progress lines with step time and ETA, non-finite
loss guard), `tf.train.CheckpointManager` (resume from the latest checkpoint) and orbit's
summaries; only the evaluator (top-1 / top-5 accuracy) is classification-specific.

Hyper-parameters: the MaX-DeepLab paper gives none for pretraining beyond "as
Axial-DeepLab"; Axial-DeepLab (§4.1) follows the stand-alone self-attention ImageNet
protocol. The defaults of `pretrain_options` are that protocol as we read it — SGD with
Nesterov momentum 0.9, 130 epochs at batch 1024, learning rate 0.1 per 256 images with a
5-epoch linear warmup and cosine decay, weight decay 1e-4 (as an L2 loss on convolution and
dense kernels), label smoothing 0.1, 224 x 224 crops — and every one is a gin binding.
`optimizer="radam"` switches to the panoptic optimiser (RAdam + Lookahead).
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping

import gin
import orbit
import tensorflow as tf
import tf_keras as tfk
from absl import logging

from max_deeplab.atomic_files import write_json_atomic
from max_deeplab.data.imagenet import imagenet_dataset
from max_deeplab.model.encoder import MaXDeepLabEncoder
from max_deeplab.model.max_deeplab import batch_norm_layer
from max_deeplab.model.partition import in_order_of, kernel_variables
from max_deeplab.training.modes import PRETRAIN_MODES
from max_deeplab.training.trainer import Trainer

IMAGENET_TRAIN_EXAMPLES = 1_281_167


class BackboneClassifier(tfk.Model):
    """The pretrainable backbone + global average pooling + linear classifier (A.6).

    The encoder is the gin-configured `MaXDeepLabEncoder` with `classification_mode=True`
    and `backbone_use_transformer_beyond_stride=0` (P2P blocks only: no memory, no
    dual-path attentions, no FFN), whatever the panoptic config binds for those two.

    Args:
      num_classes: ImageNet-1k: 1000.
    """

    def __init__(self, num_classes: int = 1000, name: str = "backbone_classifier"):
        super().__init__(name=name)
        self.num_classes = num_classes
        self.encoder = MaXDeepLabEncoder(classification_mode=True,
                                         backbone_use_transformer_beyond_stride=0,
                                         bn_layer=batch_norm_layer())
        self.classifier = tfk.layers.Dense(
            num_classes, name="classifier",
            kernel_initializer=tfk.initializers.RandomNormal(stddev=0.01))

    def call(self, images: tf.Tensor, training: bool | None = None) -> dict[str, tf.Tensor]:
        """float images [B, H, W, 3] in [0, 255] -> {"logits": [B, num_classes]}."""
        x = tf.cast(images, tf.float32) / 127.5 - 1.0  # as MaXDeepLab normalises
        feature = self.encoder(x, training=training)["backbone_output"]
        pooled = tf.reduce_mean(feature, axis=[1, 2])
        return {"logits": self.classifier(pooled)}


def build_classifier(num_classes: int = 1000, image_size: int = 224) -> BackboneClassifier:
    """A built `BackboneClassifier` (weights created by one call on a zero batch)."""
    model = BackboneClassifier(num_classes=num_classes)
    model(tf.zeros([1, image_size, image_size, 3]), training=False)
    return model


class ClassificationLoss:
    """Label-smoothed softmax cross-entropy plus the L2 weight decay of the kernels.

    Called per replica by the `Trainer` as `loss(outputs, inputs, global_batch_size=...)`:
    the cross-entropy is each replica's per-example sum over the *global* batch size and
    the decay term is divided by the number of replicas, so the all-reduce SUM of the
    gradients is the gradient of `mean CE + wd/2 · Σ ||kernel||²`.
    """

    def __init__(self, model: tfk.Model, label_smoothing: float, weight_decay: float):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.model = model
        self.label_smoothing = float(label_smoothing)
        self.weight_decay = float(weight_decay)

    def per_example(self, logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        """Cross-entropy of each example against the smoothed one-hot label."""
        one_hot = tf.one_hot(labels, tf.shape(logits)[-1], dtype=tf.float32)
        return tfk.losses.categorical_crossentropy(
            one_hot, tf.cast(logits, tf.float32), from_logits=True,
            label_smoothing=self.label_smoothing)

    def __call__(self, outputs: Mapping[str, tf.Tensor], inputs: Mapping[str, tf.Tensor],
                 global_batch_size: int) -> dict[str, tf.Tensor]:
        cross_entropy = tf.reduce_sum(self.per_example(outputs["logits"], inputs["label"]))
        cross_entropy = cross_entropy / float(global_batch_size)
        kernels = in_order_of(kernel_variables(self.model), self.model.trainable_variables)
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync
        decay = self.weight_decay * tf.add_n([tf.nn.l2_loss(v) for v in kernels]) / replicas
        return {"total": cross_entropy + decay, "cross_entropy": cross_entropy,
                "weight_decay": decay}


@gin.configurable
def pretrain_options(train_batch_size: int = 1024, eval_batch_size: int = 1024,
                     train_epochs: float = 130.0, train_steps: int | None = None,
                     num_train_examples: int = IMAGENET_TRAIN_EXAMPLES,
                     image_size: int = 224, num_classes: int = 1000,
                     optimizer: str = "sgd", learning_rate_per_256: float = 0.1,
                     warmup_epochs: float = 5.0, momentum: float = 0.9,
                     weight_decay: float = 1e-4, label_smoothing: float = 0.1,
                     train_split: str = "train", eval_split: str = "validation",
                     checkpoint_every: int = 5000, max_to_keep: int = 5,
                     steps_per_loop: int = 500, eval_steps: int = -1,
                     jit_compile: bool = False) -> dict:
    """Pretraining options (module docstring: the Axial-DeepLab / SASA ImageNet protocol).

    `train_steps` (if set) overrides `train_epochs`; the base learning rate is
    `learning_rate_per_256 · train_batch_size / 256`; `optimizer` is "sgd" (Nesterov) or
    "radam" (RAdam + Lookahead, weight decay still through the loss). `eval_steps=-1`
    evaluates the whole split.
    """
    return dict(locals())


def total_train_steps(opts: Mapping) -> int:
    """Steps of the run: `train_steps`, else epochs · examples / batch (rounded up)."""
    if opts["train_steps"]:
        return int(opts["train_steps"])
    return int(math.ceil(opts["train_epochs"] * opts["num_train_examples"]
                         / opts["train_batch_size"]))


def build_pretrain_schedule(opts: Mapping, total_steps: int
                            ) -> tfk.optimizers.schedules.LearningRateSchedule:
    """Linear warmup from 0 over `warmup_epochs`, then cosine decay to 0 at `total_steps`
    (counted from step 0); peak `learning_rate_per_256 · train_batch_size / 256`."""
    from official.modeling.optimization import lr_schedule

    base = opts["learning_rate_per_256"] * opts["train_batch_size"] / 256.0
    steps_per_epoch = opts["num_train_examples"] / opts["train_batch_size"]
    warmup_steps = int(round(opts["warmup_epochs"] * steps_per_epoch))
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup ({warmup_steps} steps = {opts['warmup_epochs']} epochs) "
                         f"must be shorter than the run ({total_steps} steps); for short runs "
                         "bind e.g. 'pretrain_options.warmup_epochs = 0'")
    schedule = tfk.optimizers.schedules.CosineDecay(base, decay_steps=total_steps, alpha=0.0)
    if warmup_steps:
        schedule = lr_schedule.LinearWarmup(after_warmup_lr_sched=schedule,
                                            warmup_steps=warmup_steps,
                                            warmup_learning_rate=0.0)
    return schedule


def build_pretrain_optimizer(opts: Mapping, total_steps: int) -> tfk.optimizers.Optimizer:
    """SGD with Nesterov momentum (default) or RAdam + Lookahead on
    `build_pretrain_schedule`; weight decay is in the loss (`ClassificationLoss`)."""
    schedule = build_pretrain_schedule(opts, total_steps)
    if opts["optimizer"] == "sgd":
        return tfk.optimizers.SGD(learning_rate=schedule, momentum=opts["momentum"],
                                  nesterov=True, jit_compile=False)
    if opts["optimizer"] == "radam":
        from max_deeplab.training.optimizers import Lookahead, RAdam

        return Lookahead(RAdam(learning_rate=schedule, weight_decay=0.0))
    raise ValueError(f"pretrain_options.optimizer must be 'sgd' or 'radam', "
                     f"got {opts['optimizer']!r}")


def top_k_correct(logits: tf.Tensor, labels: tf.Tensor, k: int) -> tf.Tensor:
    """float [B]: 1 where `labels` is among the k highest logits (ties: lowest index first,
    as `tf.math.top_k`), else 0."""
    classes = logits.shape[-1]
    k = min(k, classes) if classes is not None else tf.minimum(k, tf.shape(logits)[-1])
    top = tf.math.top_k(logits, k=k).indices
    return tf.cast(tf.reduce_any(top == tf.cast(labels, top.dtype)[:, None], axis=-1),
                   tf.float32)


class ClassificationEvaluator(orbit.StandardEvaluator):
    """Top-1 / top-5 accuracy and mean cross-entropy on an evaluation split.

    Padded examples (label < 0, see `imagenet_dataset`) are ignored. Per-step sums are
    all-reduced across replicas and workers, then accumulated on the host.
    """

    def __init__(self, strategy: tf.distribute.Strategy, model: tfk.Model,
                 loss: ClassificationLoss, eval_dataset, global_step: tf.Variable,
                 jit_compile: bool = False):
        self.strategy = strategy
        self.model = model
        self.loss = loss
        self.global_step = global_step
        step = self._replica_step
        if jit_compile and not isinstance(strategy, tf.distribute.TPUStrategy):
            step = tf.function(step, jit_compile=True)
        self._replica_step_fn = step
        self.last_result: dict[str, float] | None = None
        super().__init__(eval_dataset, options=orbit.StandardEvaluatorOptions(
            use_tf_while_loop=False))

    def _replica_step(self, inputs: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        logits = self.model(inputs["image"], training=False)["logits"]
        labels = inputs["label"]
        valid = tf.cast(labels >= 0, tf.float32)
        safe = tf.maximum(labels, 0)
        return {"count": tf.reduce_sum(valid),
                "top_1": tf.reduce_sum(valid * top_k_correct(logits, safe, 1)),
                "top_5": tf.reduce_sum(valid * top_k_correct(logits, safe, 5)),
                "cross_entropy": tf.reduce_sum(valid * self.loss.per_example(logits, safe))}

    def eval_step(self, iterator):
        per_replica = self.strategy.run(self._replica_step_fn, args=(next(iterator),))
        return {k: self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
                for k, v in per_replica.items()}

    def eval_begin(self) -> dict[str, float]:
        return {"count": 0.0, "top_1": 0.0, "top_5": 0.0, "cross_entropy": 0.0}

    def eval_reduce(self, state: dict[str, float], step_outputs) -> dict[str, float]:
        for key, value in step_outputs.items():
            state[key] += float(value.numpy())
        return state

    def eval_end(self, state: dict[str, float]) -> dict[str, float]:
        count = state["count"]
        if count == 0:
            raise ValueError("the evaluation split yielded no example")
        result = {"top_1_accuracy": state["top_1"] / count,
                  "top_5_accuracy": state["top_5"] / count,
                  "cross_entropy": state["cross_entropy"] / count,
                  "num_examples": count}
        self.last_result = result
        logging.info("eval at step %d: %s", int(self.global_step.numpy()), result)
        return result


def run_pretraining(*, mode: str, model_dir: str, strategy: tf.distribute.Strategy,
                    data_dir: str | None, options: Mapping | None = None,
                    print_fn: Callable[[str], None] = print,
                    dataset_fn: Callable[..., tf.data.Dataset] = imagenet_dataset
                    ) -> dict[str, float] | None:
    """Pretrains / evaluates the backbone classifier; returns the last eval metrics.

    The latest checkpoint in `model_dir` is restored automatically (resume). Train
    summaries go to `model_dir/train`, eval summaries to `model_dir/eval` and the last
    eval result to `model_dir/eval/metrics.json`.
    """
    if mode not in PRETRAIN_MODES:
        raise ValueError(f"--mode must be one of {PRETRAIN_MODES}, got {mode!r}")
    opts = dict(pretrain_options())
    opts.update(options or {})
    total_steps = total_train_steps(opts)
    training = mode in ("train", "train_and_eval")
    evaluating = mode != "train"
    image_size = int(opts["image_size"])

    with strategy.scope():
        model = build_classifier(int(opts["num_classes"]), image_size)
        loss = ClassificationLoss(model, opts["label_smoothing"], opts["weight_decay"])
        optimizer = build_pretrain_optimizer(opts, total_steps)
        global_step = orbit.utils.create_global_step()
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                         global_step=global_step)

    def make_dataset(split: str, batch: int, is_training: bool):
        def fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
            per_replica = input_context.get_per_replica_batch_size(batch)
            return dataset_fn(split=split, batch_size=per_replica, is_training=is_training,
                              data_dir=data_dir, image_size=image_size,
                              input_context=input_context)
        return orbit.utils.make_distributed_dataset(strategy, fn)

    trainer = evaluator = None
    if training:
        batch = int(opts["train_batch_size"])
        trainer = Trainer(strategy, model, loss, optimizer,
                          make_dataset(opts["train_split"], batch, True), global_step,
                          batch, total_steps, jit_compile=opts["jit_compile"],
                          print_fn=print_fn)
    else:
        with strategy.scope():
            optimizer.build(model.trainable_variables)
    if evaluating:
        evaluator = ClassificationEvaluator(
            strategy, model, loss,
            make_dataset(opts["eval_split"], int(opts["eval_batch_size"]), False),
            global_step, jit_compile=opts["jit_compile"])

    checkpoint_every = int(opts["checkpoint_every"])
    manager = tf.train.CheckpointManager(
        checkpoint, directory=model_dir, max_to_keep=int(opts["max_to_keep"]),
        step_counter=global_step, checkpoint_interval=checkpoint_every)
    # orbit saves only at loop ends: a loop length dividing the checkpoint interval.
    steps_per_loop = max(1, math.gcd(int(opts["steps_per_loop"]), checkpoint_every))
    controller = orbit.Controller(
        strategy=strategy, trainer=trainer, evaluator=evaluator, global_step=global_step,
        steps_per_loop=steps_per_loop if training else None, checkpoint_manager=manager,
        summary_dir=os.path.join(model_dir, "train") if training else None,
        summary_interval=steps_per_loop if training else None,
        eval_summary_dir=os.path.join(model_dir, "eval") if evaluating else None)

    eval_steps = int(opts["eval_steps"])
    if mode == "train":
        controller.train(steps=total_steps)
    elif mode == "train_and_eval":
        controller.train_and_evaluate(train_steps=total_steps, eval_steps=eval_steps,
                                      eval_interval=checkpoint_every)
    else:
        if manager.latest_checkpoint is None:
            raise FileNotFoundError(f"no checkpoint to evaluate in {model_dir}")
        controller.evaluate(steps=eval_steps)
    result = evaluator.last_result if evaluator is not None else None
    if result is not None:
        step = int(global_step.numpy())
        print_fn(f"eval at step {step}: top-1 {result['top_1_accuracy']:.4f} | top-5 "
                 f"{result['top_5_accuracy']:.4f} | cross-entropy "
                 f"{result['cross_entropy']:.4f} | {int(result['num_examples'])} images")
        write_json_atomic(os.path.join(model_dir, "eval", "metrics.json"),
                          {**result, "step": step}, indent=1)
    return result
