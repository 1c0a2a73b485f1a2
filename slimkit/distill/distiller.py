"""The distillation method: a frozen teacher, projectors, hooks and the mixed loss.

The student's forward hook (installed by the controller) runs the teacher on the very same
inputs, under ``torch.no_grad``, right after the student's forward, so the teacher always sees
the same batch and the same augmentation. The loss is

    alpha * T^2 * KL(teacher || student) + (1 - alpha) * task
        + sum_f w_f * feature_f + sum_a w_a * attention_a

When there is no task loss (no labels) the logit term gets weight 1 instead of alpha. For
Hugging Face models called with ``labels`` the hook writes this mixed loss into
``outputs.loss``, which a stock ``Trainer`` backpropagates; for models that return plain
logits, call ``slimkit.compute_loss(model, outputs, labels=...)``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..adapters import call_model, get_adapter, get_logits, get_loss
from ..controller import Controller, Method
from ..distributed import reshard_
from ..errors import IncompatibleError, SlimkitError
from ..modules import matches_any
from ..recipe import DistillConfig
from .capture import FeatureCapture
from .losses import attention_kd, feature_loss, logit_kd_and_ce, row_masks
from .mapping import expand_pairs
from .projectors import align, build_projector

logger = logging.getLogger("slimkit")

# Inputs the student's loss needs but the teacher must not get.
_STUDENT_ONLY_KWARGS = ("labels", "num_items_in_batch", "return_loss")


def _feature_term(student: str, pair: Any) -> str:
    """The logged name of a feature term; pooled and relation terms on a module that also has a
    per-token term get their own name (``distill/feature.encoder.layer.5.mean.relation``)."""
    name = f"distill/feature.{student}"
    if pair.pool != "none":
        name += f".{pair.pool}"
    return name + ".relation" if pair.loss == "relation" else name


def _projector_key(student: str, teacher: str) -> str:
    # ModuleDict keys cannot hold dots.
    return f"{student}__to__{teacher}".replace(".", "_")


def _freeze(teacher: nn.Module) -> nn.Module:
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


class Distiller(Method):
    name = "distill"
    mixes_loss = True  # the forward hook and slimkit.compute_loss hand it the loss
    config: DistillConfig

    def __init__(self, controller: Controller, config: DistillConfig, teacher: nn.Module, example_inputs: Any = None):
        super().__init__(controller, config)
        if teacher is None:
            raise SlimkitError("the recipe has a distill section but no teacher was given; pass teacher=...")
        self.teacher = _freeze(teacher)
        self.example_inputs = example_inputs
        self.feature_pairs: list[tuple[str, str, Any]] = []  # (student, teacher, FeaturePair)
        self.attention_pairs: list[tuple[str, str, Any]] = []
        self.projectors = nn.ModuleDict()
        self._captures: list[FeatureCapture] = []
        self._attention_handles: list[Any] = []
        self._student_attn: dict[str, torch.Tensor] = {}
        self._teacher_attn: dict[str, torch.Tensor] = {}
        self.teacher_logits: torch.Tensor | None = None
        self._pending: dict[str, torch.Tensor] = {}
        self._last_kwargs: dict[str, Any] = {}
        self._mixed_loss: torch.Tensor | None = None  # the loss the hook already wrote into outputs
        self._use_logits = config.alpha > 0
        self.causal = False
        # Causal LMs whose loss is the plain token CE: the labels are kept from the model and the
        # CE is computed in KD's own chunked pass (one [tokens, vocabulary] gradient, not three).
        self._owns_task_loss = False
        self._held_labels: torch.Tensor | None = None
        self._pre_hook: Any = None
        self._grad_hooks: list[Any] = []

    # -- prepare -----------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> None:
        if any(m is self.teacher for m in model.modules()):
            raise SlimkitError("the teacher must not be a submodule of the student; pass it separately")
        cfg = self.config
        if cfg.dropout == "off":
            from ..dropout import disable_dropout

            disable_dropout(model)
        for i, pair in enumerate(cfg.features):
            for s, t in expand_pairs(pair, model, self.teacher, f"distill.features[{i}]"):
                self.feature_pairs.append((s, t, pair))
        for i, pair in enumerate(cfg.attention):
            for s, t in expand_pairs(pair, model, self.teacher, f"distill.attention[{i}]"):
                self.attention_pairs.append((s, t, pair))

        self._student_feats = FeatureCapture(model, [s for s, _, _ in self.feature_pairs], "student ")
        self._teacher_feats = FeatureCapture(self.teacher, [t for _, t, _ in self.feature_pairs], "teacher ")
        self._captures = [self._student_feats, self._teacher_feats]
        s_adapter, t_adapter = get_adapter(model), get_adapter(self.teacher)
        for s, t, _ in self.attention_pairs:
            self._attention_handles += s_adapter.capture_attention(model, s, self._student_attn)
            self._attention_handles += t_adapter.capture_attention(self.teacher, t, self._teacher_attn)
        self._adapters = (s_adapter, t_adapter)
        self.causal = s_adapter.task(model) == "causal_lm"
        self._probe(model)
        self.controller.state.add_module("projectors", self.projectors)
        self._share_projectors(model)
        self._owns_task_loss = self._use_logits and s_adapter.loss_is_token_cross_entropy(model)
        if self._owns_task_loss:
            self._pre_hook = model.register_forward_pre_hook(self._hold_labels, with_kwargs=True)

    def _share_projectors(self, model: nn.Module) -> None:
        """Every process starts from rank 0's projectors (FSDP2, unlike DDP, broadcasts nothing).
        On a student already sharded by fully_shard the projectors are outside its FSDP groups:
        they stay whole and their gradients are averaged over processes, as DDP would."""
        from ..distributed import broadcast_, is_distributed, is_sharded, replicate_gradients

        params = list(self.projectors.parameters())
        if not params or not is_distributed():
            return
        if is_sharded(model):
            self._grad_hooks = replicate_gradients(params)
        else:
            broadcast_([p.data for p in params])

    def _hold_labels(self, model: nn.Module, args: tuple, kwargs: dict) -> Any:
        """Training forward of a causal LM: take ``labels`` out of the model's kwargs (it then
        computes no loss of its own); the forward hook computes the same CE in the KD pass."""
        self._held_labels = None
        if self.controller._suspended or not model.training or not torch.is_grad_enabled():
            return None
        if kwargs.get("labels") is None or kwargs.get("shift_labels") is not None:
            return None
        kwargs = dict(kwargs)
        self._held_labels = kwargs.pop("labels")
        return args, kwargs

    def _probe(self, model: nn.Module) -> None:
        """One forward of both models on example inputs: feature shapes for the projectors,
        and whether the student has logits to distil."""
        inputs = self.example_inputs
        if inputs is None:
            inputs = get_adapter(model).example_inputs(model)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.teacher.to(device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self.controller.suspended():
                s_out = self._run_probe(model, inputs, "student")
                t_out = self._run_probe(self.teacher, inputs, "teacher")
        finally:
            model.train(was_training)
        s_feats, t_feats = self._student_feats.pop(), self._teacher_feats.pop()
        self._student_attn.clear()
        self._teacher_attn.clear()
        for s, t, _ in self.feature_pairs:
            key = _projector_key(s, t)
            if key not in self.projectors:
                shape_s, shape_t = tuple(s_feats[s].shape), tuple(t_feats[t].shape)
                self.projectors[key] = build_projector(shape_s, shape_t, (s, t)).to(device)
        s_logits, t_logits = get_logits(s_out), get_logits(t_out)
        if s_logits is None or t_logits is None:
            self._use_logits = False
            if not self.feature_pairs and not self.attention_pairs:
                side = "student" if s_logits is None else "teacher"
                raise IncompatibleError(
                    f"distill: the {side} ({type(model if s_logits is None else self.teacher).__name__}) "
                    "returns no logits, and the recipe has no distill.features or distill.attention; "
                    "there is nothing to distil. Add feature pairs (e.g. the last layer's hidden states)."
                )
            if self.config.alpha > 0:
                logger.info(
                    "distill: the %s returns no logits; only feature / attention terms are used",
                    "student" if s_logits is None else "teacher",
                )
        elif self._use_logits and s_logits.shape[-1] != t_logits.shape[-1]:
            raise IncompatibleError(
                f"distill: student logits have {s_logits.shape[-1]} classes but teacher logits have "
                f"{t_logits.shape[-1]}; logit KD needs the same label space (or set distill.alpha: 0)"
            )

    @staticmethod
    def _run_probe(model: nn.Module, inputs: Any, role: str) -> Any:
        try:
            return call_model(model, inputs)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise IncompatibleError(
                f"distill: the {role} ({type(model).__name__}) could not run on the example inputs ({exc}); "
                "pass example_inputs= that both models accept (teacher and student see the same batch)"
            ) from exc

    # -- training --------------------------------------------------------------------------------
    def _run_teacher(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        teacher_kwargs = {k: v for k, v in kwargs.items() if k not in _STUDENT_ONLY_KWARGS}
        first = next(self.teacher.parameters(), None)
        device = next((p.device for p in model.parameters()), None)
        if first is not None and device is not None and first.device != device:
            self.teacher.to(device)
        with torch.no_grad():
            t_out = self.teacher(*args, **teacher_kwargs)
        self.teacher_logits = get_logits(t_out)
        # FSDP2 keeps a root module's parameters gathered after forward, for the backward it
        # expects; the frozen teacher has none, so its gathered parameters are freed now.
        reshard_(self.teacher)

    def after_forward(self, model: nn.Module, args: tuple, kwargs: dict, outputs: Any) -> dict[str, torch.Tensor]:
        self._run_teacher(model, args, kwargs)
        if self._held_labels is not None:
            kwargs = {**kwargs, "labels": self._held_labels}
            self._held_labels = None
        self._last_kwargs = kwargs
        s_feats, t_feats = self._student_feats.pop(), self._teacher_feats.pop()
        s_attn, t_attn = dict(self._student_attn), dict(self._teacher_attn)
        self._student_attn.clear()
        self._teacher_attn.clear()
        mask = kwargs.get("attention_mask")
        terms: dict[str, torch.Tensor] = {}
        # a block depth pruning removed passes its input on: KD on it would pull the block before
        # it towards two teacher layers at once, and its own attention no longer reaches anything
        skipped = self.controller.skipped_modules()
        for s, t, pair in self.feature_pairs:
            if matches_any(s, skipped):
                continue
            projected = align(self.projectors[_projector_key(s, t)](s_feats[s]), t_feats[t])
            total, count = feature_loss(projected, t_feats[t], pair.loss, mask, pair.pool)
            name = _feature_term(s, pair)
            term = pair.weight * total / count.clamp_min(1)
            terms[name] = terms[name] + term if name in terms else term
        for s, t, pair in self.attention_pairs:
            if matches_any(s, skipped):
                continue
            total, count = attention_kd(s_attn[s], t_attn[t], pair.heads, mask, names=(s, t))
            terms[f"distill/attention.{s}"] = pair.weight * total / count.clamp_min(1)
        self._pending = terms
        return terms

    def mix(
        self,
        student_logits: torch.Tensor | None,
        task_loss: torch.Tensor | None,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        num_items_in_batch: Any = None,
        task_from_logits: str | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The mixed loss from the last forward, and its terms (for logging).

        ``task_from_logits`` computes the task CE against ``labels`` in the same chunked pass
        as the KD term: ``"mean"`` over positions that count (padding left out), or ``"model"``
        exactly as transformers' causal LM loss (every labelled position, divided by
        ``num_items_in_batch`` when the Trainer passes it).
        """
        cfg = self.config
        causal = self.causal
        terms = dict(self._pending)
        # Normalise like the task loss: transformers' Trainer divides by the label count of
        # the whole accumulated batch (num_items_in_batch) instead of averaging per micro-batch.
        scale = 1.0
        if num_items_in_batch is not None and labels is not None and student_logits is not None:
            _, valid, _ = row_masks(student_logits, labels, None, causal)
            scale = valid.sum().float() / torch.as_tensor(num_items_in_batch).float().to(student_logits.device)
            terms = {k: v * scale for k, v in terms.items()}
        total = sum(terms.values()) if terms else None
        teacher_logits, self.teacher_logits = self.teacher_logits, None  # held by autograd only
        use_kd = self._use_logits and student_logits is not None and teacher_logits is not None
        with_ce = task_from_logits is not None and labels is not None and student_logits is not None
        if use_kd or with_ce:
            kd_sum, kd_count, ce_sum, ce_count = logit_kd_and_ce(
                student_logits,
                teacher_logits if use_kd else None,
                cfg.temperature,
                labels,
                attention_mask,
                causal,
                with_ce=with_ce,
                ce_attention_mask=task_from_logits != "model",
                chunk_rows=cfg.chunk_tokens,
            )
            if with_ce:
                if task_from_logits == "model" and num_items_in_batch is not None:
                    task_loss = ce_sum / torch.as_tensor(num_items_in_batch).to(ce_sum.device)
                else:
                    task_loss = ce_sum / ce_count.clamp_min(1)
            if use_kd:
                kd = kd_sum / kd_count.clamp_min(1) * scale
                terms["distill/kd"] = kd
                weight = cfg.alpha if task_loss is not None else 1.0
                total = weight * kd if total is None else total + weight * kd
        if task_loss is not None:
            terms["distill/task"] = task_loss
            mixed = (1.0 - cfg.alpha) * task_loss if self._use_logits else task_loss
            total = mixed if total is None else total + mixed
        if total is None:
            raise SlimkitError("distill: no loss term to optimise (no logits, features, attention or labels)")
        self._pending = {}
        return total, terms

    def replace_loss(self, outputs: Any, terms: dict[str, torch.Tensor]) -> Any:
        """Forward-hook tail: for outputs that carry a loss field (HF ModelOutput), put the
        mixed loss there. Plain tensors are left alone (use ``slimkit.compute_loss``)."""
        if not isinstance(outputs, dict):
            return None
        kwargs = self._last_kwargs
        task = get_loss(outputs)
        if task is None and kwargs.get("labels") is None and "logits" not in outputs and not terms:
            return None
        owned = self._owns_task_loss and task is None and kwargs.get("labels") is not None
        loss, logged = self.mix(
            get_logits(outputs),
            task,
            kwargs.get("labels"),
            kwargs.get("attention_mask"),
            kwargs.get("num_items_in_batch"),
            task_from_logits="model" if owned else None,
        )
        self.controller.record(logged)
        outputs["loss"] = loss
        self._mixed_loss = loss
        return outputs

    def compute_loss(
        self, outputs: Any, labels: torch.Tensor | None, task_loss: torch.Tensor | None, attention_mask: Any
    ) -> torch.Tensor:
        loss = get_loss(outputs)
        if loss is not None and loss is self._mixed_loss:  # the forward hook already mixed it (HF outputs)
            self._mixed_loss = None
            return loss
        logits = get_logits(outputs)
        own_ce = task_loss is None and labels is not None and logits is not None
        loss, logged = self.mix(logits, task_loss, labels, attention_mask, task_from_logits="mean" if own_ce else None)
        self.controller.record(logged)
        return loss

    def remove(self, model: nn.Module) -> None:
        if self._pre_hook is not None:
            self._pre_hook.remove()
            self._pre_hook = None
        for handle in self._grad_hooks:
            handle.remove()
        self._grad_hooks = []
        for capture in self._captures:
            capture.remove()
        for handle in self._attention_handles:
            handle.remove()
        self._attention_handles = []
        for adapter, m in zip(self._adapters, (model, self.teacher)):
            adapter.release_attention(m)
        if "projectors" in self.controller.state._modules:
            del self.controller.state._modules["projectors"]
