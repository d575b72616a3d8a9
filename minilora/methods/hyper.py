"""Hypernetwork adapters for the encoder-decoder: what they share, and the alignment adapter.

A hypernetwork adapter does not wrap linear layers the way LoRA does: a small network *generates* what is added
to the model, from something it is conditioned on (the encoder's output here; a task in hyperformer.py). It
works through forward hooks on the model's attention and feed-forward modules, which inject never replaces,
so it combines with LoRA on the same model, and `Seq2SeqLM` itself knows nothing about it.

    ml.inject(model, ml.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    adapter = AlignmentAdapter(model, AlignmentConfig(num_prefix=8))   # attach after inject: inject freezes
    ml.train(model, rows, cfg)                                          # everything that is not its own adapter
    adapter.save("out/align");  AlignmentAdapter.load(fresh_model, "out/align")

Attaching freezes the base model (after inject it is frozen already, and what inject left trainable stays so) and
registers the adapter as a submodule of the model (`model.alignment_adapter`), so `model.parameters()`,
the optimiser in `ml.train`, `.to(device)` and `trainable_report` see its parameters: they count as trainable.
`detach()` removes the hooks and the submodule; the model is then exactly the base again.

# The alignment adapter: our reading of "a hypernetwork that generates decoder inputs from encoder outputs"

The system this follows (LoRA Hyperformer) describes "a hyper alignment adapter that leverages a hypernetwork to
generate decoder inputs based on encoder outputs"; its code is not public. We read it as:
1. pool the encoder states E (B, T_enc, d) over the real (unpadded) positions into one vector e (B, d): a mean,
   or attention with a learned query u (softmax over E·u/√d; u starts at 0, which is the mean);
2. a hypernetwork h = GELU(W₁ e + b₁) (B, hidden) generates k decoder input vectors P = W₂ h + b₂ (B, k, d):
   a soft prefix, different for every input;
3. every decoder layer's self-attention reads P before the target tokens: its own input norm, k_proj and v_proj
   turn P into k extra keys and values, which the target queries attend to in a softmax of their own, gated per
   head by tanh(g) with g = 0 at the start (the zero-initialised gate of LLaMA-Adapter, Zhang et al. 2023):
       out = SelfAttn(x) + o_proj( tanh(g) ⊙ softmax(q K_Pᵀ · scale) V_P )
   so the adapter changes nothing before training (outputs equal the base's exactly), and the gate's gradient
   is not zero, so training moves it;
4. optionally (cross_rank > 0) h also generates a per-example low-rank update of the decoder's cross-attention
   projections (`cross_targets`, default the values): y = W x + B(h) A(h) x, with B's generator zero at init.
The prefix has no position (as cross-attention has none in T5) and never enters the KV cache: it depends only on
the encoder states, which do not change while decoding, so generating with the cache equals generating without.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

CONFIG_NAME = "hyper_config.json"
WEIGHTS_NAME = "hyper_model.safetensors"


class HyperAdapter(nn.Module):
    """Attaching to a model (hooks + submodule), detaching, and files. Subclasses set `attr` (the submodule's name
    on the model), `config_class`, and write `_hooks()` (the hook handles they register)."""

    attr: str
    config_class: type

    def __init__(self, model: nn.Module, config):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}.")
        if getattr(getattr(model, "config", None), "n_encoder_layers", 0) <= 0 or not hasattr(model, "decoder"):
            raise TypeError(f"{type(self).__name__} works on an encoder-decoder (minilora's Seq2SeqLM), not on "
                            f"{type(model).__name__}; load one with ml.load_base('seq2seq-tiny').")
        if getattr(model, self.attr, None) is not None:
            raise ValueError(f"the model already has a {type(self).__name__} (model.{self.attr}); "
                             f"call model.{self.attr}.detach() first.")
        self.config = config
        object.__setattr__(self, "model", model)  # a plain reference: the model holds us, not the other way round

    def _attach(self) -> None:
        """Called by subclasses once their parameters exist. Freezes the base model, unless inject has already done so
        (what it left trainable, such as LoRA or a modules_to_save copy, stays so; a hypernetwork adapter attached
        before keeps its state too), and registers the adapter as a submodule, whose parameters train."""
        if not getattr(self.model, "adapter_configs", None):
            others = [m for m in self.model.modules() if isinstance(m, HyperAdapter)]  # attached before: keep as is
            kept = {p: p.requires_grad for m in others for p in [*m.parameters(), *m.extra_state().values()]}
            self.model.requires_grad_(False)
            for p, flag in kept.items():
                p.requires_grad_(flag)
        p = next(self.model.parameters())
        self.to(device=p.device, dtype=p.dtype if p.is_floating_point() else None)
        self.model.add_module(self.attr, self)
        self.handles = self._hooks()

    def detach(self) -> nn.Module:
        """Remove the hooks and the submodule: the model computes exactly what it did before attaching."""
        for h in self.handles:
            h.remove()
        self.handles = []
        if getattr(self.model, self.attr, None) is self:
            delattr(self.model, self.attr)
        return self.model

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Model tensors that train with the adapter and belong in its file (Hyperformer's layer norms)."""
        return {}

    def save(self, directory: str) -> None:
        """hyper_config.json (the config, with the adapter's kind) + hyper_model.safetensors (every tensor)."""
        os.makedirs(directory, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}
        tensors.update({f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in self.extra_state().items()})
        save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump({"hyper_type": type(self).__name__, **asdict(self.config)}, f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, model: nn.Module, directory: str, is_trainable: bool = False):
        """Attach an adapter saved by `save` to `model`. The file is checked against a freshly built adapter before
        anything changes, so a bad file raises and leaves the model as it was. Frozen unless `is_trainable`."""
        config_path, weights_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
        for path in (config_path, weights_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} is missing; {cls.__name__}.save writes {CONFIG_NAME} and {WEIGHTS_NAME}.")
        with open(config_path) as f:
            d = json.load(f)
        kind = d.pop("hyper_type", None)
        if kind != cls.__name__:
            raise ValueError(f"{directory} holds a {kind!r}, not a {cls.__name__}; load it with {kind}.load.")
        known = {f.name for f in fields(cls.config_class)}
        if set(d) - known:
            raise ValueError(f"{config_path} has fields {sorted(set(d) - known)} that {cls.config_class.__name__} lacks.")
        tensors = load_file(weights_path)
        params = dict(model.named_parameters())
        fresh = cls(model, cls.config_class(**d), _attach=False)
        expected = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
        expected.update({f"model.{k}": tuple(v.shape) for k, v in fresh.extra_state().items()})
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if got != expected:
            bad = sorted(set(got) ^ set(expected)) or sorted(k for k in got if got[k] != expected[k])
            raise ValueError(f"{weights_path} does not fit this model and config: {bad[:5]} differ (keys or shapes).")
        fresh._attach()
        with torch.no_grad():
            fresh.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("model.")})
            for k, v in tensors.items():
                if k.startswith("model."):
                    params[k.removeprefix("model.")].copy_(v)
        fresh.requires_grad_(is_trainable)
        for p in fresh.extra_state().values():
            p.requires_grad_(is_trainable)
        return fresh


def key_padding(cross_bias: torch.Tensor | None, context: torch.Tensor) -> torch.Tensor:
    """The decoder's additive cross-attention mask (B, 1, 1, T_enc) back to a 0/1 mask of real tokens (B, T_enc)."""
    if cross_bias is None:
        return torch.ones(context.shape[:2], dtype=context.dtype, device=context.device)
    return (cross_bias[:, 0, 0, :] > torch.finfo(cross_bias.dtype).min / 2).to(context.dtype)


@dataclass
class AlignmentConfig:
    num_prefix: int = 8  # k: generated decoder input vectors
    hidden: int = 64  # the hypernetwork's hidden size
    pooling: str = "mean"  # how the encoder states become one vector: "mean" or "attention" (a learned query)
    cross_rank: int = 0  # rank of the per-example cross-attention update; 0: none
    cross_targets: tuple[str, ...] = ("v_proj",)  # which cross-attention projections it updates

    def __post_init__(self):
        self.cross_targets = tuple(self.cross_targets)
        for name in ("num_prefix", "hidden"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if not isinstance(self.cross_rank, int) or self.cross_rank < 0:
            raise ValueError(f"cross_rank must be an integer >= 0 (0 turns the cross-attention update off), got {self.cross_rank!r}.")
        if self.pooling not in ("mean", "attention"):
            raise ValueError(f"pooling must be 'mean' or 'attention', got {self.pooling!r}.")
        wrong = [t for t in self.cross_targets if t not in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if wrong or (self.cross_rank and not self.cross_targets):
            raise ValueError(f"cross_targets must name cross-attention projections among q_proj, k_proj, v_proj, "
                             f"o_proj, got {self.cross_targets}.")


class AlignmentAdapter(HyperAdapter):
    """Encoder outputs -> a generated soft prefix every decoder layer reads (and optionally per-example low-rank
    cross-attention updates). See the module docstring for the equations and why they start at zero."""

    attr = "alignment_adapter"
    config_class = AlignmentConfig

    def __init__(self, model: nn.Module, config: AlignmentConfig | None = None, _attach: bool = True):
        super().__init__(model, config or AlignmentConfig())
        c, mc = self.config, model.config
        d, layers = mc.d_model, model.decoder.layers
        if mc.bias:
            raise ValueError("the alignment adapter is written for T5-style layers without biases (the prefix branch "
                             "goes through o_proj, whose bias the base output already holds); use bias=False.")
        self.query = nn.Parameter(torch.zeros(d)) if c.pooling == "attention" else None
        self.hyper = nn.Linear(d, c.hidden)
        self.to_prefix = nn.Linear(c.hidden, c.num_prefix * d)
        self.gate = nn.Parameter(torch.zeros(len(layers), mc.n_heads))  # tanh(0) = 0: no effect at the start
        self.cross_A, self.cross_B = nn.ModuleDict(), nn.ModuleDict()
        for i, layer in enumerate(layers):
            for t in c.cross_targets if c.cross_rank else ():
                proj = getattr(layer.cross_attn, t)
                self.cross_A[f"{i}_{t}"] = nn.Linear(c.hidden, c.cross_rank * proj.in_features)
                self.cross_B[f"{i}_{t}"] = nn.Linear(c.hidden, proj.out_features * c.cross_rank)
                nn.init.zeros_(self.cross_B[f"{i}_{t}"].weight)
                nn.init.zeros_(self.cross_B[f"{i}_{t}"].bias)
        self._state = None  # (context, h, prefix) of the forward call under way
        if _attach:
            self._attach()

    # ------------------------------------------------------------------ the hypernetwork
    def condition(self, context: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states (B, T_enc, d) and their 0/1 mask (B, T_enc) -> hidden h (B, hidden), prefix P (B, k, d)."""
        if self.query is None:
            pooled = (context * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        else:
            scores = (context @ self.query) / context.shape[-1] ** 0.5  # (B, T_enc)
            weights = torch.softmax(scores.masked_fill(mask == 0, float("-inf")), dim=-1)
            pooled = (weights[..., None] * context).sum(1)  # (B, d)
        h = F.gelu(self.hyper(pooled))
        return h, self.to_prefix(h).view(context.shape[0], self.config.num_prefix, context.shape[-1])

    def _current(self, context, cross_bias):
        if self._state is None or self._state[0] is not context:  # once per forward call, shared by every layer
            self._state = (context, *self.condition(context, key_padding(cross_bias, context)))
        return self._state

    # ------------------------------------------------------------------ hooks
    def _hooks(self):
        handles = [self.model.register_forward_hook(self._clear, always_call=True)]
        for i, layer in enumerate(self.model.decoder.layers):
            handles.append(layer.register_forward_pre_hook(self._layer_pre_hook(i), with_kwargs=True))
            handles.append(layer.self_attn.register_forward_hook(self._prefix_hook(i, layer), with_kwargs=True))
        self._cross_handles = {}
        return handles

    def _clear(self, module, args, output):
        self._state = None

    def _layer_pre_hook(self, i):
        def hook(layer, args, kwargs):
            context = kwargs.get("context")
            if context is None:
                raise ValueError("the alignment adapter reads the encoder states; call the decoder through Seq2SeqLM.")
            self._current(context, kwargs.get("cross_bias"))
            for t in self.config.cross_targets if self.config.cross_rank else ():
                self._follow(i, t, getattr(layer.cross_attn, t))
        return hook

    def _follow(self, i, t, proj):
        """Keep the cross-attention hook on whatever module is there now (inject or merge_and_unload may swap it)."""
        held = self._cross_handles.get((i, t))
        if held is None or held[0] is not proj:
            if held is not None:
                held[1].remove()
            self._cross_handles[(i, t)] = (proj, proj.register_forward_hook(self._cross_hook(f"{i}_{t}")))

    def _cross_hook(self, key):
        def hook(proj, args, output):
            h, x = self._state[1], args[0]
            B, r = h.shape[0], self.config.cross_rank
            A = self.cross_A[key](h).view(B, r, x.shape[-1])  # (B, r, d_in)
            Bm = self.cross_B[key](h).view(B, output.shape[-1], r)  # (B, d_out, r)
            return output + torch.einsum("btr,bor->bto", torch.einsum("btd,brd->btr", x, A), Bm)
        return hook

    def _prefix_hook(self, i, layer):
        def hook(attn, args, kwargs, output):
            out, kv = output
            x, prefix = args[0], self._state[2]  # x: the normed decoder states (B, T, d); prefix (B, k, d)
            B, T, _ = x.shape
            p = layer.input_layernorm(prefix)
            q = attn._heads(attn.q_proj(x), attn.n_heads)  # (B, nh, T, hs)
            groups = attn.n_heads // attn.n_kv_heads
            k = attn._heads(attn.k_proj(p), attn.n_kv_heads).repeat_interleave(groups, dim=1)  # (B, nh, k, hs)
            v = attn._heads(attn.v_proj(p), attn.n_kv_heads).repeat_interleave(groups, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)  # its own softmax over the prefix
            y = torch.tanh(self.gate[i])[None, :, None, None] * y  # (B, nh, T, hs)
            return out + attn.o_proj(y.transpose(1, 2).reshape(B, T, -1)), kv
        return hook

    def detach(self):
        for _, handle in getattr(self, "_cross_handles", {}).values():
            handle.remove()
        self._cross_handles = {}
        return super().detach()
