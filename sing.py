"""
SING: StabIlized and Normalized Gradient (Courtois et al., "SING: A Plug-and-Play DNN Learning Technique",
arXiv:2305.15997), written from the behaviour of the reference code (https://github.com/AdrienCourtois/SING).
Each gradient is centred (tensors with dim > 1, per dim-0 slice), divided by its L2 norm
and written back to p.grad; then Adam with decoupled weight decay (dim > 1 only), a softplus denominator and
LookAhead. Differences from the reference (its fp32/fp64 trajectories are unchanged):
- step(closure) works (the reference raises AttributeError on Python >= 3.10) and runs the closure with grad on;
- bf16/fp16 params get fp32 moments and slow weights, kept fp32 through load_state_dict (see _state_dtype);
- the step counter is a Python int, the bias-correction scalars are float32 whatever torch's default dtype
  (see _step_scalars), and the slow weights are state["slow"] (the reference's "lookahead_params").
"""

import functools

import torch
import torch.nn.functional as F


def _state_dtype(p):
    # fp32 state for bf16/fp16 params: the reference keeps it in the param dtype, where bf16 exp_avg_sq never decays
    # (with 8 mantissa bits, v * 0.999 rounds back to v) and fp16 (1 - beta2) * g^2 underflows. fp64 keeps fp64.
    return torch.promote_types(p.dtype, torch.float32)


@functools.lru_cache(maxsize=64)
def _step_scalars(lr, beta1, beta2, step):
    # The reference computes the bias corrections from a float32 step tensor (torch.tensor(0.)), so 1 - 0.999 is off
    # by 1.3e-5 relative even for fp64 params. Doing the same float32 ops reproduces its scalars bit for bit (its
    # fp64 trajectories to ~1e-16 instead of ~1e-5 * lr), so the tests can pin it tightly; the error is harmless.
    t = torch.tensor(float(step), dtype=torch.float32)
    bc1, bc2 = 1 - beta1**t, 1 - beta2**t
    return (-lr / bc1).item(), bc2.sqrt().item()  # (step size, sqrt of the second-moment bias correction)


class SING(torch.optim.Optimizer):
    def __init__(self, params, lr=5e-3, betas=(0.9, 0.999), weight_decay=0, eps=1e-8, softplus=True,
                 beta_softplus=50, grad_central=True, grad_norm=True, lookahead_active=True, la_mergetime=5,
                 la_alpha=0.5):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas) or la_mergetime < 1:
            raise ValueError(f"invalid SING hyper-parameters: lr={lr} betas={betas} eps={eps} wd={weight_decay} "
                             f"la_mergetime={la_mergetime}")
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, softplus=softplus,
                        beta_softplus=beta_softplus, grad_central=grad_central, grad_norm=grad_norm,
                        lookahead_active=lookahead_active, la_mergetime=la_mergetime, la_alpha=la_alpha,
                        la_step=0)  # la_step: per-group LookAhead counter, saved with the param groups
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise NotImplementedError("SING does not support sparse gradients")
                state = self.state[p]
                w = p.to(_state_dtype(p))  # p itself for fp32/fp64, an fp32 working copy for bf16/fp16
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(w)
                    state["exp_avg_sq"] = torch.zeros_like(w)
                    if group["lookahead_active"]:
                        state["slow"] = w.clone()  # LookAhead's slow weights, taken before the first update

                g = p.grad.to(w.dtype)
                if group["grad_central"] and g.dim() > 1:
                    g = g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True)
                if group["grad_norm"]:
                    g = g / (torch.linalg.vector_norm(g) + eps)
                p.grad.copy_(g)  # as the reference: after step(), p.grad holds the processed gradient

                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                step_size, sqrt_bc2 = _step_scalars(lr, beta1, beta2, state["step"])

                if wd != 0 and p.dim() > 1:  # decoupled decay, never on biases / norm gains
                    w.mul_(1 - lr * wd)
                denom = exp_avg_sq.sqrt() / sqrt_bc2
                # softplus floors the denominator at ln2/beta; eps only enters when it is off (as the reference)
                denom = F.softplus(denom, beta=group["beta_softplus"]) if group["softplus"] else denom.add_(eps)
                w.addcdiv_(exp_avg, denom, value=step_size)
                if w is not p:
                    p.copy_(w)

        # LookAhead counts step() calls per group and merges only params that have a gradient at the merge call.
        for group in self.param_groups:
            if not group["lookahead_active"]:
                continue
            group["la_step"] += 1
            if group["la_step"] < group["la_mergetime"]:
                continue
            group["la_step"] = 0
            alpha = group["la_alpha"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                slow = self.state[p]["slow"]
                slow.mul_(1 - alpha).add_(p.to(slow.dtype), alpha=alpha)  # alpha * fast + (1 - alpha) * slow
                p.copy_(slow)
        return loss

    def load_state_dict(self, state_dict):
        # torch casts every floating state tensor to its param's dtype, which would round our fp32 state of bf16/fp16
        # params; put the saved tensors back at their own precision.
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = dict(zip(saved_ids, (p for g in self.param_groups for p in g["params"])))
        for i, saved in state_dict["state"].items():
            p = params[i]
            for k, v in saved.items():
                if torch.is_tensor(v) and v.is_floating_point():
                    self.state[p][k] = v.to(device=p.device, dtype=_state_dtype(p), copy=True)
