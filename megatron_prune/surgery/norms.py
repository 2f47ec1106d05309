"""Re-initialising norms after pruning: SLNP (Pangu Light Eq. 6) and Post-RMSNorm absorption
(Eq. 8-10).

gamma is the effective scale: ``w`` for a plain RMSNorm, ``1 + w`` for a zero-centred one
(Gemma); both functions work on gamma and store back in the norm's own convention.
"""

from __future__ import annotations

import torch


def gamma_of(w: torch.Tensor, zero_centered: bool) -> torch.Tensor:
    return w.double() + 1 if zero_centered else w.double()


def weight_of(gamma: torch.Tensor, zero_centered: bool, like: torch.Tensor) -> torch.Tensor:
    return (gamma - 1 if zero_centered else gamma).to(like.dtype)


def slnp(w_orig: torch.Tensor, w_pruned: torch.Tensor, zero_centered: bool) -> torch.Tensor:
    """gamma_new = gamma_pruned * ||gamma_orig||_2 / ||gamma_pruned||_2 (Eq. 6): the pruned norm
    keeps the L2 norm of its affine scale."""
    g_orig, g_pruned = gamma_of(w_orig, zero_centered), gamma_of(w_pruned, zero_centered)
    scale = g_orig.norm() / g_pruned.norm().clamp_min(1e-30)
    return weight_of(g_pruned * scale, zero_centered, w_pruned)


def absorb_post_norm(
    projection: torch.Tensor, norm_w: torch.Tensor, mean_inv_rms: float, zero_centered: bool
) -> torch.Tensor:
    """Fold a post-norm into the projection that feeds it (Eq. 8-10).

    RMSNorm(x) = x * r(x) * gamma with r(x) = 1/sqrt(mean(x^2)+eps). Replacing r(x) by its mean
    over calibration tokens, r_bar, makes the norm the constant scale gamma_abs = r_bar * gamma,
    and x = y W^T gives gamma_abs * x = y (diag(gamma_abs) W)^T: row j of W (Megatron's [out, in]
    layout; column j in the paper's [in, out]) is scaled by gamma_abs[j]. Exact whenever r(x) is
    constant over tokens.
    """
    gamma_abs = mean_inv_rms * gamma_of(norm_w, zero_centered)
    return (projection.double() * gamma_abs[:, None]).to(projection.dtype)
