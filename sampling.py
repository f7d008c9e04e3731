"""Drawing tokens: temperature, top-k and top-p sampling, and speculative decoding's acceptance
rule (how many draft tokens the target keeps, exactly as if it had sampled them itself)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None

    def generator(self, device) -> torch.Generator | None:
        return None if self.seed is None else torch.Generator(device=device).manual_seed(self.seed)


def probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The distribution that sampling draws from: logits `[..., V]` after temperature, top-k and
    top-p, softmaxed -> `[..., V]`. Temperature > 0."""
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > sampling.top_p  # keep the smallest set whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(-1)


def sample(logits: torch.Tensor, sampling: Sampling, gen: torch.Generator | None = None):
    """Next token `[B]` from logits `[B, V]`; temperature 0 is greedy."""
    if sampling.temperature <= 0:
        return logits.argmax(-1)
    return torch.multinomial(probs(logits, sampling), 1, generator=gen)[:, 0]


def accept(logits: torch.Tensor, draft: torch.Tensor, q: torch.Tensor | None, sampling: Sampling,
           gen: torch.Generator | None = None):
    """Speculative decoding's rule: how many draft tokens `[B, k]` the target keeps, and the token
    that follows them. logits `[B, k+1, V]`: the target's logits at each draft position and one
    past; q `[B, k, V]`: the probabilities the draft was drawn from (None: a deterministic draft).
    Greedy: the longest prefix that the target's own argmax reproduces, then the argmax after it.
    Sampling: draft token x_j stays with probability min(1, p_j(x_j) / q_j(x_j)); the first rejected
    one is replaced by a draw from norm(max(0, p_j - q_j)), which for a deterministic draft is p_j
    with x_j removed; after a fully accepted draft the next token is drawn from p_k. The tokens
    then follow p exactly, whatever the draft (Leviathan et al. 2023, Chen et al. 2023).
    Returns the accepted counts `[B]` and the next tokens `[B]`."""
    B, k = draft.shape
    rows = torch.arange(B, device=draft.device)
    if sampling.temperature <= 0:
        best = logits.argmax(-1)  # [B, k+1]
        n = (draft == best[:, :k]).cumprod(-1).sum(-1)  # [B]
        return n, best[rows, n]
    p = probs(logits, sampling)  # [B, k+1, V]
    q = F.one_hot(draft, p.shape[-1]).to(p.dtype) if q is None else q  # [B, k, V]
    px, qx = (t.gather(-1, draft[..., None])[..., 0] for t in (p[:, :k], q))  # [B, k]
    u = torch.rand(B, k, generator=gen, device=draft.device)  # k = 0 draws nothing: plain sampling's stream
    n = (u * qx < px).cumprod(-1).sum(-1)  # u < p/q without a division (q(x) > 0: x was drawn from q)
    rest = torch.cat([(p[:, :k] - q).clamp(min=0), p[:, k:]], dim=1)[rows, n]  # [B, V]
    rest = torch.where(rest.sum(-1, keepdim=True) > 0, rest, p[rows, n])  # p_j == q_j: any draw from p_j is right
    return n, torch.multinomial(rest, 1, generator=gen)[:, 0]
