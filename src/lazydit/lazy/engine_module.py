"""The module engine (`Policy.engine = "module"`: the reference gates): the branch module decides on its own input.

The block runs as written: its `forward` builds Z = modulate(norm(x)) and calls the branch module, whose `forward`
is replaced on the instance by its `ModuleHook` (bound with `types.MethodType`, so `copy.deepcopy` of an attached
model stays correct; module types and state-dict keys stay as they were). The hook asks `Policy.compute_rows` on z,
runs the module on the rows that compute, gives the others what `BranchHook.reused` says, merges mixed batches,
keeps the output and counts. A token-wise policy's chosen tokens (`BranchHook.decide_tokens`) run the module on
those tokens of z, and its output is written into a copy of the cache. Every branch hook runs here outside sample
mode (record, soft, off), and so does a block-engine policy on a block that is not fused (diffusers' blocks:
`BlockSpec.fused`).
"""

import types

import torch

from lazydit.lazy.hooks import BranchHook, gather_tokens, scatter_tokens


class ModuleHook(BranchHook):
    """A branch hook whose module's `forward` it replaces: the lazy forward on the modulated input z."""

    def __call__(self, z, *extra, **kwargs):
        """The lazy forward of the branch module on its modulated input z (B, N, D)."""
        run, module = self.run, self.module
        forward = self.forward if not kwargs else (lambda m, *a: self.forward(m, *a, **kwargs))
        mode = run.mode
        if mode == "off":
            return forward(module, z, *extra)
        if mode == "record":
            out = forward(module, z, *extra)
            self.keep(out.detach())
            if run.policy.records_inputs:
                self.z = z.detach()
            return out
        if mode == "soft":  # y = p F(z) + (1 - p) reuse (the cache, or its forecast)
            if self.cache is None:
                raise RuntimeError("soft mode needs caches: run the model once in 'record' mode first")
            p = run.policy.compute_prob(self, run.k, z)
            run.probs.append((self.branch, p))
            pb = p.to(z.dtype)[:, None, None]
            return pb * forward(module, z, *extra) + (1 - pb) * self.reused()
        B, N = z.shape[:2]
        ahead = run.policy.engine == "block"  # a block that is not fused runs block-engine policies here
        compute, tokens = self.decide_tokens(B, N, None if ahead else z)
        n = B if compute is None else int(compute.sum())  # one host sync per branch, as the reference
        if tokens is not None:  # every row computes the tokens `tokens` (B, n) of a token-wise branch
            idx = tokens.to(z.device)
            out = self.reused(writable=True)  # a buffer of our own: the computed tokens are written into it
            scatter_tokens(out, idx, forward(module, gather_tokens(z, idx), *extra))
            self.keep(out, learn=False)  # a merged output: the cache, not a point of a forecast history
            self.count(B, B, None, N, fresh=idx.shape[1])
            return out
        if n == B:
            out = forward(module, z, *extra)
            if ahead:
                run.policy.computed(self, run.k, z)
            self.keep(out)
        elif n == 0:
            out = self.reused()
            self.keep(out, learn=False)
        else:
            idx = compute.nonzero().squeeze(1).to(z.device)
            out = self.reused(writable=True)  # a buffer of our own: the computed rows are written into it
            out[idx] = forward(module, z[idx], *_rows(extra, idx, B)).to(out.dtype)
            self.keep(out, idx)
        self.count(B, n, compute, N)
        return out


def _rows(extra: tuple, idx, B: int) -> tuple:
    """The rows idx of every per-row tensor argument (batch-first, B rows) of a branch module."""
    return tuple(a[idx] if torch.is_tensor(a) and a.dim() > 0 and a.shape[0] == B else a for a in extra)


def _hooked_forward(self, z, *extra, **kwargs):
    """Replacement forward of an attached branch module."""
    return self._lazy_hook(z, *extra, **kwargs)


def hook_modules(run, layer: int, modules, hook=ModuleHook, **kwargs) -> list:
    """Give every branch module of block `layer` a hook of class `hook` (extra arguments: per branch, lists);
    returns the hooks."""
    hooks = []
    for b, module in enumerate(modules):
        h = hook(run, layer, b, module, **{key: values[b] for key, values in kwargs.items()})
        module._lazy_hook = h
        module.forward = types.MethodType(_hooked_forward, module)
        hooks.append(h)
    return hooks


def attach(run, layer: int, block, spec) -> list:
    """Attach block `layer` to the module engine; returns its branch hooks."""
    return hook_modules(run, layer, spec.modules(block))
