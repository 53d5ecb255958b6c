"""The ensemble: frozen experts, per-expert heads (LoRA via peft), a gate, and the multi-task loss.

Data flow of :meth:`Ensemble.forward` for a batch of B records:

1. A signal (or uniform) gate routes first, from its own raw-signal input; with sparse top-k routing each expert
   then runs only on the records routed to it. An embedding gate routes after every expert has run.
2. Each expert embeds its contract-prepared windows ``(B, n_windows, ...) -> (B, D)``; with
   ``from_embeddings=True`` cached embeddings ``(B, D)`` are used instead (the feature cache: frozen experts never
   re-run during training).
3. ``combine='predictions'`` (the paper): each expert's own heads predict every task, and the gate weights those
   predictions (:meth:`enecg.ensemble.tasks.Task.combine`). ``combine='embeddings'``: per-expert projections to a
   common width are weighted and summed, and one shared head per task predicts from the sum.

Distributed training: with top-k routing some experts/heads get no gradient in a step, so wrap with
``DistributedDataParallelKwargs(find_unused_parameters=True)``. Learned task weights are returned in the output
(``task_log_vars``) so that :meth:`Ensemble.compute_loss` reaches them through the forward graph, as DDP needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from enecg.ensemble.config import EnsembleConfig
from enecg.ensemble.gates import GateOutput, build_gate, uniform_weights
from enecg.ensemble.heads import ExpertBranch, TaskHead, count_parameters, prepare_expert
from enecg.ensemble.lora import adapter_state_dict, save_adapter, unwrap_branch, wrap_branch
from enecg.ensemble.tasks import Task, build_task


@dataclass
class EnsembleOutput:
    """What :meth:`Ensemble.forward` returns (E experts in config order; ``...`` = ``K`` outputs or nothing).

    Attributes:
        logits: task -> combined logits ``(B, ...)``, the input of the task loss (for mixed probabilities: logits
            of the mixture, see :mod:`enecg.ensemble.tasks`; for regression: normalised predictions).
        predictions: task -> combined predictions (probabilities, class probabilities, or raw-unit values).
        expert_logits: task -> ``(B, E, ...)`` each expert's logits; 0 where the expert was not routed to.
        expert_predictions: task -> ``(B, E, ...)`` each expert's predictions; NaN where that task's weights do not
            route to the expert.
        gate_weights: task -> ``(B, E)`` mixture weights (rows sum to 1).
        routed: ``(B, E)`` bool, True where an expert ran on a record (for any task).
        aux_losses: unweighted gate terms (``gate/load_balance``, ``gate/entropy``).
        task_log_vars: ``(T,)`` learned log-variances (uncertainty weighting) or None.
    """

    logits: dict[str, Tensor]
    predictions: dict[str, Tensor]
    expert_logits: dict[str, Tensor]
    expert_predictions: dict[str, Tensor]
    gate_weights: dict[str, Tensor]
    routed: Tensor
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    task_log_vars: Tensor | None = None


class Ensemble(nn.Module):
    """Multi-task mixture of frozen ECG experts.

    Args:
        config: the ensemble configuration (experts in gate order, tasks, heads, LoRA, gate, task weighting).
        experts: expert name -> expert module (``forward(windows) -> (B, D)``, attribute ``embedding_dim``). The
            experts are frozen in place (and get LoRA layers injected in place with ``lora.on_experts``).

    Heads, gate and LoRA weights are initialised from ``config.seed`` without touching the global RNG, so two
    ensembles built from the same config and experts are identical; each expert's branch has a seed of its own
    (:func:`derived_seed` of the config seed and the expert's name), and so has its dropout in training mode, so
    an expert's branch trains the same with or without the other experts beside it.
    """

    def __init__(self, config: EnsembleConfig, experts: Mapping[str, nn.Module]) -> None:
        super().__init__()
        names = config.expert_names
        if set(experts) != set(names):
            raise ValueError(
                f"experts given {sorted(experts)} do not match the config's experts {sorted(names)}"
            )
        for ref in config.experts:
            _check_expert(ref.name, experts[ref.name], ref.embedding_dim, ref.hub_id, ref.revision)
        self.config = config
        self.expert_names = list(names)
        self.task_list = [build_task(t) for t in config.tasks]
        self.tasks = {task.name: task for task in self.task_list}
        gate_settings = config.gate
        self.combine_embeddings = gate_settings.combine == "embeddings"
        self.num_groups = len(self.task_list) if gate_settings.per_task else 1
        squeeze = tuple(t.name for t in self.task_list if t.is_scalar)

        with torch.random.fork_rng(devices=[]):
            branches = {}
            for ref in config.experts:
                # Each branch draws its initial weights from its own seed (config seed + expert name), so an
                # expert's heads start the same whichever other experts share the ensemble: training an expert's
                # heads alone and inside the ensemble ("staged" stage 1) give the same heads.
                torch.manual_seed(derived_seed(config.seed, "branch", ref.name))
                expert = experts[ref.name]
                prepare_expert(expert, config.lora.on_experts)
                heads, projection = None, None
                if self.combine_embeddings:
                    projection = nn.Linear(ref.embedding_dim, gate_settings.projection_dim)
                else:
                    heads = {
                        t.name: TaskHead(ref.embedding_dim, t.num_outputs, config.heads)
                        for t in self.task_list
                    }
                branch = ExpertBranch(
                    expert, ref.hub_id, heads=heads, projection=projection, squeeze_tasks=squeeze
                )
                branches[ref.name] = wrap_branch(branch, ref, config.lora)
            self.branches = nn.ModuleDict(branches)
            torch.manual_seed(derived_seed(config.seed, "shared"))
            self.shared_heads = nn.ModuleDict(
                {
                    t.name: TaskHead(gate_settings.projection_dim, t.num_outputs, config.heads)
                    for t in self.task_list
                }
                if self.combine_embeddings
                else {}
            )
            self.gate = build_gate(
                gate_settings,
                len(names),
                self.num_groups,
                embedding_dims=[r.embedding_dim for r in config.experts],
            )
            self.task_log_vars = (
                nn.Parameter(torch.zeros(len(self.task_list)))
                if config.task_weighting == "uncertainty"
                else None
            )
        # task -> label -> decision threshold (binary/multilabel), e.g. fitted on validation data; saved as
        # thresholds.json by save_pretrained and used by predict_records.
        self.decision_thresholds: dict[str, dict[str, float]] = {}
        self._set_expert_modes()

    # -- structure -----------------------------------------------------------------------------------------------

    def branch(self, expert_name: str) -> ExpertBranch:
        """The (unwrapped) branch of one expert: ``.expert``, ``.heads[task]``, ``.branch_projection``."""
        if expert_name not in self.branches:
            raise KeyError(f"no expert {expert_name!r}; experts: {self.expert_names}")
        return unwrap_branch(self.branches[expert_name])

    def head(self, expert_name: str, task_name: str) -> TaskHead:
        """The head of one expert for one task (combine='predictions')."""
        return self.branch(expert_name).heads[task_name]

    @property
    def supports_cached_embeddings(self) -> bool:
        """True when experts are frozen as published (no LoRA on them): cached embeddings stay valid."""
        return not self.config.lora.on_experts

    def train(self, mode: bool = True) -> Ensemble:
        super().train(mode)
        self._set_expert_modes()
        return self

    def _set_expert_modes(self) -> None:
        # Frozen experts always run in eval mode: their dropout/batch-norm must not change (or make random) the
        # features, and the features must equal the cached ones. Experts with LoRA follow the ensemble's mode.
        if not self.config.lora.on_experts:
            for name in self.expert_names:
                self.branch(name).expert.eval()

    # -- forward -------------------------------------------------------------------------------------------------

    def embed(
        self,
        expert_inputs: Mapping[str, Tensor],
        demographics: Tensor | None = None,
        window_masks: Mapping[str, Tensor] | None = None,
        *,
        lead_masks: Mapping[str, Tensor] | None = None,
        valid_samples: Mapping[str, Tensor] | None = None,
        available: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Every expert's embedding ``(B, D)`` of every record (what the feature cache stores): NaN rows where
        ``available`` ``(B, E)`` says the expert cannot read the record (see :meth:`forward`)."""
        self._check_inputs(expert_inputs, from_embeddings=False)
        out = {}
        for e, name in enumerate(self.expert_names):
            emb = self.branch(name).embed(
                expert_inputs[name], demographics, *_masks_of(name, window_masks, lead_masks, valid_samples)
            )
            if available is not None and not bool(available[:, e].all()):
                unreadable = ~available[:, e].to(emb.device, torch.bool)
                emb = emb.masked_fill(unreadable.unsqueeze(-1), float("nan"))
            out[name] = emb
        return out

    def forward(
        self,
        expert_inputs: Mapping[str, Tensor],
        gate_input: Tensor | None = None,
        demographics: Tensor | None = None,
        *,
        from_embeddings: bool = False,
        window_masks: Mapping[str, Tensor] | None = None,
        expert_logits: Mapping[str, Tensor] | None = None,
        use_gate: bool = True,
        lead_masks: Mapping[str, Tensor] | None = None,
        valid_samples: Mapping[str, Tensor] | None = None,
        available: Tensor | None = None,
    ) -> EnsembleOutput:
        """Predict every task for a batch.

        Args:
            expert_inputs: expert name -> contract-prepared windows ``(B, n_windows, ...)``, or with
                ``from_embeddings=True`` cached embeddings ``(B, D)``.
            gate_input: the signal gate's windows prepared with its contract (``(B, [n_windows,] leads, length)``);
                required by a signal gate, ignored otherwise.
            demographics: ``(B, 2)`` (age, sex), passed to experts that accept it.
            from_embeddings: see ``expert_inputs``.
            window_masks: expert name -> bool ``(B, n_windows)``, False for padding windows (records with fewer
                windows than the longest in the batch); experts without a mask get all their windows counted.
            expert_logits: task -> ``(B, E, ...)`` logits that stand in for the experts' heads (combine
                'predictions' only): the gate combines these instead, and the heads do not run. Fitting a gate
                on out-of-fold predictions (the ``staged`` strategy) uses this. Experts still embed the records
                when an embedding gate needs them.
            use_gate: False: skip the gate, run every expert on every record and combine with equal weights
                (the experts' own heads are then trained or read as if alone, e.g. in stage 1 of ``staged``).
            lead_masks, valid_samples: expert name -> ``(B, leads)`` real leads / ``(B, n_windows)`` real samples
                per lead, for experts that keep missing leads or padding out of their computation.
            available: ``(B, E)`` bool, False where an expert cannot read a record (its contract refused it:
                too few leads, too short). Such an expert does not run on the record, gets gate weight 0 (the
                other experts' weights renormalise) and its prediction is missing (NaN). With
                ``from_embeddings`` a NaN embedding row (what :meth:`embed` stores) means the same.
        """
        batch = self._check_inputs(expert_inputs, from_embeddings)
        if expert_logits is not None:
            self._check_expert_logits(expert_logits, batch)
        device = next(iter(expert_inputs.values())).device
        if from_embeddings:
            expert_inputs, available = _readable_embeddings(expert_inputs, self.expert_names, available)
        if available is not None:
            available = available.to(device=device, dtype=torch.bool)
            if bool(available.all()):
                available = None
        check_grad = self.training and self.config.lora.on_experts and torch.is_grad_enabled()
        # One draw from the global RNG seeds every branch's own dropout stream (see derived_seed): a branch's
        # randomness then does not depend on which other experts run before it.
        stream = int(torch.randint(0, 2**62, ())) if self.training else None
        gate_out: GateOutput | None = None
        if not use_gate:
            gate_out = uniform_weights(batch, self.num_groups, len(self.expert_names), device, available)
        elif self.gate.reads is None:
            gate_out = self.gate.weights(batch, device, available)
        elif self.gate.reads == "signal":
            if gate_input is None:
                raise ValueError(
                    f"the {self.gate.name} gate needs `gate_input` (windows prepared with the gate's contract)"
                )
            if gate_input.shape[0] != batch:
                raise ValueError(f"gate_input has {gate_input.shape[0]} records, expert inputs have {batch}")
            gate_out = self.gate.weights(batch, device, available, inputs=gate_input)

        # Which records each expert must embed: the routed ones, all of them for an embedding gate, none when
        # given logits and the gate needs no embeddings.
        if expert_logits is not None and gate_out is not None:
            needed = torch.zeros(batch, len(self.expert_names), dtype=torch.bool, device=device)
        elif gate_out is not None:
            needed = gate_out.routed.any(dim=1)
        else:
            needed = torch.ones(batch, len(self.expert_names), dtype=torch.bool, device=device)
            if available is not None:
                needed = needed & available
        embeddings: dict[str, tuple[Tensor | None, Tensor]] = {}
        for e, name in enumerate(self.expert_names):
            rows = _rows(needed[:, e])
            if rows is not None and rows.numel() == 0:
                continue  # no record routed to this expert: it does not run
            x = expert_inputs[name] if rows is None else expert_inputs[name].index_select(0, rows)
            if from_embeddings:
                embeddings[name] = (rows, x)
            else:
                demo = demographics
                masks = _masks_of(name, window_masks, lead_masks, valid_samples)
                if rows is not None:
                    demo = None if demo is None else demo.index_select(0, rows)
                    masks = [None if m is None else m.index_select(0, rows) for m in masks]
                with _branch_stream(stream, name, "embed", device):
                    emb = self.branch(name).embed(x, demo, *masks)
                if check_grad and not emb.requires_grad:
                    raise RuntimeError(
                        f"expert {name!r} returned an embedding without gradient although its layers carry LoRA "
                        f"(does it run under no_grad while frozen?): its LoRA weights would never train"
                    )
                embeddings[name] = (rows, emb)

        if gate_out is None:  # the gate reads embeddings: every expert ran on every record it can read (zeros elsewhere)
            gate_out = self.gate.weights(
                batch,
                device,
                available,
                inputs=[
                    _scatter(embeddings[name][1], embeddings[name][0], batch)
                    if name in embeddings
                    else torch.zeros(batch, self.gate.embedding_dims[e], device=device)
                    for e, name in enumerate(self.expert_names)
                ],
            )
        routed_any = gate_out.routed.any(dim=1)

        per_expert: list[dict[str, Tensor]] = []  # full-batch per-task logits (zeros where not routed)
        projections: list[Tensor | None] = []  # full-batch projections (combine='embeddings')
        for e, name in enumerate(self.expert_names):
            head_rows = _rows(routed_any[:, e])
            if (
                expert_logits is not None
                or name not in embeddings
                or (head_rows is not None and head_rows.numel() == 0)
            ):
                per_expert.append({})
                projections.append(None)
                continue
            emb_rows, emb = embeddings[name]
            emb, head_rows = _select(emb, emb_rows, head_rows, batch)
            branch = self.branch(name)
            with _branch_stream(stream, name, "heads", device):
                if self.combine_embeddings:
                    projected = branch.project(emb)
                    projections.append(_scatter(projected, head_rows, batch))
                    logits = {t.name: self._shared_head(t.name, projected) for t in self.task_list}
                else:
                    projections.append(None)
                    logits = branch.head_logits(emb)
            per_expert.append({t: _scatter(v, head_rows, batch) for t, v in logits.items()})

        out_logits, out_preds, expert_logit_out, expert_preds, gate_weights = {}, {}, {}, {}, {}
        for t_index, task in enumerate(self.task_list):
            group = t_index if self.num_groups > 1 else 0
            weights, log_weights = gate_out.weights[:, group], gate_out.log_weights[:, group]
            if expert_logits is not None:
                stacked = expert_logits[task.name].float()
            else:
                stacked = _stack([p.get(task.name) for p in per_expert])
            if self.combine_embeddings:
                mixed = sum(
                    weights[:, e, None] * proj for e, proj in enumerate(projections) if proj is not None
                )
                combined = self._shared_head(task.name, mixed).float()
            else:
                combined = task.combine(stacked, weights, log_weights, self.config.gate.mix)
            out_logits[task.name] = combined
            out_preds[task.name] = task.predict(combined)
            expert_logit_out[task.name] = stacked
            # An expert explains a task only where that task's weights route to it (per-task gates may route
            # another expert for another task of the same record).
            routed_here = gate_out.routed[:, group]
            mask = routed_here if task.is_scalar else routed_here.unsqueeze(-1)
            expert_pred = task.predict(stacked)
            expert_preds[task.name] = torch.where(
                mask, expert_pred, torch.full_like(expert_pred, float("nan"))
            )
            gate_weights[task.name] = weights
        return EnsembleOutput(
            logits=out_logits,
            predictions=out_preds,
            expert_logits=expert_logit_out,
            expert_predictions=expert_preds,
            gate_weights=gate_weights,
            routed=routed_any,
            aux_losses=dict(gate_out.aux_losses),
            # A non-leaf copy: DDP with find_unused_parameters traces parameters from the outputs' graph.
            task_log_vars=None if self.task_log_vars is None else self.task_log_vars.clone(),
        )

    def _check_expert_logits(self, expert_logits: Mapping[str, Tensor], batch: int) -> None:
        if self.combine_embeddings:
            raise ValueError("expert_logits apply to gate.combine='predictions' only")
        for task in self.task_list:
            if task.name not in expert_logits:
                raise ValueError(f"expert_logits has no task {task.name!r}")
            shape = tuple(expert_logits[task.name].shape)
            wanted = (batch, len(self.expert_names)) + (() if task.is_scalar else (task.num_outputs,))
            if shape != wanted:
                raise ValueError(f"expert_logits[{task.name!r}] has shape {shape}, expected {wanted}")

    def _shared_head(self, task_name: str, x: Tensor) -> Tensor:
        logits = self.shared_heads[task_name](x)
        return logits.squeeze(-1) if self.tasks[task_name].is_scalar else logits

    def _check_inputs(self, expert_inputs: Mapping[str, Tensor], from_embeddings: bool) -> int:
        if set(expert_inputs) != set(self.expert_names):
            raise ValueError(
                f"expert_inputs has keys {sorted(expert_inputs)}, expected {sorted(self.expert_names)}"
            )
        if from_embeddings and self.config.lora.on_experts:
            raise ValueError(
                "from_embeddings=True with lora.on_experts: cached embeddings of the frozen experts do "
                "not include the experts' LoRA updates; run the experts on windows instead"
            )
        sizes = {name: x.shape[0] for name, x in expert_inputs.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"expert inputs disagree on the batch size: {sizes}")
        if from_embeddings:
            for ref in self.config.experts:
                x = expert_inputs[ref.name]
                if x.dim() != 2 or x.shape[1] != ref.embedding_dim:
                    raise ValueError(
                        f"cached embeddings of expert {ref.name!r} have shape {tuple(x.shape)}, "
                        f"expected (B, {ref.embedding_dim})"
                    )
        return next(iter(sizes.values()))

    # -- loss ----------------------------------------------------------------------------------------------------

    def compute_loss(
        self, output: EnsembleOutput, labels: Mapping[str, Tensor], *, include_expert_loss: bool = True
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total training loss and its parts (detached, for logging).

        Per task: the masked task loss on the combined logits, times ``loss_weight``; with uncertainty weighting
        (Kendall et al. 2018) ``loss_weight * (c * exp(-s) * L + s / 2)`` with ``s = log sigma^2`` learned and
        ``c = 1/2`` for regression, 1 for classification (a task without labels in the batch adds nothing, not even
        ``s / 2``). Plus ``gate.load_balance_weight * load_balance + gate.entropy_weight * entropy`` and
        ``heads.expert_loss_weight * sum_t loss_weight * mean_e L_t(expert e on its routed records)`` and
        ``gate.routing_penalty * gate/routing``. ``include_expert_loss=False`` leaves the experts' own term out
        (fitting only the gate on given expert logits, where it is a constant).

        Parts: ``<task>`` (unweighted task loss), ``expert/<task>``, ``gate/load_balance``, ``gate/entropy``,
        ``gate/routing``, ``log_var/<task>``.
        """
        missing = [t.name for t in self.task_list if t.name not in labels]
        if missing:
            raise KeyError(f"labels missing for tasks {missing} (use NaN for records without a label)")
        parts: dict[str, Tensor] = {}
        total = None
        gate, heads = self.config.gate, self.config.heads
        for t_index, task in enumerate(self.task_list):
            loss, count = task.loss(output.logits[task.name], labels[task.name])
            parts[task.name] = loss.detach()
            term = task.config.loss_weight * loss
            if output.task_log_vars is not None:
                log_var = output.task_log_vars[t_index]
                scale = task.uncertainty_scale
                weighted = task.config.loss_weight * (scale * torch.exp(-log_var) * loss + 0.5 * log_var)
                term = torch.where(count > 0, weighted, loss * 0.0 + log_var * 0.0)
                parts[f"log_var/{task.name}"] = log_var.detach()
            if heads.expert_loss_weight > 0 and include_expert_loss:
                expert_loss = self._expert_loss(task, output, labels[task.name])
                parts[f"expert/{task.name}"] = expert_loss.detach()
                term = term + heads.expert_loss_weight * task.config.loss_weight * expert_loss
            total = term if total is None else total + term
        for key, weight in (
            ("gate/load_balance", gate.load_balance_weight),
            ("gate/entropy", gate.entropy_weight),
            ("gate/routing", gate.routing_penalty),
        ):
            if key in output.aux_losses:
                parts[key] = output.aux_losses[key].detach()
                if weight:
                    total = total + weight * output.aux_losses[key]
        return total, parts

    def expert_losses(
        self, output: EnsembleOutput, labels: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Each expert's own loss, as if it were trained alone: ``sum_t loss_weight * L_t(expert e)`` on the
        records routed to it (static task weights: learned uncertainty weights would be shared by the experts
        and couple them). Returns ``(expert -> loss, parts)`` with parts ``<expert>/<task>`` (detached).

        The experts' heads share no parameter, so the sum of these losses trains every expert's heads exactly as
        its own loss alone would (the ``staged`` strategy's stage 1)."""
        missing = [t.name for t in self.task_list if t.name not in labels]
        if missing:
            raise KeyError(f"labels missing for tasks {missing} (use NaN for records without a label)")
        losses: dict[str, Tensor] = {}
        parts: dict[str, Tensor] = {}
        for e, name in enumerate(self.expert_names):
            total = None
            for task in self.task_list:
                y = torch.as_tensor(labels[task.name], device=output.routed.device).float()
                mask = output.routed[:, e].view(-1, *([1] * (y.dim() - 1)))
                y = torch.where(mask, y, torch.full_like(y, float("nan")))
                # contiguous: the same memory layout (so the same reduction order, bit for bit) as the logits of
                # this expert trained alone
                loss, _ = task.loss(output.expert_logits[task.name][:, e].contiguous(), y)
                parts[f"{name}/{task.name}"] = loss.detach()
                term = task.config.loss_weight * loss
                total = term if total is None else total + term
            losses[name] = total
        return losses, parts

    def _expert_loss(self, task: Task, output: EnsembleOutput, labels: Tensor) -> Tensor:
        """Mean over experts (those with labelled routed records) of each expert's own task loss."""
        labels = torch.as_tensor(labels, device=output.routed.device).float()
        losses, counts = [], []
        for e in range(len(self.expert_names)):
            mask = output.routed[:, e].view(-1, *([1] * (labels.dim() - 1)))
            # Records not routed to this expert count as unlabelled for it.
            masked = torch.where(mask, labels, torch.full_like(labels, float("nan")))
            loss, count = task.loss(output.expert_logits[task.name][:, e], masked)
            losses.append(loss)
            counts.append(count)
        used = (torch.stack(counts) > 0).float()
        return (torch.stack(losses) * used).sum() / used.sum().clamp(min=1.0)

    # -- convenience ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(
        self,
        expert_inputs: Mapping[str, Tensor],
        gate_input: Tensor | None = None,
        demographics: Tensor | None = None,
        *,
        from_embeddings: bool = False,
        window_masks: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Combined predictions per task in eval mode (restores the previous mode)."""
        was_training = self.training
        self.eval()
        try:
            output = self(
                expert_inputs,
                gate_input,
                demographics,
                from_embeddings=from_embeddings,
                window_masks=window_masks,
            )
            return output.predictions
        finally:
            self.train(was_training)

    def trainable_parameters(self) -> dict[str, int]:
        """Parameter counts: ``total``, ``trainable``, ``frozen``, trainable ``lora``/``heads``/``projections``/
        ``gate``/``task_weighting``, and ``expert:<name>`` (trainable parameters of that expert's branch)."""
        summary = {"total": count_parameters(self), "trainable": count_parameters(self, trainable=True)}
        summary["frozen"] = summary["total"] - summary["trainable"]
        groups = dict.fromkeys(("lora", "heads", "projections", "gate", "task_weighting"), 0)
        for name, parameter in self.named_parameters():
            if not parameter.requires_grad:
                continue
            if ".lora_" in name:
                groups["lora"] += parameter.numel()
            elif name.startswith("gate."):
                groups["gate"] += parameter.numel()
            elif name == "task_log_vars":
                groups["task_weighting"] += parameter.numel()
            elif "branch_projection" in name:
                groups["projections"] += parameter.numel()
            else:
                groups["heads"] += parameter.numel()
        summary.update(groups)
        for name in self.expert_names:
            summary[f"expert:{name}"] = count_parameters(self.branches[name], trainable=True)
        return summary

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Every trainable tensor (heads, LoRA, gate, projections, task weights), keyed by parameter name; the
        frozen experts are not included (they are re-loaded from the Hub at their recorded revisions)."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: Mapping[str, Tensor], source: str = "state dict") -> None:
        """Load :meth:`trainable_state_dict` output strictly: missing, unexpected or mis-shaped keys are errors."""
        own = dict(self.named_parameters())
        expected = {name for name, p in own.items() if p.requires_grad}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"{source}: missing keys {missing[:10]} (of {len(missing)}), unexpected keys "
                f"{unexpected[:10]} (of {len(unexpected)})"
            )
        shapes = [
            f"{k}: {tuple(state[k].shape)} != {tuple(own[k].shape)}"
            for k in expected
            if tuple(state[k].shape) != tuple(own[k].shape)
        ]
        if shapes:
            raise ValueError(f"{source}: shape mismatches {shapes[:10]}")
        with torch.no_grad():
            for name in expected:
                own[name].copy_(state[name])

    def adapter_state_dict(self, expert_name: str) -> dict[str, Tensor]:
        """Trainable weights of one expert's branch (peft adapter keys when LoRA is used)."""
        self.branch(expert_name)  # validates the name
        return adapter_state_dict(self.branches[expert_name])

    def save_expert_adapter(self, expert_name: str, directory: Any) -> Any:
        """Save one expert's branch as a standard peft adapter folder (requires LoRA)."""
        self.branch(expert_name)
        return save_adapter(self.branches[expert_name], directory)

    # -- sharing and record-level prediction (thin wrappers: see enecg.ensemble.serialization / .prediction) -----

    def save_pretrained(self, directory: str | os.PathLike, **kwargs: Any) -> Path:
        """Save config, trainable weights, peft adapters and card into ``directory``
        (:func:`enecg.ensemble.serialization.save_pretrained`)."""
        from enecg.ensemble.serialization import save_pretrained

        return save_pretrained(self, directory, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        id_or_dir: str | os.PathLike,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        expert_overrides: Mapping[str, str | os.PathLike] | None = None,
    ) -> Ensemble:
        """Load a saved ensemble from a folder or a Hub repo, each expert at its recorded revision
        (:func:`enecg.ensemble.serialization.load_pretrained`)."""
        from enecg.ensemble.serialization import load_pretrained

        return load_pretrained(
            id_or_dir,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            expert_overrides=expert_overrides,
        )

    def predict_record(self, record: Any) -> dict[str, Any]:
        """Combined predictions for one record (an ``ECGRecord`` or a WFDB record path): task ->
        {label: probability}, or the value of a regression task."""
        return self.predict_records([record])[0].predictions()

    def predict_records(self, records: Any, **kwargs: Any) -> list[Any]:
        """Per record: combined and per-expert predictions, gate weights and decisions
        (:func:`enecg.ensemble.prediction.predict_records`)."""
        from enecg.ensemble.prediction import predict_records

        return predict_records(self, records, **kwargs)


def _check_expert(name: str, expert: nn.Module, dim: int, hub_id: str, revision: str | None) -> None:
    if not isinstance(expert, nn.Module):
        raise TypeError(f"expert {name!r} is a {type(expert).__name__}, not an nn.Module")
    actual = getattr(expert, "embedding_dim", None)
    if actual != dim:
        raise ValueError(f"expert {name!r}: embedding_dim {actual!r} differs from the config's {dim}")
    for attr, wanted in (("hub_id", hub_id), ("revision", revision)):
        have = getattr(expert, attr, None)
        if have is not None and wanted is not None and have != wanted:
            raise ValueError(f"expert {name!r}: module {attr} {have!r} differs from the config's {wanted!r}")


def derived_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed derived from ``seed`` and ``parts`` (e.g. ``("branch", expert name)``), stable across runs,
    processes and Python versions (unlike ``hash``)."""
    text = "/".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


@contextlib.contextmanager
def _branch_stream(stream: int | None, name: str, part: str, device: torch.device) -> Iterator[None]:
    """Run a branch's part under its own RNG stream (training mode), restoring the global RNG afterwards."""
    if stream is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        seed_rng(derived_seed(stream, name, part), device)
        yield


def seed_rng(seed: int, device: torch.device | None = None) -> None:
    """Seed the CPU generator (and ``device``'s, for CUDA): what ``torch.manual_seed`` does for the generators a
    step uses, without its per-call bookkeeping for every CUDA device (it runs once per branch and step)."""
    torch.random.default_generator.manual_seed(seed)
    if device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)


def _masks_of(
    name: str,
    window_masks: Mapping[str, Tensor] | None,
    lead_masks: Mapping[str, Tensor] | None,
    valid_samples: Mapping[str, Tensor] | None,
) -> list[Tensor | None]:
    """One expert's ``[window_mask, lead_mask, valid_samples]`` (None where not given)."""
    return [None if masks is None else masks.get(name) for masks in (window_masks, lead_masks, valid_samples)]


def _readable_embeddings(
    embeddings: Mapping[str, Tensor], names: list[str], available: Tensor | None
) -> tuple[dict[str, Tensor], Tensor | None]:
    """Cached embeddings with NaN rows (records an expert cannot read) zeroed, and ``available`` narrowed to the
    finite rows."""
    finite = torch.stack([torch.isfinite(embeddings[n]).all(dim=-1) for n in names], dim=1)
    if bool(finite.all()):
        return dict(embeddings), available
    cleaned = {n: torch.nan_to_num(embeddings[n], nan=0.0) for n in names}
    readable = finite if available is None else finite & available.to(finite.device, torch.bool)
    return cleaned, readable


def _rows(mask: Tensor) -> Tensor | None:
    """Row indices where ``mask`` is True, or None when it is True everywhere (no indexing needed)."""
    if bool(mask.all()):
        return None
    return mask.nonzero().squeeze(1)


def _select(
    emb: Tensor, emb_rows: Tensor | None, head_rows: Tensor | None, batch: int
) -> tuple[Tensor, Tensor | None]:
    """Embeddings of the records in ``head_rows`` given embeddings of the records in ``emb_rows``."""
    if head_rows is None:
        return emb, None
    if emb_rows is None:
        return emb.index_select(0, head_rows), head_rows
    # emb covers emb_rows (a superset of head_rows): map batch positions to positions in emb.
    position = torch.full((batch,), -1, dtype=torch.long, device=emb.device)
    position[emb_rows] = torch.arange(emb_rows.numel(), device=emb.device)
    return emb.index_select(0, position[head_rows]), head_rows


def _scatter(values: Tensor, rows: Tensor | None, batch: int) -> Tensor:
    """Full-batch tensor with ``values`` at ``rows`` and zeros elsewhere (differentiable)."""
    if rows is None:
        return values
    full = values.new_zeros((batch, *values.shape[1:]))
    return full.index_copy(0, rows, values)


def _stack(per_expert: list[Tensor | None]) -> Tensor:
    """``(B, E, ...)`` from per-expert full-batch logits (zeros for experts that did not run)."""
    template = next(v for v in per_expert if v is not None)
    filled = [v if v is not None else torch.zeros_like(template) for v in per_expert]
    return torch.stack(filled, dim=1)
