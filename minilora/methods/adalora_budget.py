"""AdaLoRA's rank allocation: importance scores, the cubic budget and the masking of singular values
(Zhang et al. 2023, section 3.2-3.3, eq. 7-12; Algorithm 1). The layer it acts on is in adalora.py.

Importance of one trainable entry θ at step t (eq. 8-11): the sensitivity I = |θ ∇θ| (a first-order estimate
of how much the loss changes if θ is zeroed), smoothed and paired with its uncertainty,

    Ī_t = β1 Ī_{t-1} + (1 − β1) I_t          Ū_t = β2 Ū_{t-1} + (1 − β2) |I_t − Ī_t|          s_t = Ī_t Ū_t

and of the i-th singular triplet (P_{:,i}, λ_i, Q_{i,:}) of a layer (eq. 7): s(λ_i) + mean_k s(P_ki) + mean_j s(Q_ij).

The budget b(t), the total number of triplets kept over all layers (eq. 12):

    b(t) = b0                                                   t <= tinit
           b_T + (b0 − b_T) (1 − (t − tinit) / (T − tinit − tfinal))³    tinit < t <= T − tfinal
           b_T                                                   t > T − tfinal

with b0 = init_r × (number of layers) and b_T = target_r × (number of layers). (Appendix A prints the
numerator as t − tinit − tfinal; the authors' code and peft use t − tinit, which is what takes b from b0 at
tinit to b_T at T − tfinal, and so do we.) While the budget falls, every
deltaT steps the b0 − b(t) lowest-scoring triplets (over all layers together) get λ_i = 0; they stay in the
model and can grow back until the next masking. At t = T − tfinal the final allocation is made and then held:
every later step zeroes the same λ_i again. All of this follows peft 0.21's RankAllocator and
AdaLoraModel.update_and_allocate, step for step (tests/reference/test_adalora_peft.py).

Steps are counted from 1: `update_and_allocate(model, t)` comes after the t-th optimizer step, before the
gradients are cleared (the sensitivity needs them), which is what `ml.train(..., on_step=...)` does.
"""

import torch
import torch.nn as nn

from .adalora import AdaLoraConfig, AdaLoraLayer, orthogonal_penalty


def budget_at(step: int, init_budget: int, target_budget: int, tinit: int, tfinal: int, total_step: int) -> int:
    """b(t) of eq. 12, rounded down as peft rounds it."""
    if step <= tinit:
        return init_budget
    if step > total_step - tfinal:
        return target_budget
    remaining = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_budget - target_budget) * remaining ** 3 + target_budget)


def adalora_layers(model: nn.Module, adapter_name: str) -> dict[str, AdaLoraLayer]:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, AdaLoraLayer) and adapter_name in m.lora_E}
    if not layers:
        raise ValueError(f"the model has no AdaLoRA layer holding adapter {adapter_name!r}; "
                         f"inject(model, AdaLoraConfig(...), {adapter_name!r}) first.")
    return layers


class RankAllocator:
    """Scores, budget and masks for one AdaLoRA adapter of a model. Use it as the training loop's hooks:

        allocator = RankAllocator(model)
        ml.train(model, rows, cfg, extra_loss=allocator.penalty, on_step=allocator.update_and_allocate)

    or call `allocator.penalty(model)` into the loss and `allocator.update_and_allocate(model, step)` after each
    optimizer step (step = 1, 2, ..., total_step) in a loop of your own. The config's `rank_pattern` is kept up to
    date, so `save_adapter` writes the allocation."""

    def __init__(self, model: nn.Module, adapter_name: str = "default"):
        config = getattr(model, "adapter_configs", {}).get(adapter_name)
        if not isinstance(config, AdaLoraConfig):
            raise ValueError(f"adapter {adapter_name!r} of this model is not an AdaLoRA adapter "
                             f"(it is a {type(config).__name__}); inject an AdaLoraConfig first.")
        self.config, self.adapter_name = config, adapter_name
        layers = adalora_layers(model, adapter_name)
        self.layer_names = sorted(layers)
        self.init_budget = sum(layers[n].lora_E[adapter_name].shape[0] for n in self.layer_names)
        self.target_budget = config.target_r * len(self.layer_names)
        self.reset_scores()

    def reset_scores(self) -> None:
        self.sensitivity, self.exp_avg, self.uncertainty = {}, {}, {}  # keyed "<layer>.lora_A" etc.

    def budget_at(self, step: int) -> int:
        c = self.config
        return budget_at(step, self.init_budget, self.target_budget, c.tinit, c.tfinal, c.total_step)

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """orth_reg_weight × the orthogonality regulariser: what AdaLoRA adds to the task loss."""
        return self.config.orth_reg_weight * orthogonal_penalty(model, self.adapter_name)

    def _layers(self, model: nn.Module) -> dict[str, AdaLoraLayer]:
        layers = adalora_layers(model, self.adapter_name)
        if sorted(layers) != self.layer_names:
            raise ValueError("this model's AdaLoRA layers are not the ones the allocator was made for; "
                             "make a RankAllocator for this model.")
        return layers

    @torch.no_grad()
    def update_scores(self, model: nn.Module) -> None:
        """Eq. 8-10 for every entry of P, λ and Q, from the gradients of the last backward pass."""
        b1, b2 = self.config.beta1, self.config.beta2
        for lname, layer in self._layers(model).items():
            for attr in ("lora_A", "lora_B", "lora_E"):
                p, key = getattr(layer, attr)[self.adapter_name], f"{lname}.{attr}"
                if p.grad is None:
                    raise RuntimeError(f"{key} has no gradient: call update_and_allocate after loss.backward() and "
                                       "optimizer.step(), before the gradients are cleared.")
                if key not in self.exp_avg:
                    self.exp_avg[key], self.uncertainty[key] = torch.zeros_like(p), torch.zeros_like(p)
                self.sensitivity[key] = (p * p.grad).abs()
                self.exp_avg[key] = b1 * self.exp_avg[key] + (1 - b1) * self.sensitivity[key]
                self.uncertainty[key] = b2 * self.uncertainty[key] + (1 - b2) * (
                    self.sensitivity[key] - self.exp_avg[key]).abs()

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """Eq. 7 per layer, (r,): s(λ_i) + mean over P's column i + mean over Q's row i."""
        out = {}
        for lname in self.layer_names:
            s = {a: self.exp_avg[f"{lname}.{a}"] * self.uncertainty[f"{lname}.{a}"] for a in ("lora_A", "lora_B", "lora_E")}
            out[lname] = s["lora_E"].view(-1) + (s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0))
        return out

    @torch.no_grad()
    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, list[bool]]:
        """Zero λ_i of the init_budget − budget lowest-scoring triplets (ties at the threshold go too, as in peft)."""
        scores = self.triplet_scores()
        k = self.init_budget - budget
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k).values if k > 0 else None
        for lname, layer in self._layers(model).items():
            keep = scores[lname] > threshold if threshold is not None else torch.ones_like(scores[lname], dtype=torch.bool)
            layer.rank_mask[self.adapter_name] = keep
        self.apply_masks(model)
        self.config.rank_pattern = self.rank_pattern(model)
        return self.config.rank_pattern

    @torch.no_grad()
    def apply_masks(self, model: nn.Module) -> None:
        for layer in self._layers(model).values():
            keep = layer.rank_mask[self.adapter_name]
            layer.lora_E[self.adapter_name].masked_fill_(~keep.view(-1, 1), 0.0)

    def rank_pattern(self, model: nn.Module) -> dict[str, list[bool]]:
        return {f"{n}.lora_E": layer.rank_mask[self.adapter_name].tolist() for n, layer in self._layers(model).items()}

    def update_and_allocate(self, model: nn.Module, step: int) -> int:
        """Algorithm 1 after optimizer step `step`: update the scores, mask to the budget when due, hold the
        final allocation during the last tfinal steps. Returns the budget b(step)."""
        final_start = self.config.total_step - self.config.tfinal
        if step < final_start:
            self.update_scores(model)
            budget = self.budget_at(step)
            if step > self.config.tinit and step % self.config.deltaT == 0:
                self.mask_to_budget(model, budget)
            return budget
        if step == final_start:  # the final allocation, from the scores so far
            self.mask_to_budget(model, self.target_budget)
            self.reset_scores()
        elif any(layer.rank_mask[self.adapter_name] is None for layer in self._layers(model).values()):
            raise RuntimeError(f"step {step} is past the final allocation (step {final_start}), which never ran: "
                               "call update_and_allocate after every optimizer step from step 1.")
        else:
            self.apply_masks(model)
        return self.target_budget

    def kept_ranks(self, model: nn.Module) -> dict[str, int]:
        """Triplets each layer keeps now (all of them before the first masking)."""
        return {n: int(layer.rank_mask[self.adapter_name].sum()) if layer.rank_mask[self.adapter_name] is not None
                else layer.lora_E[self.adapter_name].shape[0] for n, layer in self._layers(model).items()}


def prune(model: nn.Module, adapter_name: str = "default") -> dict[str, int]:
    """After training: cut every AdaLoRA layer's tensors down to its kept triplets, so the parameter count and
    the file shrink; outputs do not change (masked triplets contribute zero). Returns the ranks kept."""
    layers = adalora_layers(model, adapter_name)
    for layer in layers.values():
        layer.prune(adapter_name)
    return {n: layer.lora_E[adapter_name].shape[0] for n, layer in layers.items()}
