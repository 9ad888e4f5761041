"""Weight-space losses of LoRAGen (Eq. 2, 3, 8) and the VAE KL, as pure functions.

A LoRA update dW = B @ A is unique while its factorisation is not: (B R, R^-1 A) gives the same dW
for any invertible R (r x r). LoRAGen therefore supervises dW itself. Both weight-space losses are
computed from the factors, never materialising a d_out x d_in matrix (LoRAGen App. A.4):

* Frobenius inner product: <B1 A1, B2 A2>_F = tr((B1^T B2)(A2 A1^T)), an r x r product.
* Singular values: with A^T = Q_A R_A and B = Q_B R_B (thin QR), B A = Q_B (R_B R_A^T) Q_A^T, so the
  singular values of dW are those of the r x r core R_B R_A^T. R_A^T R_A = A A^T, so R_A is the
  Cholesky factor of the r x r Gram A A^T (likewise R_B of B^T B) up to signs that leave singular
  values alone: the core comes from two r x r Grams and Cholesky, not from a batched QR of tall
  matrices (which is slow on CUDA: hundreds of small cuSOLVER calls per step).

Shapes: factors carry any leading batch dims, `A: (..., r, d_in)`, `B: (..., d_out, r)`; the
LoRA scaling alpha / r is a constant factor and is left out (cosines ignore it; callers of the
spectral loss work in one consistent scale).
"""

from __future__ import annotations

import torch
from torch import Tensor


def frobenius_inner(A1: Tensor, B1: Tensor, A2: Tensor, B2: Tensor) -> Tensor:
    """<B1 A1, B2 A2>_F = tr((B1^T B2)(A2 A1^T)) -> (...,). Ranks of the two may differ."""
    BtB = B1.transpose(-1, -2) @ B2  # (..., r1, r2)
    AAt = A2 @ A1.transpose(-1, -2)  # (..., r2, r1)
    return (BtB * AAt.transpose(-1, -2)).sum(dim=(-2, -1))  # tr(X Y) = sum(X * Y^T)


def delta_norm(A: Tensor, B: Tensor) -> Tensor:
    """||B A||_F from the factors -> (...,)."""
    return frobenius_inner(A, B, A, B).clamp_min(0.0).sqrt()


def delta_cosine(A1: Tensor, B1: Tensor, A2: Tensor, B2: Tensor, eps: float = 1e-12) -> Tensor:
    """Cosine similarity of B1 A1 and B2 A2 (flattened) -> (...,)."""
    inner = frobenius_inner(A1, B1, A2, B2)
    return inner / (delta_norm(A1, B1) * delta_norm(A2, B2)).clamp_min(eps)


def direction_loss(A_pred: Tensor, B_pred: Tensor, A_true: Tensor, B_true: Tensor) -> Tensor:
    """LoRAGen Eq. 2: mean over locations of 1 - cos(dW_pred, dW_true). Scalar."""
    return (1.0 - delta_cosine(A_pred, B_pred, A_true, B_true)).mean()


def delta_singular_values(A: Tensor, B: Tensor) -> Tensor:
    """Singular values of B A, descending, from the Cholesky factors of the r x r Grams -> (..., r).

    The r x r algebra runs in float64 with a tiny relative jitter on the Grams, so that
    rank-deficient factors (a zero-initialised B) stay finite.
    """
    r = A.shape[-2]
    eye = torch.eye(r, dtype=torch.float64, device=A.device)

    def chol(G: Tensor) -> Tensor:  # (..., r, r) PSD -> lower-triangular L with L L^T ~ G
        G = G.double()
        jitter = 1e-10 * G.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None].clamp_min(1e-30)
        return torch.linalg.cholesky_ex(G + jitter * eye)[0]

    L_A = chol(A @ A.transpose(-1, -2))  # A A^T = R_A^T R_A, L_A = R_A^T
    L_B = chol(B.transpose(-1, -2) @ B)  # B^T B = R_B^T R_B, L_B = R_B^T
    return torch.linalg.svdvals(L_B.transpose(-1, -2) @ L_A).to(A.dtype)  # core R_B R_A^T


def energy_topk_mask(S: Tensor, rho: float = 0.85) -> Tensor:
    """Mask of the leading singular values that first reach a fraction rho of the energy sum(S^2).

    S: (..., r) descending. Returns a bool mask (..., r); at least one value is kept.
    """
    energy = S.square()
    ratio = energy.cumsum(-1) / energy.sum(-1, keepdim=True).clamp_min(1e-30)
    before = torch.cat([torch.zeros_like(ratio[..., :1]), ratio[..., :-1]], dim=-1)
    return before < rho  # keep index i while the energy before it is still short of rho


def spectral_loss(
    A_pred: Tensor, B_pred: Tensor, A_true: Tensor, B_true: Tensor, rho: float = 0.85
) -> Tensor:
    """LoRAGen Eq. 3: energy-weighted squared error of the top-k singular values of dW. Scalar.

    k is the smallest number of the target's singular values holding a fraction rho of its
    energy (per location); weights omega_i = sigma_i / sum_{j<=k} sigma_j of the target (no grad).
    """
    S_pred = delta_singular_values(A_pred, B_pred)  # (..., r)
    S_true = delta_singular_values(A_true, B_true).detach()
    mask = energy_topk_mask(S_true, rho).to(S_true.dtype)
    omega = S_true * mask
    omega = omega / omega.sum(-1, keepdim=True).clamp_min(1e-30)
    return (omega * (S_pred - S_true).square()).sum(-1).mean()


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)), summed over the latent dim, mean over tokens. Scalar."""
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(-1).mean()


def moe_balance_loss(router_probs: Tensor, expert_index: Tensor) -> Tensor:
    """LoRAGen Eq. 8 (Switch-style load balancing): E * sum_e f_e * P_e. Scalar.

    router_probs: (N, E) softmax of the router over all experts; expert_index: (N, K) the experts
    each token was dispatched to. f_e is the fraction of dispatches to expert e, P_e the mean router
    probability of e. Equals 1 for uniform routing and rises to E when all tokens go to one expert.
    """
    N, E = router_probs.shape
    counts = torch.zeros(E, dtype=router_probs.dtype, device=router_probs.device)
    counts = counts.scatter_add(0, expert_index.reshape(-1), torch.ones_like(expert_index.reshape(-1), dtype=router_probs.dtype))
    f = counts / expert_index.numel()
    P = router_probs.mean(0)
    return E * (f * P).sum()
