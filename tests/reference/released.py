"""Small ports of the released code's behaviours that llmprune's ``faithful`` options reproduce.

Written from reading the reference implementations (our own code, not copies): SparseGPT's
``fasterprune`` (IST-DASLab/sparsegpt 147d215, unstructured), CFSP's per-layer thresholds
(wyxscir/CFSP b2d5b13, ``prune_cfsp``), FLAP's ``BiasGPT.add_batch`` and global threshold
(CASIA-IVA-Lab/FLAP 3bb57db, as the CFSP repository also ships it) and LLM-Barber's swap count
(YupengSu/LLM-Barber 6f5ca4e, ``find_threshold``). Plain loops, the reference's order of
operations, nothing shared with the library.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sparsegpt_fasterprune(weight: Tensor, hessian: Tensor, sparsity: float, blocksize: int = 128,
                          percdamp: float = 0.01) -> Tensor:
    """The released unstructured ``fasterprune`` on float32: dead columns zeroed, dampening, the
    upper Cholesky factor of H^-1, and per block ``tmp <= sort(tmp)[int(numel * s)]``."""
    w = weight.clone().float()
    h = hessian.clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(h))
    diag = torch.arange(h.shape[0])
    h[diag, diag] += damp
    h = torch.linalg.cholesky(h)
    h = torch.cholesky_inverse(h)
    hinv = torch.linalg.cholesky(h, upper=True)
    cols = w.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        tmp = w1 ** 2 / (torch.diag(hinv1).reshape((1, -1))) ** 2
        thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
        mask1 = tmp <= thresh
        for i in range(i2 - i1):
            col = w1[:, i]
            d = hinv1[i, i]
            q = col.clone()
            q[mask1[:, i]] = 0
            q1[:, i] = q
            err = (col - q) / d
            w1[:, i:] -= err.unsqueeze(1).matmul(hinv1[i, i:].unsqueeze(0))
            err1[:, i] = err
        w[:, i1:i2] = q1
        w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
    return w


def cfsp_masks(metric: Tensor, keep: list[float], cuda_friendly: bool) -> Tensor:
    """(layers, width) channel scores and keep fractions -> the kept-channel mask."""
    ordered = torch.sort(metric, descending=True)[0]
    width = ordered.shape[1]
    if cuda_friendly:
        index = [int(((width * k) + 64) / 128) * 128 - 1 for k in keep]
    else:
        index = [int(width * k) for k in keep]
    thresholds = torch.tensor([ordered[i][index[i]] for i in range(len(keep))])
    return (metric.t() >= thresholds).t()


class FlapFluctuation:
    """``BiasGPT.add_batch`` (metric WIFV): ``old_baseline_inp`` is the very tensor updated in place."""

    def __init__(self, dim: int) -> None:
        self.nsamples = 0
        self.baseline_inp = torch.zeros(dim)
        self.fluc_inp: Tensor | int = torch.zeros(dim)

    def add_batch(self, inp: Tensor) -> None:  # one sample: (seqlen, dim)
        inp = inp.t()
        batch_size = 1
        old_baseline_inp = self.baseline_inp
        self.baseline_inp *= self.nsamples / (self.nsamples + batch_size)
        self.baseline_inp += torch.mean(inp, dim=1) / (self.nsamples + batch_size)
        if self.nsamples == 0:
            self.fluc_inp = 0
        else:
            self.fluc_inp *= (self.nsamples - 1) / (self.nsamples + batch_size - 1)
            self.fluc_inp += torch.sum((inp - self.baseline_inp.unsqueeze(1)) * (inp - old_baseline_inp.unsqueeze(1)),
                                       dim=1) / (self.nsamples + batch_size)
        self.nsamples += batch_size


def flap_mask(metric: Tensor, ratio: float) -> Tensor:
    """(layers, width) raw scores -> kept mask: standardized per layer, one global threshold, ``>``."""
    z = (metric - torch.mean(metric, dim=1, keepdim=True)) / torch.std(metric, dim=1, keepdim=True)
    ordered = torch.sort(z.view(-1), descending=True)[0]
    return z > ordered[int(ordered.shape[0] * (1 - ratio))]


def barber_swap_count(recons_num: int, threshold: float) -> int:
    return int(torch.tensor(recons_num) * threshold)
